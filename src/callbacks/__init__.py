from .sample_grid import SampleGridCallback

__all__ = ["SampleGridCallback"]

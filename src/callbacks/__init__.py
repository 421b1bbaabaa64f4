from .fid import FIDCallback
from .run_info import RunInfoCallback
from .sample_grid import SampleGridCallback
from .throughput import ThroughputCallback
from .preemption import PreemptionCheckpoint

__all__ = ["FIDCallback", "RunInfoCallback", "SampleGridCallback", "ThroughputCallback", "PreemptionCheckpoint"]

from .fid import FIDCallback
from .model_summary import ModelSummary
from .run_info import RunInfoCallback
from .sample_grid import SampleGridCallback
from .speedups import Speedups
from .throughput import ThroughputCallback
from .preemption import PreemptionCheckpoint

__all__ = ["FIDCallback", "ModelSummary", "RunInfoCallback", "SampleGridCallback", "Speedups", "ThroughputCallback", "PreemptionCheckpoint"]

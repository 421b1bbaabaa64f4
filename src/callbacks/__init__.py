from .fid import FIDCallback
from .run_info import RunInfoCallback
from .sample_grid import SampleGridCallback
from .speedups import Speedups
from .throughput import ThroughputCallback
from .preemption import PreemptionCheckpoint

__all__ = ["FIDCallback", "RunInfoCallback", "SampleGridCallback", "Speedups", "ThroughputCallback", "PreemptionCheckpoint"]

from .ema_snapshots import PostHocEMA
from .fid import FIDCallback
from .model_summary import ModelSummary
from .preemption import PreemptionCheckpoint
from .run_info import RunInfoCallback
from .sample_grid import SampleGridCallback
from .speedups import Speedups
from .throughput import ThroughputCallback

__all__ = [
    "FIDCallback",
    "ModelSummary",
    "PostHocEMA",
    "RunInfoCallback",
    "SampleGridCallback",
    "Speedups",
    "ThroughputCallback",
    "PreemptionCheckpoint",
]

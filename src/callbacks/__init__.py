from .fid import FIDCallback
from .model_summary import ModelSummary
from .posthoc_ema import PostHocEMA
from .run_info import RunInfoCallback
from .sample_grid import SampleGridCallback
from .speedups import Speedups
from .throughput import ThroughputCallback
from .preemption import PreemptionCheckpoint

__all__ = ["FIDCallback", "ModelSummary", "PostHocEMA", "RunInfoCallback", "SampleGridCallback", "Speedups", "ThroughputCallback", "PreemptionCheckpoint"]

from .checkpoint_io import AtomicCheckpointIO
from .classifier_module import ClassifierModule
from .diffusion_module import DiffusionModule
from .ema import EMA, PowerFunctionEMA
from .ema_trained import EMATrainedModule

__all__ = ["AtomicCheckpointIO", "ClassifierModule", "DiffusionModule", "EMA", "EMATrainedModule", "PowerFunctionEMA"]

from .checkpoint_io import AtomicCheckpointIO
from .classifier_module import ClassifierModule
from .diffusion_module import DiffusionModule
from .ema import EMA

__all__ = ["AtomicCheckpointIO", "ClassifierModule", "DiffusionModule", "EMA"]

from .checkpoint_io import AtomicCheckpointIO
from .diffusion_module import DiffusionModule
from .ema import EMA

__all__ = ["AtomicCheckpointIO", "DiffusionModule", "EMA"]

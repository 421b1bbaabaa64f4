from .diffusion_module import DiffusionModule
from .ema import EMA

__all__ = ["DiffusionModule", "EMA"]

"""Denoising networks. The model code knows nothing of the diffusion process or of Lightning."""

from .classifier import NoisyClassifier
from .unet import UNet

__all__ = ["NoisyClassifier", "UNet"]

"""DataModules yielding (x in [-1, 1] float32 [B, C, H, W], y int64 [B]) batches."""

from .base import DatasetNotFoundError, ImageDataModule, UInt8ImageDataset, split_indices
from .cifar10 import CIFAR10DataModule
from .digits import DigitsDataModule
from .image_folder import IMAGE_EXTENSIONS, ImageFolderDataModule
from .synthetic import SyntheticDataModule

__all__ = [
    "CIFAR10DataModule",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "IMAGE_EXTENSIONS",
    "ImageDataModule",
    "ImageFolderDataModule",
    "SyntheticDataModule",
    "UInt8ImageDataset",
    "split_indices",
]

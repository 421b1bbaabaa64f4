"""scikit-learn's bundled 8x8 handwritten digits (1797 images, offline) as a DataModule."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits

from .base import ImageDataModule, UInt8ImageDataset, check_image_size, split_indices
from .transforms import resize_unit, unit_to_uint8


def load_digits_uint8(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as uint8 [N, 1, S, S] and int64 labels [N].

    The 0..16 intensities are scaled to [0, 1], resized bilinearly (antialiased when shrinking) and
    quantized to 8 bits once, so the stored data is an ordinary 8-bit image set.
    """
    bunch = load_digits()
    images = torch.from_numpy(bunch.images).to(torch.float32).unsqueeze(1) / 16.0
    images = unit_to_uint8(resize_unit(images, image_size))
    return images, torch.from_numpy(bunch.target).to(torch.int64)


class DigitsDataModule(ImageDataModule):
    """Handwritten digits, 1 channel, labels 0..9, with a fixed seeded train/val split.

    Args:
        image_size: side of the square images (the originals are 8x8).
        batch_size: global batch size (see ImageDataModule).
        val_fraction: fraction held out for validation (0.1 -> 180 of the 1797 images).
        split_seed: seed of the split permutation.
        random_flip: off in conf/data/digits.yaml; digits are not left-right symmetric.
        loader: num_workers (0 in the config: indexing an in-memory tensor is faster than worker IPC),
            pin_memory, persistent_workers (see ImageDataModule).
    """

    channels = 1
    num_classes = 10

    def __init__(
        self, image_size: int, batch_size: int, val_fraction: float, split_seed: int, random_flip: bool, **loader
    ):
        super().__init__(
            batch_size=batch_size, random_flip=random_flip, val_fraction=val_fraction, split_seed=split_seed, **loader
        )
        self.image_size = check_image_size(image_size)
        self.train_indices: torch.Tensor | None = None
        self.val_indices: torch.Tensor | None = None

    def build_datasets(self) -> tuple[UInt8ImageDataset, UInt8ImageDataset]:
        images, labels = load_digits_uint8(self.image_size)
        self.train_indices, self.val_indices = split_indices(len(images), self.val_fraction, self.split_seed)
        train = UInt8ImageDataset(images[self.train_indices], labels[self.train_indices], random_flip=self.random_flip)
        val = UInt8ImageDataset(images[self.val_indices], labels[self.val_indices], random_flip=False)
        return train, val

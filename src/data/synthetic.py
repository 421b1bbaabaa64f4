"""Generated images as a DataModule: any recipe trains without its dataset's files (debug=fast, data=synthetic)."""

from __future__ import annotations

import torch

from .base import ImageDataModule, UInt8ImageDataset, check_channels, check_image_size, split_indices


class SyntheticDataModule(ImageDataModule):
    """Uniform random uint8 images and labels, drawn once from `seed`, with a seeded train/val split.

    Args:
        image_size: side of the square images.
        channels: 1 (grayscale) or 3 (RGB).
        num_classes: labels drawn uniformly from 0..num_classes-1; None: unlabelled (one class, label 0).
        num_images: images in both splits together.
        seed: seed of the images and labels.
        batch_size, val_fraction, split_seed, random_flip, loader: see ImageDataModule.
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        num_classes: int | None,
        num_images: int,
        seed: int,
        batch_size: int,
        val_fraction: float,
        split_seed: int,
        random_flip: bool,
        **loader,
    ):
        super().__init__(
            batch_size=batch_size, random_flip=random_flip, val_fraction=val_fraction, split_seed=split_seed, **loader
        )
        if num_classes is not None and int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}")
        if int(num_images) < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        self.image_size = check_image_size(image_size)
        self.channels = check_channels(channels)
        self.num_classes = 1 if num_classes is None else int(num_classes)
        self.num_images = int(num_images)
        self.seed = int(seed)

    def build_datasets(self) -> tuple[UInt8ImageDataset, UInt8ImageDataset]:
        gen = torch.Generator().manual_seed(self.seed)
        shape = (self.num_images, self.channels, self.image_size, self.image_size)
        images = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        labels = torch.randint(0, self.num_classes, (self.num_images,), generator=gen)
        train_indices, val_indices = split_indices(self.num_images, self.val_fraction, self.split_seed)
        train = UInt8ImageDataset(images[train_indices], labels[train_indices], random_flip=self.random_flip)
        val = UInt8ImageDataset(images[val_indices], labels[val_indices], random_flip=False)
        return train, val

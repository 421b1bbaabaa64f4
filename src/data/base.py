"""Shared LightningDataModule base, the in-memory uint8 dataset and the dataset-missing error.

Every DataModule yields batches (x, y): x float32 [B, C, H, W] in [-1, 1] (uint8 v -> v / 127.5 - 1),
y int64 [B] class labels. `channels`, `image_size` and `num_classes` are known right after
construction because the model is built from them before the Trainer calls `setup`.
"""

from __future__ import annotations

import logging
import os

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from src.errors import ConfigError

from .resumable import EpochShuffleSampler, ResumableDataLoader
from .transforms import maybe_hflip, uint8_to_signed

log = logging.getLogger(__name__)


class DatasetNotFoundError(RuntimeError):
    """The dataset files are missing, unreadable or in the wrong format (single-line message)."""


def _at_most_cpu_count(num_workers: int) -> int:
    """num_workers, capped at the CPU cores this process may use: more workers only compete for those cores,
    and PyTorch warns about every loader that has more (data=image_folder asks for 4 on any machine)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if num_workers > cores:
        log.info("data.num_workers=%d lowered to %d, the CPU cores this process may use", num_workers, cores)
        return cores
    return num_workers


class UInt8ImageDataset(Dataset):
    """Images kept in memory as uint8 [N, C, H, W]; items are (float32 [C, H, W] in [-1, 1], int64 label).

    `random_flip` flips each item left-right with probability 1/2 (training sets only).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, random_flip: bool = False):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)
        self.random_flip = bool(random_flip)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        image = maybe_hflip(self.images[index], self.random_flip)
        return uint8_to_signed(image), self.labels[index]


def check_image_size(image_size: int) -> int:
    """`image_size` as an int; a ValueError unless it is >= 1."""
    if int(image_size) < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    return int(image_size)


def check_channels(channels: int) -> int:
    """`channels` as an int; a ValueError unless it is 1 (grayscale) or 3 (RGB)."""
    if int(channels) not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    return int(channels)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random split of range(n) -> (train indices, val indices), each sorted.

    The validation set gets round(n * val_fraction) items, but at least one when val_fraction > 0
    and n >= 2, so a small folder still gets a validation loss; the training set is never emptied.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


class ImageDataModule(L.LightningDataModule):
    """Base DataModule: global batch size, loaders, seeded split settings and flip augmentation.

    Args:
        batch_size: GLOBAL batch size; `setup` divides it by the trainer's world size (the number of
            DDP processes) so the effective batch does not change with the number of devices.
        num_workers: DataLoader worker processes (0 = load in the main process).
        pin_memory: page-locked host batches for faster host-to-GPU copies.
        persistent_workers: keep workers alive between epochs (only used when num_workers > 0).
        random_flip: random horizontal flip of training items (never of validation items).
        val_fraction: fraction of the images held out for validation (None where the dataset has an
            official validation split).
        split_seed: seed of the train/val permutation, independent of the training seed so the split
            stays fixed across runs.

    Subclasses set `channels`, `image_size`, `num_classes` in `__init__` and implement
    `build_datasets()` -> (train_dataset, val_dataset); `setup` calls it once. They take the DataLoader
    settings (num_workers, pin_memory, persistent_workers) as `**loader` and pass them on unchanged, so
    the defaults above are the only ones; the dataset's settings come without defaults from conf/data.
    """

    channels: int
    image_size: int
    num_classes: int

    def __init__(
        self,
        batch_size: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        random_flip: bool = False,
        val_fraction: float | None = None,
        split_seed: int = 0,
    ):
        super().__init__()
        # Collects the arguments of the subclass constructors too (Lightning walks the __init__ frames).
        self.save_hyperparameters()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if val_fraction is not None and not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.batch_size = int(batch_size)
        self.num_workers = _at_most_cpu_count(int(num_workers))
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.random_flip = bool(random_flip)
        self.val_fraction = None if val_fraction is None else float(val_fraction)
        self.split_seed = int(split_seed)
        self.batch_size_per_device = self.batch_size
        self.shuffle_seed = 0
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        """Return (train_dataset, val_dataset); the training one applies the flip when enabled."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        world_size = getattr(self.trainer, "world_size", 1) if self.trainer is not None else 1
        if self.batch_size % world_size != 0:
            raise ConfigError(
                f"data.batch_size={self.batch_size} (global) is not divisible by the world size {world_size} "
                f"(number of processes); use a multiple of {world_size}"
            )
        self.batch_size_per_device = self.batch_size // world_size
        # The training shuffle follows the run's seed (seed_everything), read before a resumed run
        # restores its random states.
        self.shuffle_seed = torch.initial_seed() % 2**62
        if self.train_dataset is None:
            self.train_dataset, self.val_dataset = self.build_datasets()

    def _check_batch_fits(self) -> None:
        """A training batch must fit in the training split (checked when training asks for its loader only: an
        evaluation of a smaller folder with the same batch size reads no training batches)."""
        if len(self.train_dataset) < self.batch_size_per_device:
            # drop_last would otherwise yield zero batches and training would silently do nothing.
            size, world_size = len(self.train_dataset), self.batch_size // self.batch_size_per_device
            per_device = f" ({self.batch_size_per_device} on each of {world_size} devices)" if world_size > 1 else ""
            raise ConfigError(
                f"data.batch_size={self.batch_size}{per_device} is larger than the training split ({size} images); "
                f"set data.batch_size to at most {size * world_size}"
            )

    def _loader_kwargs(self) -> dict:
        # Page-locked batches only speed up copies to a GPU; without one, DataLoader warns and ignores the flag.
        pin = self.pin_memory and torch.cuda.is_available()
        kwargs = {"batch_size": self.batch_size_per_device, "num_workers": self.num_workers, "pin_memory": pin}
        if self.num_workers > 0:
            # DataLoader rejects persistent_workers=True without workers.
            kwargs["persistent_workers"] = self.persistent_workers
        return kwargs

    def _require_setup(self) -> None:
        if self.train_dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are requested")

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        self._check_batch_fits()
        # Resumable inside an epoch (see ResumableDataLoader); under DDP Lightning swaps in a shuffling
        # DistributedSampler for the EpochShuffleSampler.
        return ResumableDataLoader(
            self.train_dataset,
            sampler=EpochShuffleSampler(self.train_dataset, self.shuffle_seed),
            drop_last=True,
            generator=torch.Generator().manual_seed(self.shuffle_seed),
            **self._loader_kwargs(),
        )

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        # Its own generator: creating a DataLoader iterator draws a base seed from the global RNG otherwise,
        # and Lightning creates (without running) this iterator when a resumed run restarts at a step whose
        # validation was already done, which would shift every random number after it.
        return DataLoader(
            self.val_dataset,
            shuffle=False,
            drop_last=False,
            generator=torch.Generator().manual_seed(0),
            **self._loader_kwargs(),
        )

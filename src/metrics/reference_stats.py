"""Reference statistics: the features of real images (uint8, never augmented), their mean and covariance, and
their one cache on disk, keyed by what they describe (dataset, split, count, size, content, extractor, weights).
evaluate.py and the FID callback both read and write reference statistics through this module."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from src import atomic
from src.data.transforms import signed_to_uint8

from .statistics import accumulate

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: feature rows stored next to mu / sigma, any extractor


class ReferenceImages:
    """The first `num_images` images of a dataset (all when None) as uint8, without augmentation.

    Datasets holding a uint8 tensor `images` [N, C, H, W] are sliced directly; any other dataset of
    (x in [-1, 1], y) items is read item by item and quantized back to uint8.
    """

    def __init__(self, dataset: Dataset, num_images: int | None = None):
        if getattr(dataset, "random_flip", False):
            dataset = copy.copy(dataset)  # the reference set is the data itself, never augmented
            dataset.random_flip = False
        self.dataset = dataset
        total = len(dataset)
        if num_images is not None and int(num_images) < 2:
            raise ValueError(f"num_reference_images must be >= 2 (or null for all), got {num_images}")
        self.num_images = total if num_images is None else min(int(num_images), total)
        tensor = getattr(dataset, "images", None)
        self._tensor = tensor if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.uint8 else None

    def __len__(self) -> int:
        return self.num_images

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        if self._tensor is not None:
            return self._tensor[torch.as_tensor(list(indices), dtype=torch.long)]
        return torch.stack([signed_to_uint8(self.dataset[i][0]) for i in indices])

    def batches(self, indices: Sequence[int], batch_size: int) -> Iterator[torch.Tensor]:
        indices = list(indices)
        for start in range(0, len(indices), batch_size):
            yield self.batch(indices[start : start + batch_size])

    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.batch([0]).shape[1:])

    def fingerprint(self) -> str:
        """Identifies the content cheaply: the pixels of in-memory sets, the file list of on-disk ones."""
        digest = hashlib.sha1()
        if self._tensor is not None:
            digest.update(self._tensor[: self.num_images].contiguous().numpy().tobytes())
        elif hasattr(self.dataset, "paths"):
            for p in list(self.dataset.paths)[: self.num_images]:
                stat = os.stat(p)
                digest.update(f"{os.path.abspath(p)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        else:
            digest.update(f"{type(self.dataset).__name__}:{len(self.dataset)}".encode())
        return digest.hexdigest()[:16]


def dataset_name(datamodule) -> str:
    """A readable dataset name for cache files and reports: digits, cifar10, imagefolder-<folder>."""
    name = type(datamodule).__name__.removesuffix("DataModule").lower()
    if name == "imagefolder" and hasattr(datamodule, "root"):
        name += "-" + Path(datamodule.root).resolve().name
    return name


@dataclass
class ReferenceStats:
    """Mean and covariance of the extractor's features of real images, with what they describe; `features`
    holds the rows themselves (float32 [N, D], for KID and precision/recall), None when only the statistics
    are known (an npz of mu / sigma)."""

    mu: np.ndarray
    sigma: np.ndarray
    meta: dict
    features: np.ndarray | None = None

    def describe(self) -> str:
        m = self.meta
        return f"{m['dataset']} {m['split']} split, {m['num_images']} images at {m['image_size']}px"


def reference_meta(dataset: str, split: str, images: ReferenceImages, extractor: nn.Module) -> dict:
    """What a cache entry describes: the images (dataset, split, count, size, content) and the network
    (extractor name and weights); any difference is another entry."""
    channels, height, width = images.image_shape()
    return {
        "format": CACHE_FORMAT,
        "description": f"reference features, their mean and covariance ({extractor.name}) of real images",
        "dataset": dataset,
        "split": split,
        "num_images": len(images),
        "image_size": height if height == width else f"{height}x{width}",
        "channels": channels,
        "content_fingerprint": images.fingerprint(),
        "extractor": extractor.name,
        "weights_sha256_prefix": extractor.fingerprint,
    }


def reference_cache_path(cache_dir: str | os.PathLike, meta: dict) -> Path:
    """<cache_dir>/<dataset>-<split>-<size>px-<n>-<digest>.npz; the digest covers content and weights."""
    digest = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{meta['dataset']}-{meta['split']}-{meta['image_size']}px-{meta['num_images']}-{digest}.npz"
    return Path(cache_dir) / name


def load_reference(path: Path, meta: dict) -> ReferenceStats | None:
    """The cached statistics at `path` if they hold what `meta` describes, else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = json.loads(str(data["meta"]))
            features = data["features"] if "features" in data.files else None
            stats = ReferenceStats(mu=data["mu"], sigma=data["sigma"], meta=stored, features=features)
    except Exception as err:  # a truncated or foreign file: recompute rather than fail
        log.warning("ignoring unreadable reference cache %s (%s: %s)", path, type(err).__name__, err)
        return None
    if stored != meta:
        log.warning("ignoring reference cache %s: it describes %s", path, stored)
        return None
    return stats


def save_reference(path: Path, stats: ReferenceStats) -> None:
    """Write the statistics, feature rows and their description (the `meta` JSON string) atomically."""
    extra = {} if stats.features is None else {"features": stats.features}
    atomic.savez(path, mu=stats.mu, sigma=stats.sigma, meta=np.array(json.dumps(stats.meta, sort_keys=True)), **extra)


def reference_statistics(
    extractor: nn.Module,
    images: ReferenceImages,
    dataset: str,
    split: str,
    cache_dir: str | os.PathLike,
    batch_size: int = 250,
) -> ReferenceStats:
    """Load the cached features and statistics of `images`, or compute them (one process) and cache them."""
    meta = reference_meta(dataset, split, images, extractor)
    path = reference_cache_path(cache_dir, meta)
    cached = load_reference(path, meta)
    if cached is not None:
        log.info("reference features from %s", path)
        return cached
    log.info("computing reference features of %s %s (%d images) -> %s", dataset, split, len(images), path)
    stats, _, rows = accumulate(extractor, images.batches(range(len(images)), batch_size), keep_features=True)
    mu, sigma = stats.mean_cov()
    reference = ReferenceStats(mu=mu, sigma=sigma, meta=meta, features=rows.numpy())
    save_reference(path, reference)
    return reference

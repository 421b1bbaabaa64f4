"""The real images the samples are scored against (`reference=`): the checkpoint's training split (the
papers' choice) or its validation split, the digits judge's reference part, an image folder, or an .npz,
either of images (`arr_0`, uint8 NHWC, as guided-diffusion's reference batches) or of precomputed `mu` /
`sigma` (as NVlabs/edm publishes them; those serve FID / FD only)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from src.data import UInt8ImageDataset
from src.data.image_folder import ImageFileDataset, find_images
from src.data.transforms import nhwc_to_tensor
from src.errors import ConfigError
from src.provenance import file_sha256

from .digits_judge import judge_split
from .reference_stats import ReferenceImages, ReferenceStats, reference_statistics

SPLITS = ("train", "val")
# Without a checkpoint, 1-channel square images up to this size are taken for digits: reference=judge.
DIGITS_MAX_SIZE = 32
SplitDataset = Callable[[str], tuple[Dataset, str]]  # split -> (dataset, dataset name), from the checkpoint


@dataclass
class ReferenceSource:
    """Images to extract features of (named for the cache key by dataset and split), or ready statistics."""

    spec: str
    images: ReferenceImages | None = None
    dataset: str | None = None
    split: str | None = None
    stats: ReferenceStats | None = None


def default_spec(spec: str | None, has_checkpoint: bool, image_shape: tuple[int, int, int]) -> str:
    """reference=null: the checkpoint's training split, else the digits judge for digits-sized images."""
    if spec is not None:
        return str(spec)
    if has_checkpoint:
        return "train"
    channels, height, width = image_shape
    if channels == 1 and height == width <= DIGITS_MAX_SIZE:
        return "judge"
    raise ConfigError(
        f"samples of {channels}x{height}x{width} images without a checkpoint need a reference: give "
        f"reference=<image folder> or reference=<file.npz> (images arr_0, or mu / sigma)"
    )


def resolve_source(
    spec: str, image_shape: tuple[int, int, int], num_images: int | None, split_dataset: SplitDataset | None
) -> ReferenceSource:
    """What `spec` names, checked: a split needs the checkpoint, images must have the samples' shape."""
    if spec in SPLITS:
        if split_dataset is None:
            raise ConfigError(
                f"reference={spec} is a split of the checkpoint's data; give ckpt_path=..., or "
                f"reference=judge / an image folder / an .npz file"
            )
        dataset, name = split_dataset(spec)
        return _images(spec, dataset, name, spec, image_shape, num_images)
    if spec == "judge":
        channels, height, width = image_shape
        if channels != 1 or height != width:
            raise ConfigError(f"reference=judge holds 1-channel digits, the samples are {channels}x{height}x{width}")
        images = judge_split(height).reference
        return _images(
            spec,
            UInt8ImageDataset(images, torch.zeros(len(images))),
            "digits-judge",
            "reference",
            image_shape,
            num_images,
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        files = find_images(path)
        if not files:
            raise ConfigError(f"reference={spec}: no images ({', '.join(('png', 'jpg', '...'))}) in that folder")
        dataset = ImageFileDataset(files, [0] * len(files), image_shape[1], image_shape[0])
        return _images(spec, dataset, f"folder-{path.resolve().name}", "all", image_shape, num_images)
    if path.suffix == ".npz" and path.is_file():
        return _npz(spec, path, image_shape, num_images)
    raise ConfigError(f"reference={spec} is not train, val, judge, an image folder or an existing .npz file")


def _images(spec: str, dataset: Dataset, name: str, split: str, image_shape, num_images) -> ReferenceSource:
    try:
        images = ReferenceImages(dataset, num_images)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if tuple(images.image_shape()) != tuple(image_shape):
        raise ConfigError(
            f"reference={spec} holds {'x'.join(map(str, images.image_shape()))} images but the "
            f"samples are {'x'.join(map(str, image_shape))}; give a reference of the samples' size"
        )
    return ReferenceSource(spec=spec, images=images, dataset=name, split=split)


def _npz(spec: str, path: Path, image_shape, num_images) -> ReferenceSource:
    with np.load(path, allow_pickle=False) as data:
        if "arr_0" in data.files:
            images = nhwc_to_tensor(data["arr_0"], f"reference={spec}")
            dataset = UInt8ImageDataset(images, torch.zeros(len(images)))
            return _images(spec, dataset, f"npz-{path.stem}", "arr_0", image_shape, num_images)
        if {"mu", "sigma"} <= set(data.files):
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
        else:
            raise ConfigError(f"reference={spec} has neither arr_0 (images) nor mu and sigma; found {data.files}")
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ConfigError(f"reference={spec}: mu {mu.shape} / sigma {sigma.shape} are not a mean and its covariance")
    meta = {
        "dataset": f"npz-{path.stem}",
        "split": "mu/sigma",
        "num_images": None,
        "path": str(path.resolve()),
        "sha256_prefix": file_sha256(path)[:16],
        "feature_dim": int(mu.shape[0]),
        "extractor": "as computed by the file's author (only the feature dimension is checked)",
    }
    return ReferenceSource(spec=spec, stats=ReferenceStats(mu=mu, sigma=sigma, meta=meta))


def reference_features(
    source: ReferenceSource, extractor, cache_dir: str | os.PathLike, batch_size: int
) -> ReferenceStats:
    """The statistics (and feature rows) of the source: given, cached, or computed here and cached."""
    if source.stats is not None:
        return source.stats
    return reference_statistics(
        extractor, source.images, source.dataset, source.split, cache_dir, batch_size=batch_size
    )

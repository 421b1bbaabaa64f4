"""FID and Inception Score with torch-fidelity's Inception-v3, and cached reference features and statistics.

FID (Heusel et al. 2017) compares the 2048-d pool features of Inception-v3 on generated and real images
through Gaussians fitted to each set; IS (Salimans et al. 2016) uses the 1008-way logits of the same
network on the generated images. The network is torch-fidelity's port of the TensorFlow graph that the
papers' numbers come from, fed uint8 RGB images as torch-fidelity feeds them (it resizes to 299x299
itself), so the values match `torch_fidelity.calculate_metrics` on the same images.

Statistics are kept as sums (count, sum, sum of outer products, in float64), which add up across
processes, so a distributed evaluation gives exactly the statistics of the whole sample set. KID and
precision/recall need the feature rows themselves (src.evaluation.scores); the reference cache keeps them.
Any extractor with the same contract (src.evaluation.extractors) goes through the same functions.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.utils import create_feature_extractor

from src.data.transforms import signed_to_uint8
from src.errors import RunError

from .atomic import savez as atomic_savez

log = logging.getLogger(__name__)

INCEPTION_NAME = "inception-v3-compat"
FID_FEATURE = "2048"  # pool3 features, as in the FID paper
ISC_FEATURE = "logits_unbiased"  # logits without the fc bias, torch-fidelity's default for IS
FEATURE_DIM = 2048
NUM_LOGITS = 1008  # the TensorFlow Inception graph's classes
WEIGHTS_FILENAME = URL_INCEPTION_V3.rsplit("/", 1)[-1]
CACHE_FORMAT = 2  # 2: feature rows stored next to mu / sigma, any extractor


class MissingWeightsError(RunError, RuntimeError):
    """The Inception weights for FID/IS are not on disk and could not be downloaded (one-line message)."""


# --- Inception weights and features ------------------------------------------------------------------
def default_weights_path() -> Path:
    """Where torch-fidelity looks for (and downloads) the weights: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def resolve_weights(
    path: str | os.PathLike | None, download: bool = True, config_key: str = "feature_extractor_weights_path"
) -> Path:
    """The Inception weights file to use.

    An explicit `path` must exist (nothing is downloaded then). With `path=None` the torch hub cache
    file is used, downloaded first when missing and `download` is set. Raises MissingWeightsError with
    one line naming the file to provide and the config key that takes it.
    """
    if path is not None:
        explicit = Path(path).expanduser()
        if explicit.is_file():
            return explicit
        raise MissingWeightsError(
            f"Inception weights for FID/IS not found at {explicit}; put {WEIGHTS_FILENAME} ({URL_INCEPTION_V3}) "
            f"there or set {config_key}=/path/to/{WEIGHTS_FILENAME}"
        )
    cached = default_weights_path()
    reason = "not downloaded"
    if not cached.is_file() and download:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(cached), progress=False)
        except Exception as err:  # offline: URLError; anything else is reported the same way
            reason = f"download failed: {type(err).__name__}: {err}".replace("\n", " ")
    if cached.is_file():
        return cached
    raise MissingWeightsError(
        f"Inception weights for FID/IS not found at {cached} ({reason}); download {URL_INCEPTION_V3} to that path "
        f"or set {config_key}=/path/to/{WEIGHTS_FILENAME}"
    )


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def to_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 1 or 3, H, W] -> uint8 [N, 3, H, W] (grayscale replicated to three channels)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}; convert [-1, 1] floats with signed_to_uint8")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1 or 3, H, W], got {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class InceptionFeatures(nn.Module):
    """torch-fidelity's Inception-v3: uint8 images [N, C, H, W] -> (pool features [N, 2048], logits [N, 1008]).

    Built through torch-fidelity's own factory with a local weights file (see `resolve_weights`).
    `fingerprint` identifies the weights, so cached reference statistics are never mixed across networks.
    """

    name = INCEPTION_NAME

    def __init__(self, weights_path: str | os.PathLike):
        super().__init__()
        self.weights_path = Path(weights_path)
        self.net = create_feature_extractor(
            INCEPTION_NAME,
            [FID_FEATURE, ISC_FEATURE],
            cuda=False,
            feature_extractor_weights_path=str(self.weights_path),
            verbose=False,
        )
        self.fingerprint = file_sha256(self.weights_path)[:16]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.net.parameters()).device
        pool, logits = self.net(to_rgb_uint8(images).to(device))
        return pool, logits


# --- statistics and metrics ---------------------------------------------------------------------------
class FeatureStats:
    """Count, sum and sum of outer products of feature vectors (float64), summable across processes."""

    def __init__(self, dim: int = FEATURE_DIM, device: torch.device | str | None = None):
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> None:
        f = features.to(device=self.sum.device, dtype=torch.float64)
        self.count += f.shape[0]
        self.sum += f.sum(dim=0)
        self.outer += f.T @ f

    def tensors(self) -> list[torch.Tensor]:
        """The summable state (e.g. to all-reduce in place)."""
        return [self.count, self.sum, self.outer]

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean [D] and unbiased covariance [D, D] (as numpy.cov) in float64."""
        n = int(self.count.item())
        if n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {n}")
        mu = self.sum / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2):
    ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    tr((S1 S2)^(1/2)) is computed as tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the same eigenvalues, but of a
    symmetric PSD matrix, so symmetric eigensolvers apply and round-off negatives are clipped to 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    # The eigensolvers run single-threaded: at d=2048 threads gain little, and on a busy CPU they
    # collapse (measured on a shared 2-core machine: 2 s with one thread, 30-60 s with two).
    with threadpool_limits(limits=1, user_api="blas"):
        # 1. S1^(1/2) from the eigendecomposition of the symmetric S1.
        w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
        sqrt1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
        # 2. the eigenvalues of S1^(1/2) S2 S1^(1/2) are those of S1 S2.
        middle = sqrt1 @ sigma2 @ sqrt1
        eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    fid = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean
    return float(max(fid, 0.0))


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of the Inception Score over `splits` chunks, with torch-fidelity's shuffling and seed."""
    if logits.shape[0] < splits:
        raise ValueError(f"the Inception Score needs at least isc_splits={splits} samples, got {logits.shape[0]}")
    out = isc_features_to_metric(logits.detach().float().cpu(), splits=splits, shuffle=True, rng_seed=2020)
    return out["inception_score_mean"], out["inception_score_std"]


# --- real images and their cached statistics ---------------------------------------------------------
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
    atomic_savez(path, mu=stats.mu, sigma=stats.sigma, meta=np.array(json.dumps(stats.meta, sort_keys=True)), **extra)


def accumulate(
    extractor: nn.Module,
    batches: Iterable[torch.Tensor],
    stats: FeatureStats | None = None,
    keep_logits: bool = False,
    keep_features: bool = False,
) -> tuple[FeatureStats, torch.Tensor | None] | tuple[FeatureStats, torch.Tensor | None, torch.Tensor | None]:
    """Run uint8 image batches through the extractor: features into `stats`, logits kept when asked; with
    keep_features the feature rows (float32, on the CPU) come back as a third value."""
    logits_list, rows = [], []
    for images in batches:
        pool, logits = extractor(images)
        if stats is None:
            stats = FeatureStats(pool.shape[1], device=pool.device)
        stats.update(pool)
        if keep_logits:
            logits_list.append(logits)
        if keep_features:
            rows.append(pool.detach().float().cpu())
    if stats is None:
        raise ValueError("no images to compute features of")
    logits = torch.cat(logits_list) if keep_logits else None
    return (stats, logits, torch.cat(rows)) if keep_features else (stats, logits)


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


def fid_and_is(stats: FeatureStats, logits: torch.Tensor, reference: ReferenceStats, isc_splits: int = 10) -> dict:
    """FID against `reference` and IS from the logits of the same generated images."""
    mu, sigma = stats.mean_cov()
    is_mean, is_std = inception_score(logits, isc_splits)
    return {
        "fid": frechet_distance(mu, sigma, reference.mu, reference.sigma),
        "is": is_mean,
        "is_std": is_std,
        "num_samples": int(stats.count.item()),
    }

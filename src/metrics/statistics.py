"""Feature statistics and the metrics computed from them: FID's Frechet distance and the Inception Score.

Statistics are kept as sums (count, sum, sum of outer products, in float64), which add up across
processes, so a distributed evaluation gives exactly the statistics of the whole sample set. KID and
precision/recall need the feature rows themselves (src.metrics.scores). Any extractor with the contract of
src.metrics.extractors (uint8 images -> (features, logits)) goes through the same functions.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn
from torch_fidelity.metric_isc import isc_features_to_metric

from .inception import FEATURE_DIM


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
    if not keep_features:
        return stats, logits
    # no rows: a process whose share of a distributed pass is empty (its `stats` was given)
    return stats, logits, torch.cat(rows) if rows else torch.zeros(0, stats.sum.shape[0])


def fid_and_is(stats: FeatureStats, logits: torch.Tensor, reference, isc_splits: int = 10) -> dict:
    """FID against `reference` and IS from the logits of the same generated images."""
    mu, sigma = stats.mean_cov()
    is_mean, is_std = inception_score(logits, isc_splits)
    return {
        "fid": frechet_distance(mu, sigma, reference.mu, reference.sigma),
        "is": is_mean,
        "is_std": is_std,
        "num_samples": int(stats.count.item()),
    }

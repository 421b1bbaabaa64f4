"""Every sample-quality metric from one pass of the extractor over the samples and the reference, with
torch-fidelity's own functions: FID / FD (Heusel et al. 2017), IS (Salimans et al. 2016), KID (Binkowski
et al. 2018, its subset protocol) and improved precision / recall (Kynkaenniemi et al. 2019, k = 3).

FID needs the summed statistics of the samples and mu / sigma of the reference; IS the samples' logits;
KID and precision / recall the feature rows of both sets (a reference of mu / sigma only cannot give them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

from src.errors import ConfigError

from .extractors import metric_key
from .reference_stats import ReferenceStats
from .statistics import FeatureStats, frechet_distance, inception_score

METRICS = ("fid", "is", "kid", "prc")
PRC_NEIGHBORHOOD = 3  # k of the k-NN balls, the paper's choice
KID_MAX_SUBSET_SIZE = 1000  # torch-fidelity's default subset size
RNG_SEED = 2020  # torch-fidelity's seed of the KID subsets and the IS shuffle


@dataclass(frozen=True)
class ScoreSettings:
    """Which metrics and their protocol. kid_subset_size None: min(1000, samples, reference images).
    prc_num_images: precision / recall on the first this many of each set (None: all; the k-NN search is
    quadratic in the count)."""

    metrics: tuple[str, ...]
    isc_splits: int = 10
    kid_subsets: int = 100
    kid_subset_size: int | None = None
    prc_num_images: int | None = None

    @classmethod
    def checked(cls, metrics, **values) -> ScoreSettings:
        names = tuple(str(m) for m in metrics)
        unknown = [m for m in names if m not in METRICS]
        if unknown or not names:
            raise ConfigError(f"metrics={list(names)}: choose from {list(METRICS)} (e.g. metrics=[fid,is,kid,prc])")
        for key, value in values.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        return cls(metrics=names, **values)

    @property
    def needs_rows(self) -> bool:
        return "kid" in self.metrics or "prc" in self.metrics


@dataclass
class SampleFeatures:
    """The samples as the metrics need them: summed statistics, logits [N, K], feature rows [N, D] (or None)."""

    stats: FeatureStats
    logits: torch.Tensor
    rows: torch.Tensor | None


def score(
    samples: SampleFeatures, reference: ReferenceStats, settings: ScoreSettings, extractor_name: str
) -> tuple[dict, dict]:
    """(values, unavailable): numbers under metric_key names, and {metric key: why not} for those that
    cannot be computed from what is given (e.g. KID against a reference of mu / sigma only)."""
    key = lambda metric: metric_key(metric, extractor_name)  # noqa: E731
    values, unavailable = {}, {}
    if "fid" in settings.metrics:
        mu, sigma = samples.stats.mean_cov()
        values[key("fd")] = frechet_distance(mu, sigma, reference.mu, reference.sigma)
    if "is" in settings.metrics:
        if len(samples.logits) < settings.isc_splits:
            unavailable[key("is")] = (
                f"the Inception Score needs at least isc_splits={settings.isc_splits} samples, "
                f"got {len(samples.logits)}; lower isc_splits"
            )
        else:
            values[key("is")], values[key("is_std")] = inception_score(samples.logits, settings.isc_splits)
    rows_missing = reference.features is None or samples.rows is None
    for metric, compute in (("kid", _kid), ("prc", _prc)):
        if metric not in settings.metrics:
            continue
        if rows_missing:
            unavailable[key(metric)] = (
                f"{metric} needs the reference images' features; the reference holds "
                f"mu / sigma only: give reference= images (a split, folder or npz arr_0)"
            )
            continue
        real = torch.from_numpy(np.asarray(reference.features, dtype=np.float32))
        result = compute(samples.rows.float().cpu(), real, settings)
        if isinstance(result, str):
            unavailable[key(metric)] = result
        else:
            values.update({key(name): value for name, value in result.items()})
    return values, unavailable


def _kid(fake: torch.Tensor, real: torch.Tensor, settings: ScoreSettings) -> dict | str:
    size = settings.kid_subset_size or min(KID_MAX_SUBSET_SIZE, len(fake), len(real))
    if size > min(len(fake), len(real)) or size < 2:
        return (
            f"kid_subset_size={size} needs at least that many samples and reference images (have {len(fake)} "
            f"and {len(real)}); lower kid_subset_size or draw more samples"
        )
    out = kid_features_to_metric(
        fake, real, kid_subsets=settings.kid_subsets, kid_subset_size=size, rng_seed=RNG_SEED, verbose=False
    )
    return {
        "kid": out[KEY_METRIC_KID_MEAN],
        "kid_std": out[KEY_METRIC_KID_STD],
        "kid_subset_size": size,
        "kid_subsets": settings.kid_subsets,
    }


def _prc(fake: torch.Tensor, real: torch.Tensor, settings: ScoreSettings) -> dict | str:
    n = settings.prc_num_images
    fake, real = (fake, real) if n is None else (fake[:n], real[:n])
    if min(len(fake), len(real)) <= PRC_NEIGHBORHOOD:
        return (
            f"precision / recall need more than k={PRC_NEIGHBORHOOD} images in each set (have {len(fake)}, {len(real)})"
        )
    out = prc_features_to_metric(
        fake, real, prc_neighborhood=PRC_NEIGHBORHOOD, prc_batch_size=10000, save_cpu_ram=True, verbose=False
    )
    return {
        "precision": out[KEY_METRIC_PRECISION],
        "recall": out[KEY_METRIC_RECALL],
        "prc_num_images": [len(fake), len(real)],
    }

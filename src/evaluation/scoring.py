"""evaluate.py's scoring of sample sets: one extractor and one reference for the whole command, every
requested metric from one pass over each set; results labelled with the extractor and the reference."""

from __future__ import annotations

import logging
import time

import torch
from omegaconf import DictConfig, OmegaConf

from src.data import DatasetNotFoundError
from src.errors import ConfigError
from src.metrics.extractors import ExtractorRequest, build_extractor, extractor_device, extractor_name, metric_key
from src.metrics.inception import MissingWeightsError
from src.metrics.references import SplitDataset, default_spec, reference_features, resolve_source
from src.metrics.scores import SampleFeatures, ScoreSettings, score
from src.metrics.statistics import accumulate

log = logging.getLogger(__name__)


def score_settings(cfg: DictConfig) -> ScoreSettings:
    metrics = cfg.get("metrics")
    metrics = OmegaConf.to_container(metrics) if OmegaConf.is_list(metrics) else metrics
    if not isinstance(metrics, (list, tuple)):
        raise ConfigError(f"metrics must be a list such as metrics=[fid,is,kid,prc], got {metrics!r}")
    return ScoreSettings.checked(
        metrics,
        isc_splits=cfg.isc_splits,
        kid_subsets=cfg.kid_subsets,
        kid_subset_size=cfg.get("kid_subset_size"),
        prc_num_images=cfg.get("prc_num_images"),
    )


class Scorer:
    """Checks the reference at once (a bad reference= fails before any sampling), builds the extractor and
    the reference features on first use (missing Inception weights still leave the samples written) and
    scores uint8 image sets [N, C, H, W] -> metrics.json entries."""

    def __init__(
        self,
        cfg: DictConfig,
        image_shape: tuple[int, int, int],
        device: torch.device,
        split_dataset: SplitDataset | None,
    ):
        self.settings = score_settings(cfg)
        self.cfg, self.image_shape, self.device, self.split_dataset = cfg, tuple(image_shape), device, split_dataset
        self.spec = default_spec(cfg.get("reference"), split_dataset is not None, self.image_shape)
        extractor_name(cfg.extractor)  # an unknown name fails here, before any sampling
        self.extractor, self.reference = None, None
        self.failure: str | None = None
        try:  # a bad reference= fails here, before any sampling
            self.source = resolve_source(self.spec, self.image_shape, cfg.get("num_reference_images"), split_dataset)
        except DatasetNotFoundError as err:
            log.warning("sample quality not computed: %s", err)
            self.failure = str(err)

    def _setup(self) -> None:
        cfg, source = self.cfg, self.source
        request = ExtractorRequest(image_shape=self.image_shape, weights_path=cfg.get("feature_extractor_weights_path"))
        self.extractor = build_extractor(cfg.extractor, request, self.device)
        self.reference = reference_features(source, self.extractor, cfg.cache_dir, cfg.batch_size)
        log.info("scoring with %s against reference=%s (%s)", self.extractor.name, self.spec, self.reference.meta)

    def keys(self) -> list[str]:
        return metric_keys(self.settings, self.cfg.extractor)

    def __call__(self, images: torch.Tensor) -> dict:
        if self.failure is None and self.extractor is None:
            try:
                self._setup()
            except MissingWeightsError as err:
                log.warning("sample quality not computed: %s", err)
                self.failure = str(err)
        if self.failure is not None:
            return {**dict.fromkeys(self.keys()), "metrics_unavailable": {"all": self.failure}}
        start = time.perf_counter()
        features = self.features(images)
        if features.stats.sum.shape[0] != self.reference.mu.shape[0]:
            raise ConfigError(
                f"reference={self.spec} holds {self.reference.mu.shape[0]}-d statistics but "
                f"{self.extractor.name} makes {features.stats.sum.shape[0]}-d features; give statistics "
                f"of the same extractor"
            )
        values, unavailable = score(features, self.reference, self.settings, self.extractor.name)
        return {
            **dict.fromkeys(self.keys()),
            **values,
            "metrics_unavailable": unavailable,
            "extractor": {
                "name": self.extractor.name,
                "weights": self.extractor.fingerprint,
                "config": self.cfg.extractor,
            },
            "reference": {"spec": self.spec, **self.reference.meta},
            "metrics_seconds": round(time.perf_counter() - start, 2),
        }

    def features(self, images: torch.Tensor) -> SampleFeatures:
        device = extractor_device(self.extractor)
        batches = (b.to(device) for b in images.split(self.cfg.batch_size))
        stats, logits, rows = accumulate(self.extractor, batches, keep_logits=True, keep_features=True)
        return SampleFeatures(stats=stats, logits=logits, rows=rows if self.settings.needs_rows else None)


def metric_keys(settings: ScoreSettings, extractor: str) -> list[str]:
    """The metric names a command reports for extractor `extractor` (config name); None when not computed."""
    name = extractor_name(extractor)
    names = {"fid": ["fd"], "is": ["is", "is_std"], "kid": ["kid", "kid_std"], "prc": ["precision", "recall"]}
    return [metric_key(m, name) for metric in settings.metrics for m in names[metric]]


def not_requested(cfg: DictConfig) -> dict:
    """The entry of a set that is not scored (fid=false): the metric names with None."""
    return {
        **dict.fromkeys(metric_keys(score_settings(cfg), cfg.extractor)),
        "metrics_unavailable": {"all": "not requested (fid=false)"},
    }

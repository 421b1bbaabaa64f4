"""Evaluating trained models: checkpoints, samples to files, FID/IS, NLL bits/dim reports."""

from src.checkpoints import load_module, module_from_checkpoint, read_checkpoint

from .metrics import (
    FeatureStats,
    InceptionFeatures,
    MissingWeightsError,
    ReferenceImages,
    ReferenceStats,
    frechet_distance,
    inception_score,
    reference_statistics,
    resolve_weights,
)
from .provenance import git_info
from .run import run

__all__ = [
    "FeatureStats",
    "InceptionFeatures",
    "MissingWeightsError",
    "ReferenceImages",
    "ReferenceStats",
    "frechet_distance",
    "git_info",
    "inception_score",
    "load_module",
    "module_from_checkpoint",
    "read_checkpoint",
    "reference_statistics",
    "resolve_weights",
    "run",
]

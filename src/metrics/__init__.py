"""Sample-quality metrics, used by evaluate.py and the FID callback alike: feature extractors (Inception-v3, the
digits judge), FID / IS / KID / precision-recall from one pass of the extractor, and the reference statistics of
real images with their one cache."""

from .extractors import ExtractorRequest, build_extractor, metric_key
from .inception import InceptionFeatures, MissingWeightsError, resolve_weights
from .reference_stats import ReferenceImages, ReferenceStats, reference_statistics
from .scores import SampleFeatures, ScoreSettings, score
from .statistics import FeatureStats, accumulate, frechet_distance, inception_score

__all__ = [
    "ExtractorRequest",
    "FeatureStats",
    "InceptionFeatures",
    "MissingWeightsError",
    "ReferenceImages",
    "ReferenceStats",
    "SampleFeatures",
    "ScoreSettings",
    "accumulate",
    "build_extractor",
    "frechet_distance",
    "inception_score",
    "metric_key",
    "reference_statistics",
    "resolve_weights",
    "score",
]

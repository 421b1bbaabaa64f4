"""The feature extractors of the sample-quality metrics, by config name (`extractor=inception|digits`).

Each is an nn.Module mapping uint8 images [N, C, H, W] to (features float [N, D], logits [N, K]) with a
`name` (every number computed from it is labelled with it, see `metric_key`) and a `fingerprint` of its
weights (part of every cache key). A new extractor is one module plus one entry in EXTRACTORS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from src.errors import ConfigError

from .digits_judge import DIGITS_EXTRACTOR_NAME, DigitsFeatures
from .inception import INCEPTION_NAME, InceptionFeatures, resolve_weights


@dataclass(frozen=True)
class ExtractorRequest:
    """What a factory may need: the images' shape, a weights file (Inception) and the key that sets it."""

    image_shape: tuple[int, int, int]
    weights_path: str | None = None
    weights_key: str = "feature_extractor_weights_path"
    download: bool = True


def _inception(request: ExtractorRequest) -> nn.Module:
    return InceptionFeatures(
        resolve_weights(request.weights_path, download=request.download, config_key=request.weights_key)
    )


def _digits(request: ExtractorRequest) -> nn.Module:

    channels, height, width = request.image_shape
    if channels != 1 or height != width:
        raise ConfigError(
            f"extractor=digits scores square 1-channel images (the digits data), these are "
            f"{channels}x{height}x{width}; use extractor=inception"
        )
    return DigitsFeatures(height)


def _digits_name() -> str:

    return DIGITS_EXTRACTOR_NAME


@dataclass(frozen=True)
class Extractor:
    """A registry entry: how to build it, and the name its numbers carry (known without building it)."""

    build: Callable[[ExtractorRequest], nn.Module]
    name: Callable[[], str]


EXTRACTORS: dict[str, Extractor] = {
    "inception": Extractor(_inception, lambda: INCEPTION_NAME),
    "digits": Extractor(_digits, _digits_name),
}


def _entry(name: str) -> Extractor:
    if name not in EXTRACTORS:
        raise ConfigError(f"unknown extractor {name!r}; use one of {', '.join(EXTRACTORS)}")
    return EXTRACTORS[name]


def build_extractor(name: str, request: ExtractorRequest, device: torch.device | str = "cpu") -> nn.Module:
    """The extractor `name` (a key of EXTRACTORS) in eval mode on `device`."""
    return _entry(name).build(request).to(device).eval()


def extractor_name(name: str) -> str:
    """The label of the numbers of extractor `name` (a key of EXTRACTORS): inception-v3-compat, digits-mlp64."""
    return _entry(name).name()


# The papers' names for Inception-v3 numbers; any other network's Frechet distance is an FD, not an FID.
_PAPER_NAMES = {"fd": "fid"}


def metric_key(metric: str, extractor_name: str) -> str:
    """The name a number is reported and logged under: fid / is / kid / precision ... for torch-fidelity's
    Inception-v3, `<metric>_<extractor name>` (fd_digits-mlp64, kid_digits-mlp64) for any other network."""
    if extractor_name == INCEPTION_NAME:
        return _PAPER_NAMES.get(metric, metric)
    return f"{metric}_{extractor_name}"


def extractor_device(extractor: nn.Module) -> torch.device:
    parameter = next(extractor.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")

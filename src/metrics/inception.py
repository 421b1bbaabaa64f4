"""torch-fidelity's Inception-v3 as a feature extractor: the network of the papers' FID and IS numbers.

FID (Heusel et al. 2017) compares the 2048-d pool features of Inception-v3 on generated and real images
through Gaussians fitted to each set; IS (Salimans et al. 2016) uses the 1008-way logits of the same
network on the generated images. The network is torch-fidelity's port of the TensorFlow graph that the
papers' numbers come from, fed uint8 RGB images as torch-fidelity feeds them (it resizes to 299x299
itself), so the values match `torch_fidelity.calculate_metrics` on the same images.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.utils import create_feature_extractor

from src.errors import RunError
from src.provenance import file_sha256

log = logging.getLogger(__name__)

INCEPTION_NAME = "inception-v3-compat"
FID_FEATURE = "2048"  # pool3 features, as in the FID paper
ISC_FEATURE = "logits_unbiased"  # logits without the fc bias, torch-fidelity's default for IS
FEATURE_DIM = 2048
NUM_LOGITS = 1008  # the TensorFlow Inception graph's classes
WEIGHTS_FILENAME = URL_INCEPTION_V3.rsplit("/", 1)[-1]


class MissingWeightsError(RunError, RuntimeError):
    """The Inception weights for FID/IS are not on disk and could not be downloaded (one-line message)."""


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

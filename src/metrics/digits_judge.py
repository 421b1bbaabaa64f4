"""A digit classifier's features: the offline stand-in for Inception-v3 on scikit-learn's digits.

MNIST papers score samples with a small classifier instead of Inception (a LeNet); this is the same idea
for the bundled 8x8 digits at the size a run trains on. An MLP (one hidden layer of 64 ReLU units) is
fitted to one fixed part of the 1797 digits; its hidden activations are the features of FD / KID /
precision-recall and its logits give a digit Inception Score (10 = confident and all classes equally
often).

The 1797 digits are cut once, with a fixed seed, into three disjoint parts (`judge_split`):
- `classifier` (797 images): the only images the MLP is fitted on;
- `reference` (500): the real side of every comparison;
- `held_out` (500): real images scored like samples, the floor a perfect model reaches at that count.
The classifier never sees the images it compares, so real held-out images and samples are both unseen
by it (a classifier scored on its own training images gives them features no new image has), and the
reference and the held-out part have the same size, so the held-out floor carries the same
finite-sample bias as 500 samples. Measured (benchmarks/digits_sample_quality.py, 16x16): held-out
FD 1.41 / digit IS 9.27; the same images blurred by a cross filter 5 pixels wide FD 6.5 / IS 8.65.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits
from torch import nn

from src.data.digits import load_digits_uint8

DIGITS_EXTRACTOR_NAME = "digits-mlp64"
NUM_FEATURES = 64
SPLIT_SEED = 0
CLASSIFIER_IMAGES, REFERENCE_IMAGES = 797, 500  # the remaining 500 of the 1797 are held out


@dataclass(frozen=True)
class JudgeSplit:
    """Disjoint parts of all 1797 digits (uint8 [N, 1, S, S]); see the module docstring."""

    classifier: torch.Tensor
    classifier_labels: torch.Tensor
    reference: torch.Tensor
    held_out: torch.Tensor
    held_out_labels: torch.Tensor


def judge_indices(num_images: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices of the (classifier, reference, held-out) parts: a fixed seeded permutation, cut in three."""
    order = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(num_images))
    cut = CLASSIFIER_IMAGES + REFERENCE_IMAGES
    return order[:CLASSIFIER_IMAGES], order[CLASSIFIER_IMAGES:cut], order[cut:]


@lru_cache(maxsize=4)
def judge_split(image_size: int) -> JudgeSplit:
    images, labels = load_digits_uint8(image_size)
    fit, ref, held = judge_indices(len(images))
    return JudgeSplit(images[fit], labels[fit], images[ref], images[held], labels[held])


def flatten_unit(images: torch.Tensor) -> np.ndarray:
    """uint8 [N, 1, H, W] -> float64 [N, H * W] in [0, 1], the classifier's input."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(
            f"the digits extractor takes uint8 [N, 1, H, W] images, got {images.dtype} {tuple(images.shape)}"
        )
    return images.reshape(len(images), -1).cpu().numpy().astype(np.float64) / 255.0


@lru_cache(maxsize=4)
def fit_classifier(image_size: int) -> MLPClassifier:
    """The MLP fitted on the classifier part at this size (a few seconds; deterministic with one BLAS thread)."""
    split = judge_split(image_size)
    with threadpool_limits(limits=1, user_api="blas"):
        return MLPClassifier(hidden_layer_sizes=(NUM_FEATURES,), alpha=1e-3, max_iter=2000, random_state=0).fit(
            flatten_unit(split.classifier), split.classifier_labels.numpy()
        )


class DigitsFeatures(nn.Module):
    """uint8 digits [N, 1, S, S] -> (hidden features [N, 64], logits [N, 10]) of the fitted MLP.

    Same contract as InceptionFeatures, so every metric takes either. `fingerprint` identifies the fitted
    weights (for cache keys); `accuracy` is the classifier's accuracy on the held-out part.
    """

    name = DIGITS_EXTRACTOR_NAME

    def __init__(self, image_size: int):
        super().__init__()
        self.image_size = int(image_size)
        classifier = fit_classifier(self.image_size)
        self.hidden = nn.Linear(self.image_size**2, NUM_FEATURES).double()
        self.output = nn.Linear(NUM_FEATURES, len(classifier.classes_)).double()
        with torch.no_grad():
            for layer, weight, bias in (
                (self.hidden, classifier.coefs_[0], classifier.intercepts_[0]),
                (self.output, classifier.coefs_[1], classifier.intercepts_[1]),
            ):
                layer.weight.copy_(torch.from_numpy(weight.T))
                layer.bias.copy_(torch.from_numpy(bias))
        self.requires_grad_(False)
        digest = hashlib.sha256()
        for tensor in self.state_dict().values():
            digest.update(tensor.numpy().tobytes())
        self.fingerprint = digest.hexdigest()[:16]
        split = judge_split(self.image_size)
        self.accuracy = float(classifier.score(flatten_unit(split.held_out), split.held_out_labels.numpy()))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"this digits extractor was fitted at {self.image_size}x{self.image_size}, "
                f"got images of {tuple(images.shape[-2:])}; build DigitsFeatures({images.shape[-1]})"
            )
        flatten_unit(images[:1])  # checks dtype and shape
        weight = self.hidden.weight
        x = images.reshape(len(images), -1).to(device=weight.device, dtype=weight.dtype) / 255.0
        features = torch.relu(self.hidden(x))
        return features.float().to(images.device), self.output(features).float().to(images.device)

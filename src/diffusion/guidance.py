"""Guided sampling of class-conditional models, and the label dropout that trains them.

- Classifier-free guidance (Ho & Salimans 2022): eps = (1 + w) eps(x_t, t, y) - w eps(x_t, t, null),
  one network call on a batch of 2N (conditional and null halves).
- Classifier guidance (Dhariwal & Nichol 2021): `cond_fn(x_t, t, y) = s * grad_x log p(y | x_t)`, which
  the samplers add to the mean (ancestral, Alg. 1) or subtract from eps (DDIM, Alg. 2).

`Guidance` is what a sampling entry point guides towards (labels, scales, classifier), checked on construction.
Pure torch, like the rest of src.diffusion: the network and the classifier are arguments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .gaussian_diffusion import Model

# cond_fn(x_t [N x C x H x W], t [N]) -> [N x C x H x W]: the scaled gradient s * grad_x log p(y | x_t) of
# the labels it was made for, with t the original (not respaced) timestep.
CondFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# classifier(x_t, t) -> logits [N x K] of p(y | x_t).
Classifier = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_labels(y: torch.Tensor, num_classes: int) -> None:
    """Labels must be class indices 0..num_classes-1 (the null label is not a class to sample)."""
    if y.dtype not in (torch.int64, torch.int32) or y.ndim != 1:
        raise ValueError(f"labels must be a 1-D integer tensor, got {y.dtype} of shape {tuple(y.shape)}")
    if y.numel() and not 0 <= int(y.min()) <= int(y.max()) < num_classes:
        raise ValueError(
            f"labels must lie in 0..{num_classes - 1} (the model has {num_classes} classes), got "
            f"{int(y.min())}..{int(y.max())}"
        )


def drop_labels(y: torch.Tensor, p: float, null: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """y with each label replaced by `null` with probability p (classifier-free guidance training)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"label dropout must be in [0, 1], got {p}")
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, null), y)


class ClassifierFreeGuidance:
    """`model` with classifier-free guidance at scale w: called as model(x_t, t, y=labels).

    The guided combination is applied to the first C channels only (the mean parameterisation);
    a learned variance (channels C..2C) is taken from the conditional pass, as in GLIDE and improved
    diffusion's followers. For x0, mu or v predictions the same affine combination equals guiding eps,
    because eps is affine in each of them at fixed x_t (e.g. eps = sigma_t x_t + alpha_t v) with
    coefficients that do not depend on y, and the weights (1 + w) and -w sum to 1.
    """

    def __init__(self, model: Model, guidance_scale: float):
        # The null label is num_classes (src.models.UNet's convention).
        self.model, self.w, self.null = model, float(guidance_scale), int(model.num_classes)

    def __call__(self, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if y is None:
            raise ValueError("classifier-free guidance needs class labels y")
        out = self.model(
            torch.cat([xt, xt]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, self.null)]), **kwargs
        )
        cond, uncond = out.chunk(2)
        c = xt.shape[1]
        guided = (1.0 + self.w) * cond[:, :c] - self.w * uncond[:, :c]
        return torch.cat([guided, cond[:, c:]], dim=1)


def classifier_guidance(classifier: Classifier, scale: float, y: torch.Tensor) -> CondFn:
    """cond_fn for the samplers: s * grad_x log softmax(classifier(x_t, t))[y], by autograd through the
    classifier (x_t [N x C x H x W], timesteps [N] -> logits [N x K])."""

    def cond_fn(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = xt.detach().requires_grad_(True)
            logits = classifier(x, t)
            log_probs = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            selected = log_probs[torch.arange(len(y), device=y.device), y]
            (grad,) = torch.autograd.grad(selected.sum(), x)
        return scale * grad.to(xt.dtype)

    return cond_fn


def guide(
    model: Model,
    y: torch.Tensor | None,
    guidance_scale: float = 0.0,
    classifier: Classifier | None = None,
    classifier_scale: float = 1.0,
    model_kwargs: dict | None = None,
) -> tuple[Model, dict | None, CondFn | None]:
    """What a sampler runs with: (model, model_kwargs, cond_fn).

    A class-conditional model (one with `num_classes`) gets the labels y in its kwargs (none: it samples
    unconditionally) and is wrapped for classifier-free guidance when guidance_scale != 0; with a
    classifier, cond_fn pulls the samples towards y (this also works with an unconditional model).
    """
    num_classes = getattr(model, "num_classes", None)
    if guidance_scale and num_classes is None:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs a class-conditional model (model.num_classes set, "
            f"trained with label dropout); this model is unconditional: use guidance_scale=0"
        )
    if y is None:
        if guidance_scale or classifier is not None:
            raise ValueError("guided sampling needs class labels y to guide towards")
        return model, model_kwargs, None
    if num_classes is not None:
        check_labels(y, int(num_classes))
        model_kwargs = {**(model_kwargs or {}), "y": y}
    elif classifier is None:
        raise ValueError(
            "labels were given but the model is unconditional (no num_classes); sample without labels, "
            "add a classifier for classifier guidance, or use a class-conditional checkpoint"
        )
    if guidance_scale:
        model = ClassifierFreeGuidance(model, guidance_scale)
    cond_fn = classifier_guidance(classifier, classifier_scale, y) if classifier is not None else None
    return model, model_kwargs, cond_fn


@dataclass(frozen=True, eq=False)
class Guidance:
    """y: class labels [N] of a class-conditional model (None: unconditional samples).
    scale: classifier-free guidance weight w, eps = (1 + w) eps(x_t, y) - w eps(x_t) (0: none).
    classifier(x_t, t) -> logits with classifier_scale s: classifier guidance (Dhariwal & Nichol 2021).
    """

    y: torch.Tensor | None = None
    scale: float = 0.0
    classifier: Classifier | None = None
    classifier_scale: float = 1.0

    def __post_init__(self):
        for name in ("scale", "classifier_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"guidance {name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))

    def for_labels(self, y: torch.Tensor | None) -> Guidance:
        """The same guidance towards other labels (one batch of a larger labelled run)."""
        return dataclasses.replace(self, y=y)


NO_GUIDANCE = Guidance()

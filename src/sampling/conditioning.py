"""Guided sampling from checkpoints (sample.py and evaluate.py): the classifier of classifier guidance,
the labels of per-class grids and the checks that turn bad guidance settings into one-line errors."""

from __future__ import annotations

import os

import torch
from omegaconf import OmegaConf
from torch import nn

from src.checkpoints import module_from_checkpoint, read_checkpoint, run_config
from src.diffusion import GaussianDiffusion
from src.errors import ConfigError


def load_classifier(
    ckpt_path: str | os.PathLike, diffusion: GaussianDiffusion, image_shape: tuple[int, int, int], device: torch.device
) -> nn.Module:
    """The EMA classifier of a task=classifier checkpoint, checked against the diffusion model it guides
    (same schedule, same image shape), in eval mode on `device`."""
    ckpt = read_checkpoint(ckpt_path)
    module = module_from_checkpoint(ckpt, "classifier", source=f"classifier.ckpt_path={ckpt_path}")
    cfg = run_config(ckpt)
    del ckpt
    net = module.ema.model
    if net.image_shape != tuple(image_shape):
        raise ConfigError(
            f"the classifier takes images of shape {net.image_shape} but the diffusion model makes "
            f"{tuple(image_shape)}; train the classifier on the diffusion model's data"
        )
    theirs, ours = module.diffusion.alphas_cumprod, diffusion.alphas_cumprod.cpu()
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-6, atol=0):
        raise ConfigError(
            f"the classifier was trained on the noise of another schedule (its {cfg.schedule.get('name')} "
            f"T={len(theirs)}, betas {float(module.diffusion.betas[0]):.4g}.."
            f"{float(module.diffusion.betas[-1]):.4g}; the diffusion model's T={len(ours)}, betas "
            f"{float(diffusion.betas[0]):.4g}..{float(diffusion.betas[-1]):.4g}); train it with the "
            f"diffusion checkpoint's schedule"
        )
    return net.to(device).eval()


def check_guidance(
    num_classes: int | None,
    guidance_scales: list[float],
    classifier: bool,
    class_label: int | None = None,
    null_label: bool = True,
) -> None:
    """One-line errors for guidance that the diffusion checkpoint cannot do."""
    if num_classes is None and any(w != 0 for w in guidance_scales):
        raise ConfigError(
            f"classifier-free guidance (guidance_scale={guidance_scales}) needs a class-conditional "
            f"checkpoint (trained with model.num_classes); this one is unconditional: drop the guidance "
            f"scale, or use classifier guidance (classifier.ckpt_path=...)"
        )
    if num_classes is not None and not null_label and any(w != 0 for w in guidance_scales):
        raise ConfigError(
            f"classifier-free guidance (guidance_scale={guidance_scales}) needs the unconditional model "
            f"of a null label, and this checkpoint's net has none (model.null_label=false, as ADM's "
            f"released nets): use guidance scale 0, or classifier guidance (classifier.ckpt_path=...)"
        )
    if class_label is not None:
        if num_classes is None and not classifier:
            raise ConfigError(
                f"class_label={class_label} needs a class-conditional checkpoint or a classifier "
                f"(classifier.ckpt_path=...); this checkpoint is unconditional"
            )
        if (
            isinstance(class_label, bool)
            or not isinstance(class_label, int)
            or class_label < 0
            or (num_classes is not None and class_label >= num_classes)
        ):
            top = f"0..{num_classes - 1}" if num_classes is not None else "a class index >= 0"
            raise ConfigError(f"class_label={class_label!r} is not a class of the checkpoint; use {top}")


def check_classifier_classes(classifier: nn.Module, num_classes: int | None, class_label: int | None) -> int:
    """The number of classes to sample from with classifier guidance (the classifier's), which must agree with
    a class-conditional diffusion model's."""
    k = int(classifier.num_classes)
    if num_classes is not None and k != num_classes:
        raise ConfigError(
            f"the classifier has {k} classes but the diffusion model {num_classes}; use a classifier "
            f"trained on the same data"
        )
    if class_label is not None and class_label >= k:
        raise ConfigError(f"class_label={class_label} is not a class of the classifier; use 0..{k - 1}")
    return k


def grid_labels(num_classes: int, per_class: int, class_label: int | None = None) -> torch.Tensor:
    """Labels of a per-class grid, row by row: per_class images of each class (or of class_label only)."""
    classes = torch.arange(num_classes) if class_label is None else torch.tensor([class_label])
    return classes.repeat_interleave(per_class)


def balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """0, 1, ..., K-1, 0, 1, ...: every class equally often (up to one), as the class-balanced data."""
    return torch.arange(num_samples) % num_classes


def guidance_scales(
    value,
    num_classes: int | None,
    null_label: bool = True,
    run_scale: float | None = None,
    fallback: tuple[float, ...] = (0.0, 1.0, 3.0),
) -> list[float]:
    """The scales to sample with: the configured list (a number counts as one); when not configured, the run's
    own `guidance_scale` (its train config, e.g. the digits quickstart's) if it set one, else `fallback` for a
    class-conditional checkpoint with a null label and [0] otherwise."""
    if value is None:
        if num_classes is not None and run_scale is not None:
            return [float(run_scale)]
        return list(fallback) if num_classes is not None and null_label else [0.0]
    values = list(value) if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value]
    try:
        return [float(w) for w in values]
    except (TypeError, ValueError):
        raise ConfigError(f"guidance scales must be numbers, got {value!r}") from None


def per_class_rows(images: torch.Tensor, labels: torch.Tensor, num_classes: int, per_row: int) -> torch.Tensor:
    """[K * per_row, C, H, W]: the first per_row images of each class, one class after the other (a grid
    with nrow=per_row shows one row per class). Classes with fewer images are padded with blank ones."""
    rows = []
    for k in range(num_classes):
        picked = images[labels == k][:per_row]
        pad = images.new_zeros((per_row - len(picked), *images.shape[1:]))
        rows.append(torch.cat([picked, pad]))
    return torch.cat(rows)

"""Image grids, the one place that lays images out and writes them as PNG (sample.py, evaluate.py and the
training grids): uint8 images or images in [-1, 1] in rows, trajectories as one row per sample, and grids a
person can judge by eye: small images (16x16 digits) are enlarged by an integer factor with nearest-neighbour
sampling, so every pixel stays one flat block and nothing is smoothed or invented."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Literal

import torch
from torchvision.utils import make_grid, save_image

from src.atomic import write_bytes as atomic_write_bytes
from src.diffusion import Trajectory


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """A [C x H' x W'] grid in [0, 1] for save_image from uint8 images or images in [-1, 1] (values outside are
    clipped): [N x C x H x W] in rows of `nrow` (default about sqrt(N)), or [R x S x C x H x W] as R rows of S."""
    if images.dtype == torch.uint8:
        images = images.detach().float().div(255.0).cpu()
    else:
        images = images.detach().float().clamp(-1.0, 1.0).add(1.0).div(2.0).cpu()
    if images.ndim == 5:
        nrow = images.shape[1]
        images = images.flatten(0, 1)
    elif images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W] or [R, S, C, H, W], got shape {tuple(images.shape)}")
    if nrow is None:
        nrow = max(1, math.ceil(math.sqrt(images.shape[0])))
    return make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)


def trajectory_grid(
    trajectory: Trajectory, which: Literal["pred_x0", "xt"] = "pred_x0", padding: int = 2, pad_value: float = 1.0
) -> torch.Tensor:
    """The trajectory as a [C x H' x W'] grid in [0, 1]: one row per sample, one column per recorded step
    (left to right in sampling order); `which` picks the predicted x_0 (DDPM Fig. 6) or the states x_t."""
    if which not in ("pred_x0", "xt"):
        raise ValueError(f"which must be 'pred_x0' or 'xt', got {which!r}")
    return image_grid(getattr(trajectory, which), padding=padding, pad_value=pad_value)


def display_scale(image_size: int, min_image_size: int | None) -> int:
    """The integer factor that makes an image of side image_size at least min_image_size (1: as it is)."""
    if min_image_size is None or min_image_size <= image_size:
        return 1
    return math.ceil(min_image_size / image_size)


def enlarge(grid: torch.Tensor, image_size: int, min_image_size: int | None) -> torch.Tensor:
    """A grid [C x H x W] (or a batch of grids) with every pixel repeated display_scale(...) times in both
    directions, so each image in it is at least min_image_size pixels wide (None or 0: unchanged)."""
    scale = display_scale(image_size, min_image_size)
    if scale == 1:
        return grid
    return grid.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)


def save_grid_png(
    grid: torch.Tensor,
    path: str | Path,
    image_size: int,
    min_image_size: int | None,
    raw_path: str | Path | None = None,
) -> torch.Tensor:
    """Write the grid [C x H x W] in [0, 1] enlarged for viewing to `path` (and as it is to raw_path when
    given); returns the written (enlarged) grid."""
    shown = enlarge(grid, image_size, min_image_size)
    for target, image in ((path, shown), (raw_path, grid)):
        if target is not None:  # encoded in memory, then written atomically (never a truncated PNG)
            buffer = io.BytesIO()
            save_image(image, buffer, format="png")
            atomic_write_bytes(target, buffer.getvalue())
    return shown


def save_grid(
    images: torch.Tensor, path: str | Path, nrow: int | None = None, min_image_size: int | None = None
) -> Path:
    """uint8 [N, C, H, W] -> a PNG grid (nrow defaults to floor(sqrt(N))), images enlarged to at least
    min_image_size pixels."""
    grid = image_grid(images, nrow=nrow or max(1, int(images.shape[0] ** 0.5)))
    save_grid_png(grid, path, images.shape[-1], min_image_size)
    return Path(path)

"""Image grids a person can judge by eye: small images (16x16 digits) are enlarged by an integer factor with
nearest-neighbour sampling, so every pixel stays one flat block and nothing is smoothed or invented."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from torchvision.utils import save_image

from .atomic import write_bytes as atomic_write_bytes


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

"""Pixel conversions shared by the datasets.

Images are stored as uint8 (memory and exactness) and mapped to [-1, 1] only when an item is read,
with v / 127.5 - 1 so the model sees exactly the 256-level grid that the discretized likelihood
(bits/dim with bins of width 2/255) assumes.
"""

import numpy as np
import torch
import torch.nn.functional as F

from src.errors import ConfigError


def uint8_to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape) -> float32 in [-1, 1] via v / 127.5 - 1."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 tensor, got {images.dtype}")
    return images.to(torch.float32) / 127.5 - 1.0


def signed_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Inverse of uint8_to_signed (rounds and clamps), for saving images."""
    return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def unit_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [0, 1] -> uint8 [0, 255], rounded to the nearest level."""
    return (x * 255.0).round().clamp(0, 255).to(torch.uint8)


def resize_unit(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of float images [N, C, H, W] to size x size.

    Antialiasing is switched on only when shrinking: when enlarging it changes nothing, and when
    shrinking without it bilinear interpolation aliases fine strokes.
    """
    if images.shape[-2:] == (size, size):
        return images
    downsampling = size < min(images.shape[-2:])
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=downsampling)


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of uint8 images [N, C, H, W], re-quantized to uint8 once."""
    if images.shape[-2:] == (size, size):
        return images
    return unit_to_uint8(resize_unit(images.to(torch.float32) / 255.0, size))


def maybe_hflip(image: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Flip a [C, H, W] image left-right with probability 1/2 when enabled.

    torch's global RNG is used on purpose: DataLoader seeds it differently in every worker, so the
    flips are independent across workers and reproducible under a fixed seed.
    """
    if enabled and torch.rand(()) < 0.5:
        return image.flip(-1)
    return image


def nhwc_to_tensor(array: np.ndarray, what: str) -> torch.Tensor:
    """uint8 [N, H, W, C] (the openai npz convention) -> uint8 [N, C, H, W], or a one-line error."""
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ConfigError(
            f"{what}: arr_0 must be uint8 images [N, H, W, 1 or 3] (openai's npz convention), got "
            f"{array.dtype} {array.shape}"
        )
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()

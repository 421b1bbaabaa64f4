"""Drawing many samples in batches as uint8, and writing / reading them as an .npz (openai's format)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from src.atomic import savez as atomic_savez
from src.data.transforms import nhwc_to_tensor, signed_to_uint8
from src.diffusion import NO_GUIDANCE, Guidance, SamplerOptions
from src.errors import ConfigError

log = logging.getLogger(__name__)


def sample_uint8_batches(
    module,
    num_samples: int,
    batch_size: int,
    options: SamplerOptions,
    guidance: Guidance = NO_GUIDANCE,
    generator: torch.Generator | None = None,
    progress: bool = False,
    labels: torch.Tensor | None = None,
    image_seed_start: int | None = None,
    use_ema: bool = True,
    progress_bar: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield uint8 images [B, C, H, W] from `module.sample` (EMA weights, or the trained ones with
    use_ema=False), num_samples in all; with labels
    [num_samples], image i is drawn for class labels[i] (with `guidance`'s scales).

    One generator runs through all batches, so a seed fixes the whole sample set. With image_seed_start,
    the batch starting at image i draws from a generator seeded with image_seed_start + i instead (the
    seed ranges of src.evaluation.protocol). `progress` logs each batch; `progress_bar` shows the sampling steps.
    """
    if generator is not None and image_seed_start is not None:
        raise ValueError("give either a generator or image_seed_start, not both")
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    done = 0
    while done < num_samples:
        n = min(batch_size, num_samples - done)
        if image_seed_start is not None:
            generator = torch.Generator(device=module.device).manual_seed(image_seed_start + done)
        if labels is not None:
            guidance = guidance.for_labels(labels[done : done + n].to(module.device))
        images = module.sample(n, options, guidance, generator=generator, use_ema=use_ema, progress=progress_bar)
        done += n
        if progress:
            log.info("sampled %d / %d", done, num_samples)
        yield signed_to_uint8(images)


def save_npz(images: torch.Tensor, dirpath: str | Path, labels: torch.Tensor | None = None) -> Path:
    """uint8 [N, C, H, W] -> <dirpath>/samples_NxHxWxC.npz with `arr_0` uint8 [N, H, W, C] (openai's format)
    and, for class-conditional samples, `arr_1` int64 [N]: the label each image was drawn for."""
    array = images.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    if array.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {array.dtype}")
    path = Path(dirpath) / f"samples_{'x'.join(str(d) for d in array.shape)}.npz"
    if labels is None:
        return atomic_savez(path, arr_0=array)
    return atomic_savez(path, arr_0=array, arr_1=labels.cpu().numpy().astype(np.int64))


def load_npz(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An npz of samples from any project (uint8 NHWC `arr_0`, optional int `arr_1` labels) -> (uint8
    [N, C, H, W], labels [N] or None); a one-line ConfigError for anything else."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"samples={path}: no such file; give the .npz of samples (uint8 NHWC arr_0)")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "arr_0" not in data.files:
                raise ConfigError(f"samples={path} has no arr_0 (uint8 NHWC images); found {data.files}")
            images = nhwc_to_tensor(data["arr_0"], f"samples={path}")
            labels = data["arr_1"] if "arr_1" in data.files else None
    except (OSError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"samples={path} is not a readable .npz ({type(err).__name__}: {err})") from None
    if labels is not None:
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ConfigError(
                f"samples={path}: arr_1 must be integer labels [{len(images)}], got {labels.dtype} {labels.shape}"
            )
        labels = torch.from_numpy(labels.astype(np.int64))
    return images, labels

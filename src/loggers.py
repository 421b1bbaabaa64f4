"""Lightning loggers outside and inside the Trainer: building them from the `logger` config group, handing a
written PNG to every logger that takes images (W&B, TensorBoard), and closing the W&B run.

Used by training (src.training, src.callbacks.sample_grid) and by evaluate.py (src.evaluation.log_results).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig

from src.builders import instantiate_group


def build_loggers(group: DictConfig | None) -> list:
    """Every logger of the `logger` group (entries set to null are off)."""
    loggers = instantiate_group(group, "logger")
    for logger in loggers:
        # Lightning's WandbLogger passes anonymous=None to wandb.init, and wandb (0.19+) then prints "The
        # anonymous setting has no effect"; leaving it out is the same setting.
        init = getattr(logger, "_wandb_init", None)
        if isinstance(logger, WandbLogger) and isinstance(init, dict) and init.get("anonymous", "") is None:
            del init["anonymous"]
    return loggers


def finish_wandb(loggers: list) -> None:
    """Close the W&B run: the jobs of a Hydra multirun share one process, and without this each job after
    the first would log into the first job's run."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()


def log_png(loggers: list, key: str, path: Path, step: int, image: torch.Tensor | None = None) -> None:
    """Log the PNG at `path` under `key`: W&B gets the file as written (8-bit, exactly what is on disk);
    TensorBoard gets `image` (float [C, H, W] in [0, 1]) or, without it, the PNG's pixels. Loggers that take
    no images (CSV) are skipped."""
    for logger in loggers:
        log_image = getattr(logger, "log_image", None)  # W&B
        if log_image is not None:
            log_image(key=key, images=[str(path)], step=step)
            continue
        add_image = getattr(getattr(logger, "experiment", None), "add_image", None)  # TensorBoard
        if add_image is None:
            continue
        if image is None:
            from PIL import Image

            with Image.open(path) as png:
                add_image(key, np.asarray(png.convert("RGB")), global_step=step, dataformats="HWC")
        else:
            add_image(key, image, global_step=step)

"""PNG sample grids from fixed noise during training."""

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from src.diffusion import Guidance, SamplerOptions
from src.loggers import log_png
from src.sampling.conditioning import grid_labels
from src.sampling.grids import display_scale, image_grid, save_grid_png

from .preemption import interruptible_sampling

log = logging.getLogger(__name__)


class SampleGridCallback(L.Callback):
    """Every `every_n_steps` optimizer steps and at the end of training, sample `num_samples` images
    with the EMA weights from the same seed (so successive grids show the same noise maturing), write
    `<dirpath>/step_<N>.png` and hand the grid to every logger that takes images. Images smaller than
    `min_image_size` pixels are enlarged by an integer factor (nearest neighbour) in that PNG and in the
    logged image, so a grid of 16x16 digits can be judged by eye; `<dirpath>/raw/step_<N>.png` keeps the
    grid at the images' own size (min_image_size null: only the raw-size grid, under the first name).

    `sampler` holds the sampler options (src.diffusion.SamplerOptions: sampler, steps, spacing, eta, ...).
    A class-conditional net draws one row per class (num_samples // classes images each), guided with
    `guidance_scale` (classifier-free; None: 0).
    Runs on rank zero only; `every_n_steps <= 0` keeps only the final grid. A stop signal (SIGTERM, SIGUSR1,
    Ctrl+C) during the sampling ends it at once (src.callbacks.preemption.interruptible_sampling); after one,
    no grid is started.
    """

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int,
        num_samples: int,
        seed: int,
        sampler: dict | None,
        min_image_size: int | None,
        on_train_end: bool,
        nrow: int | None = None,
        guidance_scale: float | None = None,
    ):
        super().__init__()
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.dirpath = Path(dirpath)
        self.every_n_steps, self.num_samples, self.seed = every_n_steps, num_samples, seed
        self.nrow = nrow or max(1, int(num_samples**0.5))
        self.at_train_end = on_train_end
        self.min_image_size = min_image_size
        self.options = SamplerOptions.from_mapping(sampler)
        self.guidance_scale = 0.0 if guidance_scale is None else guidance_scale
        self.last_path: Path | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and not trainer.fast_dev_run:
            self.write_grid(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.at_train_end:
            self.write_grid(trainer, pl_module)

    def _layout(self, num_classes: int | None, device) -> tuple[int, int, Guidance]:
        """(images, images per row, guidance): a square grid, or one row per class of a class-conditional net."""
        if num_classes is None:
            return self.num_samples, self.nrow, Guidance()
        per_class = max(1, self.num_samples // num_classes)
        labels = grid_labels(num_classes, per_class).to(device)
        return len(labels), per_class, Guidance(y=labels, scale=self.guidance_scale)

    @rank_zero_only
    def write_grid(self, trainer: L.Trainer, pl_module) -> Path | None:
        step = trainer.global_step
        path = self.dirpath / f"step_{step:07d}.png"
        if path == self.last_path:  # the end-of-training grid coincides with a periodic one
            return path
        if trainer.received_sigterm:
            log.info("stopping: no sample grid at step %d", step)
            return None
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        num_samples, nrow, guidance = self._layout(getattr(pl_module.net, "num_classes", None), pl_module.device)
        with interruptible_sampling(trainer):
            images = pl_module.sample(num_samples, self.options, guidance, generator=generator)
        grid = image_grid(images, nrow=nrow)
        raw = self.dirpath / "raw" / path.name if display_scale(images.shape[-1], self.min_image_size) > 1 else None
        grid = save_grid_png(grid, path, images.shape[-1], self.min_image_size, raw_path=raw)
        self.last_path = path
        log_png(trainer.loggers, "samples", path, step, image=grid)
        return path

"""Training throughput in images per second."""

import logging
import time
from collections import deque

import lightning as L
import torch

log = logging.getLogger(__name__)


class ThroughputCallback(L.Callback):
    """Logs `train/images_per_sec`: images of all processes per second of training step (forward,
    backward, optimizer step, EMA update), averaged over the last `window` steps, and a summary line at
    the end of training.

    The step is timed from this callback's `on_train_batch_start` to its `on_train_batch_end`, so list
    it before callbacks that do heavy work at batch end (sample grids, FID); data loading and
    validation are not counted. On GPUs the clock waits for the device (one synchronisation per step).
    """

    def __init__(self, window: int = 20):
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = deque(maxlen=window)
        self.total_images, self.total_seconds = 0, 0.0
        self._start: float | None = None

    @staticmethod
    def _now(device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = self._now(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._start is None:
            return
        seconds = self._now(pl_module.device) - self._start
        self._start = None
        images = batch[0].shape[0] * trainer.world_size  # per-process batch x processes
        self.window.append((images, seconds))
        self.total_images += images
        self.total_seconds += seconds
        rate = sum(n for n, _ in self.window) / max(sum(s for _, s in self.window), 1e-9)
        pl_module.log("train/images_per_sec", rate, on_step=True, on_epoch=False, rank_zero_only=True)

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero and self.total_seconds > 0:
            log.info(
                "training throughput: %.1f images/s (%d images in %.1f s of training steps)",
                self.total_images / self.total_seconds,
                self.total_images,
                self.total_seconds,
            )

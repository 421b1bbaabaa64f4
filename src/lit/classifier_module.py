"""The LightningModule of task=classifier: a classifier of noisy images x_t for classifier guidance."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from src.diffusion import GaussianDiffusion

from .ema_trained import EMATrainedModule
from .optim import check_lr_schedule


class ClassifierModule(EMATrainedModule):
    """Trains `net(x_t, t) -> logits` on images noised by `diffusion`'s forward process at uniformly drawn
    t (Dhariwal & Nichol 2021), and keeps an EMA of its weights for validation and guidance.

    Args:
        net: the classifier (e.g. src.models.NoisyClassifier).
        diffusion: the GaussianDiffusion whose q(x_t | x_0) noises the images; guidance must use a
            diffusion model with the same schedule.
        optimizer: a partial taking `params` (Hydra `_partial_: true`).
        lr_warmup_steps: linear learning-rate warm-up from 0 over this many optimizer steps.
        lr_schedule: after the warm-up, "constant" or "cosine" (down to 0 at trainer.max_steps).
        ema_decay: EMA decay of the weights used for validation and guidance.
        run_config: the resolved run config, saved in the checkpoint so the classifier can be rebuilt.
    """

    def __init__(
        self,
        net: nn.Module,
        diffusion: GaussianDiffusion,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_warmup_steps: int,
        ema_decay: float,
        lr_schedule: str = "constant",
        run_config: dict | None = None,
    ):
        super().__init__(net, ema_decay)
        check_lr_schedule(lr_schedule)
        self.save_hyperparameters(ignore=["net", "diffusion"])
        self.diffusion = diffusion

    def forward(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(xt, t)

    def _losses(
        self, net: nn.Module, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = net(self.diffusion.q_sample(x0, t, noise), t)
        return F.cross_entropy(logits, y), (logits.argmax(dim=1) == y).float().mean()

    def training_step(self, batch, batch_idx):
        x0, y = batch
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=x0.device)
        loss, accuracy = self._losses(self.net, x0, y, t, torch.randn_like(x0))
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", accuracy)
        return loss

    def validation_step(self, batch, batch_idx):
        x0, y = batch
        # Fixed t and noise per batch index, so validation curves compare like with like.
        gen = torch.Generator(device=x0.device).manual_seed(batch_idx)
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=x0.device, generator=gen)
        loss, accuracy = self._losses(self.ema.model, x0, y, t, torch.randn(x0.shape, device=x0.device, generator=gen))
        # and on the clean images (t = 0), the easiest case
        _, clean = self._losses(self.ema.model, x0, y, torch.zeros_like(t), torch.zeros_like(x0))
        self.log_dict({"val/loss": loss, "val/acc": accuracy, "val/acc_t0": clean}, prog_bar=True, sync_dist=True)

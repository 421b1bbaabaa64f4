"""The LightningModule: network + diffusion math + EMA + optimisation."""
from typing import Callable

import lightning as L
import torch
from torch import nn

from src.diffusion import GaussianDiffusion, LossSecondMomentResampler, UniformSampler, sample

from .ema import EMA


class DiffusionModule(L.LightningModule):
    """Trains `net` as the denoiser of `diffusion` and keeps an EMA of its weights for sampling.

    Args:
        net: the network, called as net(x_t, t) (e.g. src.models.UNet).
        diffusion: the GaussianDiffusion that defines the objective.
        timestep_sampler: UniformSampler or LossSecondMomentResampler (importance sampling of t).
        optimizer: a partial taking `params` (Hydra `_partial_: true`), e.g. torch.optim.Adam(lr=2e-4).
        lr_warmup_steps: linear learning-rate warm-up from 0 over this many optimizer steps.
        ema_decay: EMA decay of the weights used for validation and sampling.
        run_config: the resolved run config, saved in the checkpoint so a run can be rebuilt from it.
    """

    def __init__(
        self,
        net: nn.Module,
        diffusion: GaussianDiffusion,
        timestep_sampler: UniformSampler,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_warmup_steps: int = 0,
        ema_decay: float = 0.9999,
        run_config: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["net", "diffusion", "timestep_sampler"])
        if timestep_sampler.num_timesteps != diffusion.num_timesteps:
            raise ValueError(f"timestep sampler has T={timestep_sampler.num_timesteps} but the diffusion has "
                             f"T={diffusion.num_timesteps}")
        self.net = net
        self.diffusion = diffusion
        self.timestep_sampler = timestep_sampler
        self.ema = EMA(net, decay=ema_decay)

    def forward(self, xt: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.net(xt, t, **kwargs)

    # --- training ----------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x0 = batch[0]
        t, weights = self.timestep_sampler.sample(x0.shape[0], x0.device)
        losses = self.diffusion.training_losses(self.net, x0, t)
        if isinstance(self.timestep_sampler, LossSecondMomentResampler):
            # Every rank records every rank's losses so the sampling distribution stays identical.
            all_t, all_losses = self.all_gather((t, losses["loss"].detach()))
            self.timestep_sampler.update(all_t.reshape(-1), all_losses.reshape(-1))
        loss = (losses["loss"] * weights).mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/mse", losses["mse"].mean())
        self.log("train/vb", losses["vb"].mean())
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.net)

    def configure_optimizers(self):
        optimizer = self.hparams.optimizer(params=self.net.parameters())
        warmup = max(1, self.hparams.lr_warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- validation (EMA weights) -------------------------------------------------------------
    def validation_step(self, batch, batch_idx):
        x0 = batch[0]
        # Fixed t and noise per batch index, so validation curves compare like with like.
        gen = torch.Generator(device=x0.device).manual_seed(batch_idx)
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=x0.device, generator=gen)
        noise = torch.randn(x0.shape, device=x0.device, generator=gen)
        losses = self.diffusion.training_losses(self.ema.model, x0, t, noise=noise)
        # Cheap one-sample-per-image estimate of the NLL bound: T * E_t[L_t] + L_T.
        bpd = self.diffusion.num_timesteps * losses["vb"] + self.diffusion.prior_bpd(x0)
        self.log_dict({"val/loss": losses["loss"].mean(), "val/mse": losses["mse"].mean(),
                       "val/bpd": bpd.mean()}, prog_bar=True, sync_dist=True)

    # --- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None, use_ema: bool = True,
               **sampler_kwargs) -> torch.Tensor:
        """Images [N x C x H x W] in [-1, 1] from the EMA (default) or live weights; sampler_kwargs as in
        src.diffusion.sample (sampler, steps, spacing, eta, clip_denoised, progress)."""
        net = self.ema.model if use_ema else self.net
        shape = (num_samples, net.in_channels, net.image_size, net.image_size)
        return sample(self.diffusion, net, shape, generator=generator, device=self.device, **sampler_kwargs)

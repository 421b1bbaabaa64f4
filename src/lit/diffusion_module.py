"""The LightningModule of task=diffusion: the denoiser + diffusion math (EMA + optimisation: EMATrainedModule)."""

import logging
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from src.diffusion import (
    NO_GUIDANCE,
    GaussianDiffusion,
    Guidance,
    LossSecondMomentResampler,
    SamplerOptions,
    UniformSampler,
    drop_labels,
    sample,
)
from src.errors import NonFiniteLossError

from .ema_trained import EMATrainedModule
from .optim import check_lr_schedule

log = logging.getLogger(__name__)

# Checkpoint keys of the global random states (see DiffusionModule.on_save_checkpoint): rank zero's, and
# under DDP a list with every rank's.
RNG_STATES_KEY = "rng_states"
RNG_STATES_PER_RANK_KEY = "rng_states_per_rank"


class DiffusionModule(EMATrainedModule):
    """Trains `net` as the denoiser of `diffusion` and keeps an EMA of its weights for sampling.

    Args:
        net: the network, called as net(x_t, t) (e.g. src.models.UNet).
        diffusion: the GaussianDiffusion that defines the objective.
        timestep_sampler: UniformSampler or LossSecondMomentResampler (importance sampling of t).
        optimizer: a partial taking `params` (Hydra `_partial_: true`), e.g. torch.optim.Adam(lr=2e-4).
        lr_warmup_steps: linear learning-rate warm-up from 0 over this many optimizer steps.
        ema_decay: EMA decay of the weights used for validation and sampling.
        label_dropout: for a class-conditional net (one with `num_classes`), the probability of training
            on the null label instead of the image's, so the net also learns the unconditional model that
            classifier-free guidance needs (Ho & Salimans 2022). Unused for unconditional nets. Set by
            conf/task/diffusion.yaml; 0 for run configs written before it existed (they trained without).
        lr_schedule: after the warm-up, "constant" or "cosine" (a half cosine down to 0 at trainer.max_steps);
            "constant" for run configs written before it existed.
        run_config: the resolved run config, saved in the checkpoint so a run can be rebuilt from it.
    """

    def __init__(
        self,
        net: nn.Module,
        diffusion: GaussianDiffusion,
        timestep_sampler: UniformSampler,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_warmup_steps: int,
        ema_decay: float,
        label_dropout: float = 0.0,
        lr_schedule: str = "constant",
        run_config: dict | None = None,
    ):
        super().__init__(net, ema_decay)
        check_lr_schedule(lr_schedule)
        self.save_hyperparameters(ignore=["net", "diffusion", "timestep_sampler"])
        if timestep_sampler.num_timesteps != diffusion.num_timesteps:
            raise ValueError(
                f"timestep sampler has T={timestep_sampler.num_timesteps} but the diffusion has "
                f"T={diffusion.num_timesteps}"
            )
        if not 0.0 <= label_dropout <= 1.0:
            raise ValueError(f"label_dropout must be in [0, 1], got {label_dropout}")
        self.diffusion = diffusion
        self.timestep_sampler = timestep_sampler
        self._rng_before_validation: dict | None = None
        self._rank_stream_restored = False

    def forward(self, xt: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.net(xt, t, **kwargs)

    # --- training ----------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x0 = batch[0]
        t, weights = self.timestep_sampler.sample(x0.shape[0], x0.device)
        losses = self.diffusion.training_losses(self.net, x0, t, model_kwargs=self._labels(batch, dropout=True))
        loss = (losses["loss"] * weights).mean()
        # Checked here, before backward and the optimizer step, so a NaN never reaches the weights, the
        # EMA, the timestep sampler's history or a checkpoint.
        self._check_finite(loss)
        if isinstance(self.timestep_sampler, LossSecondMomentResampler):
            # Every rank records every rank's losses so the sampling distribution stays identical.
            all_t, all_losses = self.all_gather((t, losses["loss"].detach()))
            self.timestep_sampler.update(all_t.reshape(-1), all_losses.reshape(-1))
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/mse", losses["mse"].mean())
        self.log("train/vb", losses["vb"].mean())
        return loss

    def _labels(self, batch, dropout: bool = False) -> dict | None:
        """The net's label kwargs: None for an unconditional net, else the batch's labels (some replaced by
        the null label when training)."""
        num_classes = getattr(self.net, "num_classes", None)
        if num_classes is None:
            return None
        y = batch[1]
        if dropout and self.hparams.label_dropout > 0:
            y = drop_labels(y, self.hparams.label_dropout, null=num_classes)
        return {"y": y}

    def _check_finite(self, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss))
        if self._trainer is not None:
            # Under DDP one rank's NaN must stop every rank, or the others wait for it forever.
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        step = self.global_step + 1
        callback = self.trainer.checkpoint_callback if self._trainer is not None else None
        last = (callback.last_model_path or callback.best_model_path) if callback is not None else ""
        raise NonFiniteLossError(
            f"training loss is {loss.item()} (not finite) at optimizer step {step}; training stopped before that "
            f"update, nothing was saved after it; last good checkpoint: {last or 'none saved yet'}; resume from it "
            f"(ckpt_path=...) with a lower module.optimizer.lr or trainer.gradient_clip_val, or trainer.precision=32-true"
        )

    def on_train_start(self) -> None:
        # Every rank starts from the same random state (one seed), so each rank would draw the same t and
        # noise for its own images. Ranks above zero move to streams of their own, derived from the shared
        # state and the rank; rank zero, and a single process, keep drawing exactly what they would have.
        # A resume with the same number of ranks has already put every rank back on its own stream.
        if self.trainer.world_size > 1 and self.global_rank > 0 and not self._rank_stream_restored:
            _seed_rank_stream(self.global_rank)

    # --- validation (EMA weights) -------------------------------------------------------------
    # Validation runs outside the training's random stream: the validation DataLoader seeds its
    # iterator from the global RNG, and a run resumed from a checkpoint skips the validation that
    # followed the save, so without this the resumed run would draw different t and noise. It also
    # keeps the training trajectory independent of how often the run validates. The snapshot is taken
    # in the last hook before Lightning creates the validation iterator (the sanity check is isolated
    # by Lightning itself).
    def on_validation_model_zero_grad(self) -> None:
        super().on_validation_model_zero_grad()
        self._rng_before_validation = _collect_rng_states(self.device)

    def on_validation_end(self) -> None:
        if self._rng_before_validation is not None:
            _set_rng_states(self._rng_before_validation, self.device)
            self._rng_before_validation = None

    def validation_step(self, batch, batch_idx):
        x0 = batch[0]
        # Fixed t and noise per batch index, so validation curves compare like with like.
        gen = torch.Generator(device=x0.device).manual_seed(batch_idx)
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=x0.device, generator=gen)
        noise = torch.randn(x0.shape, device=x0.device, generator=gen)
        losses = self.diffusion.training_losses(self.ema.model, x0, t, noise=noise, model_kwargs=self._labels(batch))
        # Cheap one-sample-per-image estimate of the NLL bound: T * E_t[L_t] + L_T.
        bpd = self.diffusion.num_timesteps * losses["vb"] + self.diffusion.prior_bpd(x0)
        self.log_dict(
            {"val/loss": losses["loss"].mean(), "val/mse": losses["mse"].mean(), "val/bpd": bpd.mean()},
            prog_bar=True,
            sync_dist=True,
        )

    # --- checkpoints (exact resume) ----------------------------------------------------------
    # The weights, the EMA (with its update count), the timestep sampler's history (module extra
    # state), the optimizer, the LR schedule and the loop counters are restored by Lightning. The global
    # random states are not, yet they draw t, the noise and the data order: with them a resumed run
    # continues with exactly the numbers the uninterrupted run would have drawn.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Saved mid-validation (a stop signal during validation): the training stream is the snapshot
        # taken before validation started, not the current, validation-advanced state.
        states = self._rng_before_validation or _collect_rng_states(self.device)
        checkpoint[RNG_STATES_KEY] = states
        if self._trainer is not None and self.trainer.world_size > 1:
            # Every rank builds the checkpoint (rank zero writes it), so the gather is a collective that
            # every rank reaches.
            per_rank = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(per_rank, states)
            checkpoint[RNG_STATES_PER_RANK_KEY] = per_rank

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(RNG_STATES_KEY)
        if states is None:
            log.warning(
                "the checkpoint has no random states: the resumed run continues the model and optimizer "
                "exactly but draws other random numbers than an uninterrupted run would"
            )
            return
        world_size = self.trainer.world_size if self._trainer is not None else 1
        per_rank = checkpoint.get(RNG_STATES_PER_RANK_KEY)
        if world_size > 1 and per_rank is not None and len(per_rank) == world_size:
            _set_rng_states(per_rank[self.global_rank], self.device)
            self._rank_stream_restored = True
            return
        if world_size > 1 and self.global_rank == 0:
            saved = len(per_rank) if per_rank is not None else 1
            log.warning(
                "the checkpoint holds the random states of %d rank(s), this run has %d: rank zero continues "
                "its stream exactly, the other ranks start new streams of their own",
                saved,
                world_size,
            )
        _set_rng_states(states, self.device)

    # --- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        options: SamplerOptions = SamplerOptions(),
        guidance: Guidance = NO_GUIDANCE,
        *,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
        progress: bool = False,
    ) -> torch.Tensor:
        """Images [N x C x H x W] in [-1, 1] from the EMA (default) or live weights, drawn with `options` and
        `guidance` (labels [N] on this module's device) as in src.diffusion.sample."""
        net = self.ema.model if use_ema else self.net
        return sample(
            self.diffusion,
            net,
            (num_samples, *net.image_shape),
            options,
            guidance,
            generator=generator,
            device=self.device,
            progress=progress,
        )


def _collect_rng_states(device: torch.device) -> dict[str, Any]:
    """The global random states of torch (CPU and `device` if CUDA), numpy and Python.

    Only the CUDA generator of this process's device is kept (under DDP rank k draws from device k).
    Under DDP the checkpoint holds every rank's states, and a resume with the same number of ranks puts
    each rank back on its own stream; with another number, rank zero continues exactly and the other
    ranks get fresh streams (see on_train_start).
    """
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        states["torch.cuda"] = torch.cuda.get_rng_state(device)
    return states


def _seed_rank_stream(rank: int) -> None:
    """Reseed torch (CPU and CUDA), numpy and Python from the current shared state and `rank`."""
    shared = int(torch.randint(0, 2**62, (1,)))
    seed = int(np.random.SeedSequence([shared, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if device.type == "cuda" and "torch.cuda" in states:
        torch.cuda.set_rng_state(states["torch.cuda"], device)

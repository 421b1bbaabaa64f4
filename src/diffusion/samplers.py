"""The sampler registry: a sampler is one reverse-step function and one entry in SAMPLERS.

A step function takes the (possibly respaced) diffusion, the network, the current state x at the
0-based index t of that diffusion and what the run was configured with, and returns
dict(sample=x at the next index, pred_x0=the x_0 it predicted). `state` is a dict that lives for one
reverse run, for samplers that keep a history (multistep solvers); single-step samplers ignore it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import torch

from .gaussian_diffusion import GaussianDiffusion, Model
from .guidance import CondFn

if TYPE_CHECKING:
    from .options import SamplerOptions

# randn_like(x): standard normal noise shaped like x (a sampler's only source of randomness).
RandnLike = Callable[[torch.Tensor], torch.Tensor]


class StepFn(Protocol):
    def __call__(self, diff: GaussianDiffusion, model: Model, x: torch.Tensor, t: torch.Tensor, *,
                 options: SamplerOptions, randn_like: RandnLike, model_kwargs: dict | None,
                 cond_fn: CondFn | None, state: dict) -> dict: ...


@dataclass(frozen=True)
class Sampler:
    """A registry entry: the step function and which options it reads (others are an error when set)."""

    step: StepFn
    uses_eta: bool
    description: str


def ddpm_step(diff, model, x, t, *, options, randn_like, model_kwargs, cond_fn, state) -> dict:
    # DDPM Algorithm 2: x_{t-1} = mu(x_t, t) + sigma_t z (no noise at the last step)
    return diff.p_sample(model, x, t, randn_like(x), clip_denoised=options.clip_denoised, model_kwargs=model_kwargs,
                         cond_fn=cond_fn)


def ddim_step(diff, model, x, t, *, options, randn_like, model_kwargs, cond_fn, state) -> dict:
    # DDIM eq. 12; noise is drawn only when eta > 0, so eta=0 consumes no randomness
    z = randn_like(x) if options.eta > 0 else None
    return diff.ddim_step(model, x, t, z, eta=options.eta, clip_denoised=options.clip_denoised,
                          model_kwargs=model_kwargs, cond_fn=cond_fn)


SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler(ddpm_step, uses_eta=False, description="ancestral sampling with the diffusion's variance"),
    "ddim": Sampler(ddim_step, uses_eta=True, description="DDIM; eta=0 deterministic, eta=1 DDPM's variance"),
}

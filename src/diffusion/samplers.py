"""The sampler registry: a sampler is one reverse-step function and one entry in SAMPLERS.

A step function takes what the sampler steps through (a (possibly respaced) diffusion, or for the ODE / SDE
solvers a SolverSchedule of noise levels on the diffusion's continuous-time view), the network, the current
state x at the 0-based index t of it and what the run was configured with, and returns
dict(sample=x at the next index, pred_x0=the x_0 it predicted). `state` is a dict that lives for one
reverse run, for samplers that keep a history (multistep solvers); single-step samplers ignore it. The
loop sets state["index"] to the index as a Python int before each step.
The registry entry says which options and spacings a sampler takes, so SamplerOptions rejects the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from .gaussian_diffusion import GaussianDiffusion, Model
from .guidance import CondFn
from .respace import CONTINUOUS_SPACINGS, INTEGER_SPACINGS
from .solvers import dpmpp_2m_sde_step, dpmpp_2m_step, dpmpp_3m_step, euler_step, heun_step, unipc_step

if TYPE_CHECKING:
    from .options import SamplerOptions

# randn_like(x): standard normal noise shaped like x (a sampler's only source of randomness).
RandnLike = Callable[[torch.Tensor], torch.Tensor]


class StepFn(Protocol):
    def __call__(
        self,
        diff: GaussianDiffusion,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        options: SamplerOptions,
        randn_like: RandnLike,
        model_kwargs: dict | None,
        cond_fn: CondFn | None,
        state: dict,
    ) -> dict: ...


@dataclass(frozen=True)
class Sampler:
    """A registry entry: the step function and which options it reads (others are an error when set).

    continuous: it steps through a SolverSchedule (noise levels on the continuous-time view, ending at the
        clean image) instead of a (Spaced)GaussianDiffusion.
    spacings: the respace.SPACINGS kinds it accepts; default_spacing: the placement of `steps` alone
        (None: improved-diffusion's even spacing).
    orders / default_order: the solver orders options.order may pick (empty: fixed by the sampler).
    calls_per_step: network evaluations per step, except the last into the clean image, which makes one.
    """

    step: StepFn
    uses_eta: bool
    description: str
    uses_churn: bool = False
    continuous: bool = False
    spacings: frozenset[str] = INTEGER_SPACINGS
    default_spacing: str | None = None
    orders: tuple[int, ...] = ()
    default_order: int | None = None
    calls_per_step: int = 1

    def nfe(self, num_steps: int) -> int:
        """Network evaluations of a run over num_steps levels (classifier-free guidance's batch of 2N is one)."""
        return self.calls_per_step * num_steps - (self.calls_per_step - 1)


def ddpm_step(diff, model, x, t, *, options, randn_like, model_kwargs, cond_fn, state) -> dict:
    # DDPM Algorithm 2: x_{t-1} = mu(x_t, t) + sigma_t z (no noise at the last step)
    return diff.p_sample(
        model, x, t, randn_like(x), clip_denoised=options.thresholding, model_kwargs=model_kwargs, cond_fn=cond_fn
    )


def ddim_step(diff, model, x, t, *, options, randn_like, model_kwargs, cond_fn, state) -> dict:
    # DDIM eq. 12; noise is drawn only when eta > 0, so eta=0 consumes no randomness
    z = randn_like(x) if options.eta > 0 else None
    return diff.ddim_step(
        model, x, t, z, eta=options.eta, clip_denoised=options.thresholding, model_kwargs=model_kwargs, cond_fn=cond_fn
    )


SOLVER_SPACINGS = INTEGER_SPACINGS | CONTINUOUS_SPACINGS

SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler(ddpm_step, uses_eta=False, description="ancestral sampling with the diffusion's variance"),
    "ddim": Sampler(ddim_step, uses_eta=True, description="DDIM; eta=0 deterministic, eta=1 DDPM's variance"),
    "dpmpp_2m": Sampler(
        dpmpp_2m_step,
        uses_eta=False,
        continuous=True,
        spacings=SOLVER_SPACINGS,
        default_spacing="logsnr",
        description="DPM-Solver++(2M), multistep ODE solver (Lu et al.)",
    ),
    "dpmpp_3m": Sampler(
        dpmpp_3m_step,
        uses_eta=False,
        continuous=True,
        spacings=SOLVER_SPACINGS,
        default_spacing="logsnr",
        description="DPM-Solver++(3M), third-order multistep ODE solver",
    ),
    "dpmpp_2m_sde": Sampler(
        dpmpp_2m_sde_step,
        uses_eta=False,
        continuous=True,
        spacings=SOLVER_SPACINGS,
        default_spacing="logsnr",
        description="SDE-DPM-Solver++(2M), stochastic multistep solver",
    ),
    "unipc": Sampler(
        unipc_step,
        uses_eta=False,
        continuous=True,
        spacings=SOLVER_SPACINGS,
        default_spacing="logsnr",
        orders=(1, 2, 3),
        default_order=2,
        description="UniPC (bh2) predictor-corrector on data predictions (Zhao et al. 2023)",
    ),
    "euler": Sampler(
        euler_step,
        uses_eta=False,
        uses_churn=True,
        continuous=True,
        spacings=SOLVER_SPACINGS,
        default_spacing="karras",
        description="EDM Euler on the model's sigmas (Karras et al. 2022)",
    ),
    "heun": Sampler(
        heun_step,
        uses_eta=False,
        uses_churn=True,
        continuous=True,
        spacings=SOLVER_SPACINGS,
        default_spacing="karras",
        calls_per_step=2,
        description="EDM Heun (Alg. 1), 2 network calls per step but the last",
    ),
}

"""The sampler registry and the options checked against it.

A sampler is one reverse-step function and one entry in SAMPLERS. A step function takes what the sampler steps
through (a (possibly respaced) diffusion, or for the ODE / SDE solvers a SolverSchedule of noise levels on the
diffusion's continuous-time view), the network, the current state x at the 0-based index t of it and the
ReverseRun (what the run was configured with), and returns dict(sample=x at the next index, pred_x0=the x_0 it
predicted). The run's `state` is a dict that lives for one reverse run, for samplers that keep a history
(multistep solvers); single-step samplers ignore it. The loop sets state["index"] to the index as a Python int
before each step.

The registry entry says which options and spacings a sampler takes; SamplerOptions, the typed options of every
sampling entry point, rejects the rest on construction, so a bad value fails before any work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .gaussian_diffusion import GaussianDiffusion, Model, Threshold
from .guidance import CondFn
from .respace import (
    CONTINUOUS_SPACINGS,
    INTEGER_SPACINGS,
    NAMED_SPACINGS,
    SPACINGS,
    space_timesteps,
    spacing_count,
    spacing_kind,
)
from .solvers import dpmpp_2m_sde_step, dpmpp_2m_step, dpmpp_3m_step, euler_step, heun_step, unipc_step

# randn_like(x): standard normal noise shaped like x (a sampler's only source of randomness).
RandnLike = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ReverseRun:
    """What every step of one reverse run shares: the options, the source of noise, the network's extra inputs,
    classifier guidance's gradient cond_fn(x_t, t) (None: unguided) and the run's `state` dict."""

    options: SamplerOptions
    randn_like: RandnLike
    model_kwargs: dict | None
    cond_fn: CondFn | None
    state: dict = field(default_factory=dict)

    @property
    def denoise_kwargs(self) -> dict:
        """The keywords of the network's prediction in every step (GaussianDiffusion.p_sample / ddim_step,
        SolverSchedule.denoise): the options' thresholding as clip_denoised, model_kwargs and cond_fn."""
        return {"clip_denoised": self.options.thresholding, "model_kwargs": self.model_kwargs, "cond_fn": self.cond_fn}


class StepFn(Protocol):
    def __call__(
        self, diff: GaussianDiffusion, model: Model, x: torch.Tensor, t: torch.Tensor, run: ReverseRun
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


def ddpm_step(diff, model, x, t, run: ReverseRun) -> dict:
    # DDPM Algorithm 2: x_{t-1} = mu(x_t, t) + sigma_t z (no noise at the last step)
    return diff.p_sample(model, x, t, run.randn_like(x), **run.denoise_kwargs)


def ddim_step(diff, model, x, t, run: ReverseRun) -> dict:
    # DDIM eq. 12; noise is drawn only when eta > 0, so eta=0 consumes no randomness
    eta = run.options.eta
    return diff.ddim_step(model, x, t, run.randn_like(x) if eta > 0 else None, eta=eta, **run.denoise_kwargs)


SOLVER_SPACINGS = INTEGER_SPACINGS | CONTINUOUS_SPACINGS


def _solver(step: StepFn, description: str, default_spacing: str = "logsnr", **entry) -> Sampler:
    """The entry of an ODE / SDE solver: it steps through a SolverSchedule, takes every spacing and no eta."""
    return Sampler(
        step,
        uses_eta=False,
        description=description,
        continuous=True,
        spacings=SOLVER_SPACINGS,
        default_spacing=default_spacing,
        **entry,
    )


SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler(ddpm_step, uses_eta=False, description="ancestral sampling with the diffusion's variance"),
    "ddim": Sampler(ddim_step, uses_eta=True, description="DDIM; eta=0 deterministic, eta=1 DDPM's variance"),
    "dpmpp_2m": _solver(dpmpp_2m_step, "DPM-Solver++(2M), multistep ODE solver (Lu et al.)"),
    "dpmpp_3m": _solver(dpmpp_3m_step, "DPM-Solver++(3M), third-order multistep ODE solver"),
    "dpmpp_2m_sde": _solver(dpmpp_2m_sde_step, "SDE-DPM-Solver++(2M), stochastic multistep solver"),
    "unipc": _solver(
        unipc_step,
        "UniPC (bh2) predictor-corrector on data predictions (Zhao et al. 2023)",
        orders=(1, 2, 3),
        default_order=2,
    ),
    "euler": _solver(euler_step, "EDM Euler on the model's sigmas (Karras et al. 2022)", "karras", uses_churn=True),
    "heun": _solver(
        heun_step,
        "EDM Heun (Alg. 1), 2 network calls per step but the last",
        "karras",
        uses_churn=True,
        calls_per_step=2,
    ),
}


@dataclass(frozen=True)
class SamplerOptions:
    """sampler: a SAMPLERS name ("ddpm" ancestral, "ddim", the solvers "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde",
        "unipc", "euler", "heun").
    steps: sample over this many steps placed by the sampler's default spacing (ddpm / ddim: evenly strided
        training timesteps; DPM-Solver++ / UniPC: uniform logSNR; Euler / Heun: Karras sigmas); None: all T,
        or `spacing`'s.
    spacing: a `space_timesteps` spacing ("50", "ddim50", "quad20", "10,20", "linspace20", "trailing20"), for
        the solvers also "logsnr20" / "karras20" (between training timesteps), or the timesteps themselves;
        it takes precedence over steps. A bare name ("karras") takes its count from steps. A spacing the
        sampler cannot use is an error (respace.SPACINGS lists the kinds, SAMPLERS which sampler takes which).
    eta: DDIM's noise scale (0: deterministic, 1: the DDPM posterior variance); only for samplers that use it.
    clip_denoised: clip each predicted x_0 to [-1, 1] (false: threshold=none); `threshold` supersedes it.
    threshold: how each predicted x_0 is bounded: "clip" to [-1, 1], "dynamic" (Imagen's per-sample percentile
        thresholding, threshold_percentile of |x_0|), "none"; None: clip_denoised decides.
    threshold_percentile: the percentile p in (0, 1] of dynamic thresholding (Imagen's 0.995).
    order: the solver order of samplers that take one (unipc: 1-3, default 2); None: the sampler's default.
    s_churn: EDM's stochastic churn S_churn (Alg. 2; 0: the deterministic Alg. 1); euler and heun only.
    """

    sampler: str = "ddpm"
    steps: int | None = None
    spacing: str | tuple[int, ...] | None = None
    eta: float = 0.0
    clip_denoised: bool = True
    order: int | None = None
    s_churn: float = 0.0
    threshold: str | None = None
    threshold_percentile: float = 0.995

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.steps is not None and (
            isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1
        ):
            raise ValueError(f"steps must be a positive integer or null, got {self.steps!r}")
        spacing = self.spacing
        if isinstance(spacing, int) and not isinstance(spacing, bool):
            spacing = str(spacing)
        elif isinstance(spacing, Sequence) and not isinstance(spacing, str):
            if not all(isinstance(s, int) and not isinstance(s, bool) for s in spacing):
                raise ValueError(f"spacing as a list must hold integer timesteps, got {list(spacing)!r}")
            spacing = tuple(spacing)
        elif spacing is not None and not isinstance(spacing, str):
            raise ValueError(
                f"spacing must be a string such as '50' or 'ddim50', or a list of timesteps; got {spacing!r}"
            )
        object.__setattr__(self, "spacing", spacing)
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or self.eta < 0:
            raise ValueError(f"eta must be a number >= 0, got {self.eta!r}")
        object.__setattr__(self, "eta", float(self.eta))
        if self.eta != 0 and not SAMPLERS[self.sampler].uses_eta:
            users = ", ".join(name for name, s in SAMPLERS.items() if s.uses_eta)
            raise ValueError(f"eta={self.eta} has no effect with sampler={self.sampler}; use eta=0 or sampler={users}")
        if not isinstance(self.clip_denoised, bool):
            raise ValueError(f"clip_denoised must be true or false, got {self.clip_denoised!r}")
        if self.threshold is not None:
            Threshold(self.threshold)  # an unknown name lists the choices
            if not self.clip_denoised and self.threshold != "none":
                raise ValueError(
                    f"clip_denoised=false contradicts threshold={self.threshold}; give only threshold "
                    f"(none, clip or dynamic)"
                )
        Threshold("dynamic", self.threshold_percentile)  # checks the percentile
        self._check_solver_options()
        self._check_spacing()

    def _check_solver_options(self) -> None:
        entry = SAMPLERS[self.sampler]
        if self.order is not None and (isinstance(self.order, bool) or not isinstance(self.order, int)):
            raise ValueError(f"order must be an integer or null, got {self.order!r}")
        if self.order is not None and not entry.orders:
            users = ", ".join(name for name, s in SAMPLERS.items() if s.orders)
            raise ValueError(
                f"order={self.order} has no effect with sampler={self.sampler} (its order is fixed); "
                f"use order=null or sampler={users}"
            )
        if self.order is not None and self.order not in entry.orders:
            raise ValueError(
                f"sampler={self.sampler} takes order {' or '.join(map(str, entry.orders))}, got {self.order}"
            )
        if isinstance(self.s_churn, bool) or not isinstance(self.s_churn, (int, float)) or self.s_churn < 0:
            raise ValueError(f"s_churn must be a number >= 0, got {self.s_churn!r}")
        object.__setattr__(self, "s_churn", float(self.s_churn))
        if self.s_churn != 0 and not entry.uses_churn:
            users = ", ".join(name for name, s in SAMPLERS.items() if s.uses_churn)
            raise ValueError(
                f"s_churn={self.s_churn} has no effect with sampler={self.sampler}; use s_churn=0 or sampler={users}"
            )

    def _check_spacing(self) -> None:
        entry = SAMPLERS[self.sampler]
        if self.spacing is None:
            return
        kind = spacing_kind(self.spacing)
        if kind not in entry.spacings:
            users = ", ".join(name for name, s in SAMPLERS.items() if kind in s.spacings)
            raise ValueError(
                f"spacing {self._spacing_text()!r} ({SPACINGS[kind]}) does not apply to "
                f"sampler={self.sampler}; use another spacing or sampler={users}"
            )
        if self._is_bare_name() and self.steps is None:
            raise ValueError(
                f"spacing={self.spacing!r} takes its number of steps from steps; set steps (e.g. "
                f"steps=10) or give the count, spacing={self.spacing}10"
            )
        if kind in CONTINUOUS_SPACINGS and not self._is_bare_name():
            spacing_count(self.spacing)  # a bad count fails here, not at the first batch

    def _is_bare_name(self) -> bool:
        return isinstance(self.spacing, str) and self.spacing.strip().lower() in NAMED_SPACINGS

    def _spacing_text(self) -> str:
        return ",".join(map(str, self.spacing)) if isinstance(self.spacing, tuple) else str(self.spacing)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> SamplerOptions:
        """From a config dict (a `sampler` group, merged with command-line values); unknown keys are an error."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown sampler option(s) {', '.join(unknown)}; the options are {', '.join(sorted(known))}"
            )
        return cls(**{k: v for k, v in values.items() if v is not None or k in ("steps", "spacing")})

    def replace(self, **changes) -> SamplerOptions:
        return dataclasses.replace(self, **changes)

    def explicit_spacing(self) -> str | list[int] | None:
        """The spacing as given (a list for listed timesteps), a bare name with its count from steps; None if unset."""
        if isinstance(self.spacing, tuple):
            return list(self.spacing)
        if self._is_bare_name():
            return f"{self.spacing.strip().lower()}{self.steps}"
        return self.spacing

    def resolved_spacing(self) -> str | list[int] | None:
        """The spacing a run places its steps with: the explicit one, else `steps` placed by the sampler's
        default spacing; None: `steps` evenly strided (all T when steps is None)."""
        default = SAMPLERS[self.sampler].default_spacing
        if self.spacing is None and default is not None and self.steps is not None:
            return f"{default}{self.steps}"
        return self.explicit_spacing()

    @property
    def thresholding(self) -> Threshold:
        """What the samplers apply to each predicted x_0: `threshold`, else clip_denoised's clip or none."""
        kind = self.threshold if self.threshold is not None else ("clip" if self.clip_denoised else "none")
        return Threshold(kind, self.threshold_percentile)

    @property
    def solver_order(self) -> int | None:
        """The order a solver runs with: `order`, else the sampler's default (None for fixed-order samplers)."""
        return self.order if self.order is not None else SAMPLERS[self.sampler].default_order

    def is_continuous(self) -> bool:
        """Whether the steps fall between training timesteps (logSNR or Karras placements)."""
        spacing = self.resolved_spacing()
        return spacing is not None and spacing_kind(spacing) in CONTINUOUS_SPACINGS

    def timesteps(self, num_timesteps: int) -> list[int]:
        """The training timesteps a run from noise visits (ascending), checked against T; a placement
        between training timesteps (logsnr, karras) depends on the schedule: see reverse_process.visited_timesteps."""
        spacing = self.resolved_spacing()
        if spacing is None and (self.steps is None or self.steps == num_timesteps):
            return list(range(num_timesteps))
        if self.is_continuous():
            raise ValueError(
                f"spacing {spacing!r} places steps between training timesteps; they follow from the "
                f"noise schedule: src.diffusion.visited_timesteps(diffusion, options)"
            )
        return space_timesteps(num_timesteps, spacing if spacing is not None else self.steps)

    def num_steps(self, num_timesteps: int) -> int:
        """The number of steps (noise levels) a run from noise takes, checked against T."""
        return spacing_count(self.resolved_spacing()) if self.is_continuous() else len(self.timesteps(num_timesteps))

    def nfe(self, num_timesteps: int) -> int:
        """Network evaluations of a run from noise (what sample quality per cost is measured against)."""
        return SAMPLERS[self.sampler].nfe(self.num_steps(num_timesteps))

    def as_dict(self) -> dict:
        """Plain values for logs and metrics.json: every option that applies to the sampler (order and
        s_churn only for the samplers that take them, threshold when set and its percentile when dynamic), the
        spacing as placed when the sampler chose it."""
        values = dataclasses.asdict(self)
        if isinstance(self.spacing, tuple):
            values["spacing"] = list(self.spacing)
        elif self.spacing is None:
            values["spacing"] = self.resolved_spacing()  # a solver's own placement of steps, e.g. "logsnr20"
        entry = SAMPLERS[self.sampler]
        if entry.orders:
            values["order"] = self.solver_order
        else:
            del values["order"]
        if not entry.uses_churn:
            del values["s_churn"]
        if self.threshold is None:  # clip_denoised says it
            del values["threshold"]
        if self.thresholding.kind != "dynamic":
            del values["threshold_percentile"]
        return values

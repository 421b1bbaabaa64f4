"""Typed options of every sampling entry point: how to sample (SamplerOptions) and what to guide
towards (Guidance). Both are frozen and checked on construction, so a bad value fails before any work."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .guidance import Classifier
from .respace import space_timesteps
from .samplers import SAMPLERS


@dataclass(frozen=True)
class SamplerOptions:
    """sampler: a SAMPLERS name ("ddpm" ancestral, "ddim").
    steps: sample over this many evenly strided training timesteps (None: all T, or `spacing`'s).
    spacing: a `space_timesteps` spacing ("50", "ddim50", "quad20", "10,20") or the timesteps themselves;
        it takes precedence over steps.
    eta: DDIM's noise scale (0: deterministic, 1: the DDPM posterior variance); only for samplers that use it.
    clip_denoised: clip each predicted x_0 to [-1, 1].
    """

    sampler: str = "ddpm"
    steps: int | None = None
    spacing: str | tuple[int, ...] | None = None
    eta: float = 0.0
    clip_denoised: bool = True

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise ValueError(f"steps must be a positive integer or null, got {self.steps!r}")
        spacing = self.spacing
        if isinstance(spacing, int) and not isinstance(spacing, bool):
            spacing = str(spacing)
        elif isinstance(spacing, Sequence) and not isinstance(spacing, str):
            if not all(isinstance(s, int) and not isinstance(s, bool) for s in spacing):
                raise ValueError(f"spacing as a list must hold integer timesteps, got {list(spacing)!r}")
            spacing = tuple(spacing)
        elif spacing is not None and not isinstance(spacing, str):
            raise ValueError(f"spacing must be a string such as '50' or 'ddim50', or a list of timesteps; "
                             f"got {spacing!r}")
        object.__setattr__(self, "spacing", spacing)
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or self.eta < 0:
            raise ValueError(f"eta must be a number >= 0, got {self.eta!r}")
        object.__setattr__(self, "eta", float(self.eta))
        if self.eta != 0 and not SAMPLERS[self.sampler].uses_eta:
            users = ", ".join(name for name, s in SAMPLERS.items() if s.uses_eta)
            raise ValueError(f"eta={self.eta} has no effect with sampler={self.sampler}; use eta=0 or sampler={users}")
        if not isinstance(self.clip_denoised, bool):
            raise ValueError(f"clip_denoised must be true or false, got {self.clip_denoised!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> SamplerOptions:
        """From a config dict (a `sampler` group, merged with command-line values); unknown keys are an error."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown sampler option(s) {', '.join(unknown)}; the options are {', '.join(sorted(known))}")
        return cls(**{k: v for k, v in values.items() if v is not None or k in ("steps", "spacing")})

    def replace(self, **changes) -> SamplerOptions:
        return dataclasses.replace(self, **changes)

    def timesteps(self, num_timesteps: int) -> list[int]:
        """The training timesteps a run from noise visits (ascending), checked against T."""
        if self.spacing is None and (self.steps is None or self.steps == num_timesteps):
            return list(range(num_timesteps))
        spacing = list(self.spacing) if isinstance(self.spacing, tuple) else self.spacing
        return space_timesteps(num_timesteps, spacing if spacing is not None else self.steps)

    def as_dict(self) -> dict:
        """Plain values for logs and metrics.json."""
        values = dataclasses.asdict(self)
        if isinstance(self.spacing, tuple):
            values["spacing"] = list(self.spacing)
        return values


@dataclass(frozen=True, eq=False)
class Guidance:
    """y: class labels [N] of a class-conditional model (None: unconditional samples).
    scale: classifier-free guidance weight w, eps = (1 + w) eps(x_t, y) - w eps(x_t) (0: none).
    classifier(x_t, t) -> logits with classifier_scale s: classifier guidance (Dhariwal & Nichol 2021).
    """

    y: torch.Tensor | None = None
    scale: float = 0.0
    classifier: Classifier | None = None
    classifier_scale: float = 1.0

    def __post_init__(self):
        for name in ("scale", "classifier_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"guidance {name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))

    def for_labels(self, y: torch.Tensor | None) -> Guidance:
        """The same guidance towards other labels (one batch of a larger labelled run)."""
        return dataclasses.replace(self, y=y)


NO_GUIDANCE = Guidance()

"""Noise schedules beta_1..beta_T, always in float64 (the products of T terms lose precision in float32)."""
import math
from typing import Literal

import torch

ScheduleName = Literal["linear", "cosine"]
SCHEDULES = ("linear", "cosine")


def make_beta_schedule(
    name: ScheduleName, num_timesteps: int, cosine_s: float = 0.008, max_beta: float = 0.999
) -> torch.Tensor:
    """Return the betas of a named schedule as a float64 tensor [T].

    linear: Ho et al. 2020, beta from 1e-4 to 0.02 at T=1000. For other T both ends are scaled by
        1000/T (as improved-diffusion does) so the total noise added stays about the same.
    cosine: Nichol & Dhariwal 2021 eq. 17, alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2),
        beta_t = 1 - alpha_bar(t)/alpha_bar(t-1) clipped at max_beta to avoid the singularity at t=T.
    """
    if not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    if name == "linear":
        scale = 1000.0 / num_timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    if name == "cosine":
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        alpha_bar = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
        return betas.clamp(max=max_beta)
    raise ValueError(f"unknown beta schedule {name!r}; choose one of {', '.join(SCHEDULES)}")

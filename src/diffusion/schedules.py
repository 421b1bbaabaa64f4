"""Noise schedules beta_1..beta_T and the quantities derived from them, always in float64 (the products of T
terms lose precision in float32)."""

import math
from typing import Literal

import torch

ScheduleName = Literal["linear", "cosine"]
SCHEDULES = ("linear", "cosine")


def make_beta_schedule(
    name: ScheduleName,
    num_timesteps: int,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
    zero_terminal_snr: bool = False,
) -> torch.Tensor:
    """Return the betas of a named schedule as a float64 tensor [T].

    linear: Ho et al. 2020, beta from 1e-4 to 0.02 at T=1000. For other T both ends are scaled by
        1000/T (as improved-diffusion does) so the total noise added stays about the same.
    cosine: Nichol & Dhariwal 2021 eq. 17, alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2),
        beta_t = 1 - alpha_bar(t)/alpha_bar(t-1) clipped at max_beta to avoid the singularity at t=T.
    zero_terminal_snr: rescale the schedule so alpha_bar_T = 0 exactly (`rescale_zero_terminal_snr`).
    """
    if not isinstance(zero_terminal_snr, bool):
        raise ValueError(f"zero_terminal_snr must be true or false, got {zero_terminal_snr!r}")
    betas = _named_schedule(name, num_timesteps, cosine_s, max_beta)
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas [T] whose alpha_bar ends at exactly 0 (SNR 0 at t = T) and starts where `betas`' does (Lin et al.
    2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1); the last beta is 1."""
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.numel() < 2:
        raise ValueError("zero terminal SNR needs at least 2 timesteps (the first alpha_bar is kept)")
    # 1. sqrt(alpha_bar) of the schedule
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    # 2. shift so the last is 0, scale so the first is unchanged
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    # 3. back to betas: alpha_t = abar_t / abar_{t-1}, alpha_1 = abar_1
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def schedule_buffers(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """The float64 tensors [T] that GaussianDiffusion keeps for betas [T] (float64): cumulative products, the
    posterior q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7) and the fixed variances, by name."""
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    # Posterior q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7).
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # beta~ is 0 at t=0: clip its log to beta~ at t=1 so it stays finite.
    # The posterior variance at t = 0 is 0; its log is clipped to the next step's (improved-diffusion), and in
    # a one-step process (a respaced run from T - 1 straight to 0) to beta_0, the only variance it has.
    floor = posterior_variance[1:2] if betas.numel() > 1 else betas[:1]
    posterior_log_variance_clipped = torch.log(torch.cat([floor, posterior_variance[1:]]))
    # fixed_large: sigma_t^2 = beta_t, except beta~_1 at t=0 (improved-diffusion's choice).
    large_variance = torch.cat([floor, betas[1:]])
    return {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "alphas_cumprod_next": torch.cat([alphas_cumprod[1:], alphas_cumprod.new_zeros(1)]),
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": torch.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_log_variance_clipped,
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
        "large_variance": large_variance,
        "large_log_variance": torch.log(large_variance),
        "log_betas": torch.log(betas),
    }


def _named_schedule(name: str, num_timesteps: int, cosine_s: float, max_beta: float) -> torch.Tensor:
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

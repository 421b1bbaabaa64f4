"""Diffusion math (pure torch, no Lightning): schedules, the Gaussian diffusion, samplers."""
from .gaussian_diffusion import GaussianDiffusion
from .likelihoods import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .respace import SpacedDiffusion, space_timesteps
from .sampling import SAMPLERS, ddpm_sample, respaced, sample
from .schedules import make_beta_schedule
from .timestep_samplers import LossSecondMomentResampler, UniformSampler

__all__ = [
    "SAMPLERS", "GaussianDiffusion", "LossSecondMomentResampler", "SpacedDiffusion", "UniformSampler",
    "ddpm_sample", "respaced", "sample", "space_timesteps",
    "discretized_gaussian_log_likelihood", "make_beta_schedule", "mean_flat", "normal_kl",
]

"""Diffusion math (pure torch, no Lightning): schedules, the Gaussian diffusion, samplers."""
from .editing import ddim_invert, ddim_sample, interpolate, interpolate_ddim, lerp, slerp
from .gaussian_diffusion import GaussianDiffusion
from .guidance import ClassifierFreeGuidance, classifier_guidance, drop_labels
from .likelihoods import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .respace import SpacedDiffusion, space_timesteps
from .sampling import (SAMPLERS, Trajectory, ddpm_sample, denoise_from, image_grid, respaced, sample,
                       sample_trajectory, trajectory_grid)
from .schedules import make_beta_schedule
from .timestep_samplers import LossSecondMomentResampler, UniformSampler

__all__ = [
    "SAMPLERS", "ClassifierFreeGuidance", "GaussianDiffusion", "LossSecondMomentResampler", "SpacedDiffusion", "Trajectory",
    "UniformSampler", "classifier_guidance", "ddim_invert", "ddim_sample", "ddpm_sample", "denoise_from",
    "discretized_gaussian_log_likelihood", "drop_labels", "image_grid", "interpolate", "interpolate_ddim", "lerp",
    "make_beta_schedule", "mean_flat", "normal_kl", "respaced", "sample", "sample_trajectory", "slerp",
    "space_timesteps", "trajectory_grid",
]

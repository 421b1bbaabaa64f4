"""Diffusion math (pure torch, no Lightning): schedules, the Gaussian diffusion, samplers."""

from .editing import ddim_invert, ddim_sample, interpolate, interpolate_ddim, lerp, slerp
from .gaussian_diffusion import GaussianDiffusion, Threshold
from .guidance import NO_GUIDANCE, ClassifierFreeGuidance, Guidance, classifier_guidance, drop_labels
from .likelihoods import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .loss_timesteps import LossSecondMomentResampler, UniformSampler
from .respace import SpacedDiffusion, space_timesteps
from .reverse_process import (
    Trajectory,
    check_options,
    ddpm_sample,
    denoise_from,
    process_for,
    respaced,
    respaced_for,
    sample,
    sample_trajectory,
    visited_timesteps,
)
from .samplers import SAMPLERS, Sampler, SamplerOptions
from .schedules import make_beta_schedule, rescale_zero_terminal_snr
from .solvers import SolverSchedule

__all__ = [
    "NO_GUIDANCE",
    "SAMPLERS",
    "ClassifierFreeGuidance",
    "GaussianDiffusion",
    "Guidance",
    "LossSecondMomentResampler",
    "Sampler",
    "SamplerOptions",
    "SpacedDiffusion",
    "Trajectory",
    "UniformSampler",
    "check_options",
    "classifier_guidance",
    "ddim_invert",
    "ddim_sample",
    "ddpm_sample",
    "denoise_from",
    "discretized_gaussian_log_likelihood",
    "drop_labels",
    "interpolate",
    "interpolate_ddim",
    "lerp",
    "make_beta_schedule",
    "mean_flat",
    "rescale_zero_terminal_snr",
    "normal_kl",
    "process_for",
    "respaced",
    "respaced_for",
    "sample",
    "SolverSchedule",
    "visited_timesteps",
    "sample_trajectory",
    "slerp",
    "space_timesteps",
    "Threshold",
]

"""Generating images with a trained network: one entry point for every sampler."""
from typing import Literal

import torch

from .gaussian_diffusion import GaussianDiffusion, Model
from .respace import SpacedDiffusion, space_timesteps

SamplerName = Literal["ddpm", "ddim"]
SAMPLERS = ("ddpm", "ddim")


def respaced(diffusion: GaussianDiffusion, steps: int | None = None,
             spacing: str | list[int] | None = None) -> GaussianDiffusion:
    """The diffusion to sample with: itself for all T steps, else a SpacedDiffusion over `spacing`
    (default: `steps` evenly strided timesteps, first and last included)."""
    num_t = diffusion.num_timesteps
    if spacing is None and (steps is None or steps == num_t):
        return diffusion
    return SpacedDiffusion(diffusion, space_timesteps(num_t, spacing if spacing is not None else steps))


@torch.no_grad()
def sample(
    diffusion: GaussianDiffusion,
    model: Model,
    shape: tuple[int, ...],
    *,
    sampler: SamplerName = "ddpm",
    steps: int | None = None,
    spacing: str | list[int] | None = None,
    eta: float = 0.0,
    clip_denoised: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    noise: torch.Tensor | None = None,
    model_kwargs: dict | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Draw images [N x C x H x W] in [-1, 1].

    sampler: "ddpm" (ancestral, DDPM Algorithm 2, with the diffusion's variance) or "ddim" (eta=0
        deterministic; eta=1 has the DDPM posterior variance).
    steps / spacing: sample over a subsequence of the T training steps (see `space_timesteps`).
    All randomness comes from `generator` (and `noise` = x_T if given), so a seed fixes the samples.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    device = torch.device(device) if device is not None else diffusion.betas.device
    diff = respaced(diffusion, steps, spacing).to(device)
    x = noise.to(device) if noise is not None else torch.randn(shape, generator=generator, device=device)
    indices = range(diff.num_timesteps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm
        indices = tqdm(indices, desc=f"{sampler} sampling", leave=False)
    for i in indices:
        t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
        if sampler == "ddpm":
            z = torch.randn(x.shape, generator=generator, device=device)
            x = diff.p_sample(model, x, t, z, clip_denoised=clip_denoised, model_kwargs=model_kwargs)["sample"]
        else:
            z = torch.randn(x.shape, generator=generator, device=device) if eta > 0 else None
            x = diff.ddim_step(model, x, t, z, eta=eta, clip_denoised=clip_denoised,
                               model_kwargs=model_kwargs)["sample"]
    return x.clamp(-1.0, 1.0)


def ddpm_sample(diffusion: GaussianDiffusion, model: Model, shape: tuple[int, ...], **kwargs) -> torch.Tensor:
    """Ancestral sampling over all T steps (DDPM Algorithm 2); kwargs as in `sample`."""
    return sample(diffusion, model, shape, sampler="ddpm", **kwargs)

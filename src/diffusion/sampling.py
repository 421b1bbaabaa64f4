"""Generating images with a trained network."""
import torch

from .gaussian_diffusion import GaussianDiffusion, Model


@torch.no_grad()
def ddpm_sample(
    diffusion: GaussianDiffusion,
    model: Model,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    clip_denoised: bool = True,
    model_kwargs: dict | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Ancestral sampling (DDPM Algorithm 2) over all T steps: x_T ~ N(0, I) down to x_0 in [-1, 1].

    All randomness comes from `generator` (on `device`), so a fixed seed gives fixed samples.
    """
    device = torch.device(device) if device is not None else diffusion.betas.device
    x = torch.randn(shape, generator=generator, device=device)
    steps = range(diffusion.num_timesteps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="sampling", leave=False)
    for i in steps:
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        noise = torch.randn(shape, generator=generator, device=device)
        x = diffusion.p_sample(model, x, t, noise, clip_denoised=clip_denoised, model_kwargs=model_kwargs)["sample"]
    return x.clamp(-1.0, 1.0)

"""Editing with a trained diffusion: interpolation between images (DDPM Sec. 4.4), DDIM inversion of
images to latents x_T and their deterministic reconstruction (DDIM Sec. 5.4)."""

from collections.abc import Sequence
from typing import Literal

import torch

from .gaussian_diffusion import GaussianDiffusion, Model
from .reverse_process import DEFAULT_OPTIONS, denoise_from, on_device, respaced_for, sample
from .samplers import SamplerOptions

Blend = Literal["linear", "slerp"]
BLENDS = ("linear", "slerp")


def _lambdas(lambdas: Sequence[float] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    lam = torch.as_tensor(lambdas, dtype=like.dtype, device=like.device).flatten()
    if lam.numel() == 0:
        raise ValueError("lambdas must not be empty")
    return lam


def lerp(a: torch.Tensor, b: torch.Tensor, lambdas: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """(1 - lambda) a + lambda b for a, b [N x ...] and L lambdas: [N x L x ...]."""
    lam = _lambdas(lambdas, a).view(1, -1, *([1] * (a.ndim - 1)))
    return torch.lerp(a.unsqueeze(1), b.unsqueeze(1), lam)


def slerp(a: torch.Tensor, b: torch.Tensor, lambdas: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation per example (DDIM Sec. 5.3): with theta the angle between the flattened
    a and b, sin((1 - lambda) theta) / sin(theta) a + sin(lambda theta) / sin(theta) b, for a, b [N x ...]
    and L lambdas: [N x L x ...]. Keeps the norm of Gaussian latents where a linear blend shrinks it;
    falls back to the linear blend for (anti)parallel pairs."""
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    dtype = torch.promote_types(a.dtype, torch.float32)
    flat_a, flat_b = a.flatten(1).to(dtype), b.flatten(1).to(dtype)
    cos = (flat_a * flat_b).sum(1) / (flat_a.norm(dim=1) * flat_b.norm(dim=1)).clamp_min(1e-30)
    theta = torch.arccos(cos.clamp(-1.0, 1.0)).unsqueeze(1)  # [N, 1]
    lam = _lambdas(lambdas, flat_a).unsqueeze(0)  # [1, L]
    sin = torch.sin(theta)
    degenerate = sin.abs() < 1e-6
    safe = torch.where(degenerate, torch.ones_like(sin), sin)
    wa = torch.where(degenerate, 1.0 - lam, torch.sin((1.0 - lam) * theta) / safe)  # [N, L]
    wb = torch.where(degenerate, lam, torch.sin(lam * theta) / safe)
    out = wa.unsqueeze(-1) * flat_a.unsqueeze(1) + wb.unsqueeze(-1) * flat_b.unsqueeze(1)
    return out.to(a.dtype).view(a.shape[0], -1, *a.shape[1:])


def blend(
    a: torch.Tensor, b: torch.Tensor, lambdas: Sequence[float] | torch.Tensor, method: Blend = "linear"
) -> torch.Tensor:
    if method == "linear":
        return lerp(a, b, lambdas)
    if method == "slerp":
        return slerp(a, b, lambdas)
    raise ValueError(f"unknown interpolation method {method!r}; choose one of {', '.join(BLENDS)}")


@torch.no_grad()
def interpolate(
    diffusion: GaussianDiffusion,
    model: Model,
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    lambdas: Sequence[float] | torch.Tensor,
    t: int,
    options: SamplerOptions = DEFAULT_OPTIONS,
    *,
    method: Blend = "linear",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    model_kwargs: dict | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Interpolate images in the diffusion's latent space (DDPM Sec. 4.4, Fig. 8).

    1. encode x_a, x_b [N x C x H x W] to x_t = q_sample(x, t, noise) with the same noise for both;
    2. blend the two x_t for each lambda (`method`: "linear", or "slerp" for latents near t = T - 1);
    3. decode each blend with the reverse process from t (`denoise_from`), with the same reverse noise
       for every lambda, so the columns differ only through lambda.
    Returns [N x L x C x H x W] in [-1, 1] (rows = pairs, columns = lambdas). Larger t gives smoother,
    less faithful interpolations; lambda = 0 / 1 at small t reconstruct x_a / x_b.
    """
    if x_a.shape != x_b.shape:
        raise ValueError(f"x_a and x_b must have the same shape, got {tuple(x_a.shape)} and {tuple(x_b.shape)}")
    diff = on_device(diffusion, x_a.device)
    n = x_a.shape[0]
    if noise is None:
        noise = torch.randn(x_a.shape, generator=generator, device=x_a.device, dtype=x_a.dtype)
    tt = torch.full((n,), t, device=x_a.device, dtype=torch.long)
    # 1. shared-noise encoding
    xt_a, xt_b = diff.q_sample(x_a, tt, noise), diff.q_sample(x_b, tt, noise)
    # 2. blend: [N, L, C, H, W] -> a batch of N * L
    mixed = blend(xt_a, xt_b, lambdas, method)
    num_lambdas = mixed.shape[1]

    # 3. decode, drawing each step's noise once per pair and sharing it across the lambdas
    def shared_randn_like(x):
        z = torch.randn((n, 1, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
        return z.expand(n, num_lambdas, *x.shape[1:]).reshape(x.shape)

    images = denoise_from(
        diff,
        model,
        mixed.flatten(0, 1),
        t,
        options,
        randn_like=shared_randn_like,
        model_kwargs=_repeat_kwargs(model_kwargs, num_lambdas),
        progress=progress,
    )
    return images.view(n, num_lambdas, *x_a.shape[1:])


def _repeat_kwargs(model_kwargs: dict | None, repeats: int) -> dict | None:
    """Per-example model kwargs (tensors with a batch dimension) repeated for each lambda."""
    if not model_kwargs:
        return model_kwargs
    return {
        k: v.repeat_interleave(repeats, dim=0) if torch.is_tensor(v) and v.ndim > 0 else v
        for k, v in model_kwargs.items()
    }


@torch.no_grad()
def ddim_invert(
    diffusion: GaussianDiffusion,
    model: Model,
    x0: torch.Tensor,
    options: SamplerOptions = DEFAULT_OPTIONS,
    *,
    model_kwargs: dict | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Encode images x0 [N x C x H x W] in [-1, 1] to DDIM latents x_T (the ODE run forward, eta=0).

    Only the options' steps, spacing and threshold (clip_denoised) apply (the encoder is DDIM with eta=0).
    Over the kept timesteps s_0 < ... < s_{K-1} of `respaced_for(diffusion, options)`, each move is DDIM
    eq. 12 with sigma = 0 run forward, x_{s'} = sqrt(abar_{s'}) x0_hat + sqrt(1 - abar_{s'}) eps:
    1. the image sits at abar = 1 (x0_hat = x0); the first move takes it to s_0 with the network's eps at
       s_0 (as diffusers' DDIMInverseScheduler does);
    2. then s_k -> s_{k+1} with the network's predicted x_0 and eps at s_k, up to s_{K-1}.
    Each encoder step mirrors one step of DDIM sampling (eta=0) with the same steps and spacing, so
    `ddim_sample` of the result reconstructs x0 up to the discretisation error.
    Returns the latent at s_{K-1} [N x C x H x W].
    """
    diff = on_device(respaced_for(diffusion, options), x0.device)
    n = x0.shape[0]

    def index(i: int) -> torch.Tensor:
        return torch.full((n,), i, device=x0.device, dtype=torch.long)

    def predict(x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's predicted x_0 at x on index i and the eps it implies."""
        t = index(i)
        pred_x0 = diff.p_mean_variance(model, x, t, options.thresholding, model_kwargs)["pred_x0"]
        return pred_x0, diff.predict_eps_from_x0(x, t, pred_x0)

    def move(x: torch.Tensor, x0_hat: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
        """From x to index i along the DDIM path through x0_hat and eps."""
        abar = diff.extract("alphas_cumprod", index(i), x)
        return abar.sqrt() * x0_hat + (1.0 - abar).sqrt() * eps

    # 1. from the image to s_0
    x = move(x0, x0, predict(x0, 0)[1], 0)
    # 2. x_{s_{k+1}} from x_{s_k}
    indices = range(diff.num_timesteps - 1)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="ddim inversion", leave=False)
    for i in indices:
        x = move(x, *predict(x, i), i + 1)
    return x


def ddim_sample(
    diffusion: GaussianDiffusion,
    model: Model,
    latent: torch.Tensor,
    options: SamplerOptions = DEFAULT_OPTIONS,
    *,
    model_kwargs: dict | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Decode DDIM latents [N x C x H x W] (e.g. from `ddim_invert` with the same options) to images in
    [-1, 1] with the deterministic DDIM sampler (the options' steps, spacing and clipping; eta = 0)."""
    return sample(
        diffusion,
        model,
        tuple(latent.shape),
        options.replace(sampler="ddim", eta=0.0, order=None, s_churn=0.0),
        device=latent.device,
        noise=latent,
        model_kwargs=model_kwargs,
        progress=progress,
    )


@torch.no_grad()
def interpolate_ddim(
    diffusion: GaussianDiffusion,
    model: Model,
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    lambdas: Sequence[float] | torch.Tensor,
    options: SamplerOptions = DEFAULT_OPTIONS,
    *,
    method: Blend = "slerp",
    model_kwargs: dict | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Deterministic interpolation: DDIM-invert x_a and x_b to x_T, blend the latents (slerp by default,
    DDIM Sec. 5.3) and decode with DDIM eta=0. Returns [N x L x C x H x W] in [-1, 1]; with enough
    steps lambda = 0 / 1 reconstruct x_a / x_b."""
    if x_a.shape != x_b.shape:
        raise ValueError(f"x_a and x_b must have the same shape, got {tuple(x_a.shape)} and {tuple(x_b.shape)}")
    kwargs = dict(progress=progress)
    both_kwargs = (
        None
        if not model_kwargs
        else {k: torch.cat([v, v]) if torch.is_tensor(v) and v.ndim > 0 else v for k, v in model_kwargs.items()}
    )
    latents = ddim_invert(diffusion, model, torch.cat([x_a, x_b]), options, model_kwargs=both_kwargs, **kwargs)
    lat_a, lat_b = latents.chunk(2)
    mixed = blend(lat_a, lat_b, lambdas, method)
    n, num_lambdas = mixed.shape[:2]
    images = ddim_sample(
        diffusion, model, mixed.flatten(0, 1), options, model_kwargs=_repeat_kwargs(model_kwargs, num_lambdas), **kwargs
    )
    return images.view(n, num_lambdas, *x_a.shape[1:])

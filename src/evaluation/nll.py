"""Test-set negative log-likelihood bound in bits/dim, with its parts (as improved-diffusion's image_nll).

For every image, the full-T variational bound is
    -log p(x_0) <= L_T + sum_{t=1}^{T-1} L_t + L_0     (DDPM eq. 5; t 0-based here)
with L_T the prior term KL(q(x_T|x_0) || N(0, I)), L_t the KL terms of the reverse steps and L_0 the
discretized Gaussian decoder term, each in bits/dim. The report gives the mean bound and each part.

A class-conditional net is run with the images' own labels (the bound of p(x | y), what val/bpd reports)
and, when it has a null label, also with that label (the bound of its unconditional model p(x)).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from src.atomic import savez as atomic_savez

log = logging.getLogger(__name__)

NUM_T_BINS = 10  # the per-t VB terms are summarised over this many equal ranges of t


@torch.no_grad()
def nll_terms(
    module,
    batches: Iterable,
    max_batches: int | None = None,
    max_images: int | None = None,
    clip_denoised: bool = True,
    generator: torch.Generator | None = None,
    use_ema: bool = True,
    progress: bool = False,
    with_labels: bool = False,
) -> dict:
    """Run `diffusion.calc_bpd_loop` over (x, y) batches (the net sees y when with_labels, else no label:
    the null label of a conditional net); returns per-image arrays total_bpd [N], prior_bpd [N], vb [N, T],
    xstart_mse [N, T], mse [N, T] (numpy, float64)."""
    if max_batches is not None and max_batches <= 0:
        raise ValueError(f"nll_batches must be positive (or null for all), got {max_batches}")
    if max_images is not None and max_images <= 0:
        raise ValueError(f"nll_num_images must be positive (or null for all), got {max_images}")
    model = module.ema.model if use_ema else module.net
    parts = {k: [] for k in ("total_bpd", "prior_bpd", "vb", "xstart_mse", "mse")}
    seen = 0
    for index, batch in enumerate(batches):
        if (max_batches is not None and index >= max_batches) or (max_images is not None and seen >= max_images):
            break
        x0 = batch[0] if isinstance(batch, (tuple, list)) else batch
        keep = x0.shape[0] if max_images is None else max_images - seen
        x0 = x0[:keep].to(module.device)
        kwargs = {"y": batch[1][:keep].to(module.device)} if with_labels else None
        out = module.diffusion.calc_bpd_loop(
            model, x0, clip_denoised=clip_denoised, model_kwargs=kwargs, generator=generator, progress=progress
        )
        for key in parts:
            parts[key].append(out[key].double().cpu())
        seen += x0.shape[0]
        running = torch.cat(parts["total_bpd"]).mean().item()
        log.info("nll: %d images, running bound %.4f bits/dim", seen, running)
    if seen == 0:
        raise ValueError("no images to compute the NLL of (empty validation set?)")
    return {key: torch.cat(values).numpy() for key, values in parts.items()}


def summarize(terms: dict) -> dict:
    """The report: mean bound (with its standard error) and its parts, all in bits/dim."""
    total, prior, vb = terms["total_bpd"], terms["prior_bpd"], terms["vb"]
    n, num_t = vb.shape
    vb_mean = vb.mean(axis=0)
    edges = np.linspace(0, num_t, min(NUM_T_BINS, num_t) + 1).round().astype(int)
    by_t = [
        {"t_from": int(lo), "t_to": int(hi - 1), "bpd": float(vb_mean[lo:hi].sum())}
        for lo, hi in zip(edges[:-1], edges[1:])
    ]
    return {
        "num_images": int(n),
        "num_timesteps": int(num_t),
        "bpd": float(total.mean()),
        "bpd_stderr": float(total.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
        "prior_bpd": float(prior.mean()),  # L_T
        "decoder_bpd": float(vb[:, 0].mean()),  # L_0 = -log p(x_0 | x_1)
        "kl_bpd": float(vb[:, 1:].sum(axis=1).mean()),  # sum of L_1 .. L_{T-1}
        "vb_by_t": by_t,  # where in t the bound comes from
        "vb_max_t": int(vb_mean.argmax()),
        "xstart_mse": float(terms["xstart_mse"].mean()),
        "eps_mse": float(terms["mse"].mean()),
    }


def save_terms(terms: dict, path: str | Path) -> Path:
    """Per-t means (vb, xstart_mse, mse [T]) and per-image bounds, as image_nll saves its terms."""
    return atomic_savez(
        path,
        vb=terms["vb"].mean(axis=0),
        xstart_mse=terms["xstart_mse"].mean(axis=0),
        mse=terms["mse"].mean(axis=0),
        total_bpd=terms["total_bpd"],
        prior_bpd=terms["prior_bpd"],
    )

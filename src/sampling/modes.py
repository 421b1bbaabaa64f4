"""sample.py's work: one function per mode (grid, trajectory, interpolate, invert), dispatched by MODES.

Every mode gets the loaded checkpoint, the sampler options merged once from the run's sampler config and the
command line, and the command's config; it returns the PNG files it wrote, by name.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from src.diffusion import (
    NO_GUIDANCE,
    Guidance,
    SamplerOptions,
    ddim_invert,
    ddim_sample,
    interpolate,
    interpolate_ddim,
    sample_trajectory,
    visited_timesteps,
)
from src.diffusion.editing import BLENDS
from src.errors import ConfigError

from .batches import sample_uint8_batches
from .conditioning import check_classifier_classes, check_guidance, grid_labels, guidance_scales, load_classifier
from .grids import image_grid, save_grid_png, trajectory_grid
from .loading import LoadedCheckpoint, load_checkpoint

log = logging.getLogger(__name__)
ENCODERS = ("q_sample", "ddim")


def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _count(cfg: DictConfig) -> int:
    return _positive(
        cfg.num_samples if cfg.get("num_samples") is not None else cfg[cfg.mode].num_samples, "num_samples"
    )


def save(cfg: DictConfig, loaded: LoadedCheckpoint, grid: torch.Tensor, name: str) -> Path:
    """The grid as <output_dir>/<name>, its images enlarged to at least cfg.min_image_size pixels."""
    path = Path(cfg.paths.output_dir) / name
    save_grid_png(grid, path, loaded.image_shape[-1], cfg.min_image_size)
    log.info("wrote %s", path)
    return path


def validation_images(loaded: LoadedCheckpoint, mode: str, n: int) -> torch.Tensor:
    """The first n images [n, C, H, W] in [-1, 1] of the checkpoint's validation split."""
    dataset = loaded.datamodule("validate").val_dataset
    if dataset is None or len(dataset) < n:
        size = 0 if dataset is None else len(dataset)
        raise ConfigError(f"mode={mode} needs {n} validation images, the data has {size}; lower num_samples")
    return torch.stack([dataset[i][0] for i in range(n)]).to(loaded.device)


def _generator(cfg: DictConfig, loaded: LoadedCheckpoint) -> torch.Generator:
    return torch.Generator(device=loaded.device).manual_seed(int(cfg.seed))


def _batches(
    cfg: DictConfig,
    loaded: LoadedCheckpoint,
    options: SamplerOptions,
    n: int,
    guidance: Guidance = NO_GUIDANCE,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """n uint8 images from one generator, in batches of cfg.batch_size (with labels: image i of class labels[i])."""
    batches = sample_uint8_batches(
        loaded.module,
        n,
        cfg.batch_size,
        options,
        guidance,
        generator=_generator(cfg, loaded),
        labels=labels,
        use_ema=loaded.use_ema,
        progress_bar=cfg.progress,
    )
    return torch.cat([b.cpu() for b in batches])


def grid(cfg: DictConfig, loaded: LoadedCheckpoint, options: SamplerOptions) -> dict[str, Path]:
    """A grid of samples; with labels (a class-conditional checkpoint or a classifier) one row per class and
    one grid per guidance scale, each from the same seed so the grids differ only by the guidance."""
    num_classes, classifier = _labels_and_classifier(cfg, loaded)
    if num_classes is None:
        images = _batches(cfg, loaded, options, _count(cfg))
        return {"samples": save(cfg, loaded, image_grid(images, nrow=cfg.grid.nrow), "samples.png")}
    per_class = _positive(
        cfg.num_samples if cfg.get("num_samples") is not None else cfg.grid.per_class, "grid.per_class"
    )
    labels = grid_labels(num_classes, per_class, cfg.get("class_label"))
    scales = _scales(cfg, loaded)
    written = {}
    for w in scales:
        guidance = Guidance(scale=w, classifier=classifier, classifier_scale=cfg.classifier.scale)
        images = _batches(cfg, loaded, options, len(labels), guidance, labels)
        name = "samples.png" if len(scales) == 1 else f"samples_w{w:g}.png"
        written[name] = save(cfg, loaded, image_grid(images, nrow=per_class), name)
    return written


def _scales(cfg: DictConfig, loaded: LoadedCheckpoint) -> list[float]:
    """guidance_scale as given, or (null) the run's own guidance_scale, or 0."""
    return guidance_scales(
        cfg.guidance_scale, loaded.num_classes, loaded.null_label, loaded.guidance_scale, fallback=(0.0,)
    )


def _labels_and_classifier(cfg: DictConfig, loaded: LoadedCheckpoint):
    """(number of classes to draw rows of, or None for a plain grid; the classifier of classifier guidance or
    None), after checking the guidance settings against the checkpoint."""
    num_classes = loaded.num_classes
    scales = _scales(cfg, loaded)
    with_classifier = cfg.classifier.ckpt_path is not None
    check_guidance(num_classes, scales, with_classifier, cfg.get("class_label"), loaded.null_label)
    if not with_classifier:
        return num_classes, None
    classifier = load_classifier(cfg.classifier.ckpt_path, loaded.diffusion, loaded.image_shape, loaded.device)
    return check_classifier_classes(classifier, num_classes, cfg.get("class_label")), classifier


def trajectory(cfg: DictConfig, loaded: LoadedCheckpoint, options: SamplerOptions) -> dict[str, Path]:
    """x_t and the predicted x_0 along the reverse process (DDPM Fig. 6), one row per sample."""
    spec = cfg.trajectory
    record = spec.record_timesteps
    traj = sample_trajectory(
        loaded.diffusion,
        loaded.net,
        (_count(cfg), *loaded.image_shape),
        options,
        record_every=spec.record_every,
        record_timesteps=OmegaConf.to_container(record) if OmegaConf.is_list(record) else record,
        generator=_generator(cfg, loaded),
        device=loaded.device,
        progress=cfg.progress,
    )
    log.info("recorded timesteps (columns): %s", traj.timesteps)
    return {
        "pred_x0": save(cfg, loaded, trajectory_grid(traj, "pred_x0"), "trajectory_pred_x0.png"),
        "xt": save(cfg, loaded, trajectory_grid(traj, "xt"), "trajectory_xt.png"),
    }


def interpolate_pairs(cfg: DictConfig, loaded: LoadedCheckpoint, options: SamplerOptions) -> dict[str, Path]:
    """Between pairs of validation images: rows = pairs, x_a | the decoded blends for each lambda | x_b."""
    spec, n = cfg.interpolate, _count(cfg)
    images = validation_images(loaded, cfg.mode, 2 * n)
    x_a, x_b = images[:n], images[n:]
    lambdas = torch.linspace(0.0, 1.0, spec.num_lambdas).tolist()
    if spec.encoder == "q_sample":
        mixed = interpolate(
            loaded.diffusion,
            loaded.net,
            x_a,
            x_b,
            lambdas,
            spec.t,
            options,
            method=spec.method,
            generator=_generator(cfg, loaded),
            progress=cfg.progress,
        )
        name = f"interpolate_t{spec.t}_{spec.method}.png"
    else:  # ddim
        mixed = interpolate_ddim(
            loaded.diffusion, loaded.net, x_a, x_b, lambdas, options, method=spec.method, progress=cfg.progress
        )
        name = f"interpolate_ddim_{spec.method}.png"
    rows = torch.cat([x_a.unsqueeze(1), mixed, x_b.unsqueeze(1)], dim=1)
    return {"interpolate": save(cfg, loaded, image_grid(rows), name)}


def invert(cfg: DictConfig, loaded: LoadedCheckpoint, options: SamplerOptions) -> dict[str, Path]:
    """DDIM inversion of validation images to x_T and their reconstruction: x_0 | x_T / 3 | reconstruction."""
    if options.sampler != "ddim":
        log.info("mode=invert always uses DDIM with eta=0 (the sampler's steps / spacing are kept)")
    x0 = validation_images(loaded, cfg.mode, _count(cfg))
    latent = ddim_invert(loaded.diffusion, loaded.net, x0, options, progress=cfg.progress)
    recon = ddim_sample(loaded.diffusion, loaded.net, latent, options, progress=cfg.progress)
    mse = (recon - x0).pow(2).mean().item()
    log.info(
        "latent mean %.3f std %.3f; reconstruction MSE %.2e (PSNR %.1f dB on [-1, 1])",
        latent.mean().item(),
        latent.std().item(),
        mse,
        10 * math.log10(4.0 / max(mse, 1e-12)),
    )
    rows = torch.stack([x0, latent / 3.0, recon], dim=1)
    return {"invert": save(cfg, loaded, image_grid(rows), "invert.png")}


MODES: dict[str, Callable[[DictConfig, LoadedCheckpoint, SamplerOptions], dict[str, Path]]] = {
    "grid": grid,
    "trajectory": trajectory,
    "interpolate": interpolate_pairs,
    "invert": invert,
}


def check_settings(cfg: DictConfig) -> int | None:
    """The sample config's own values, checked before anything is loaded; returns the timestep the reverse
    runs start from when it is not the last one (mode=interpolate with the q_sample encoder)."""
    if cfg.mode not in MODES:
        raise ConfigError(f"unknown mode {cfg.mode!r}; choose one of {', '.join(MODES)}")
    _count(cfg)
    _positive(cfg.batch_size, "batch_size")
    if OmegaConf.is_list(cfg.get("ema_std")):
        raise ConfigError(
            f"sample.py takes one ema_std, got {cfg.ema_std}; sweep widths with evaluate.py "
            f"ema_std=[...] or a multirun (-m ema_std=0.05,0.10)"
        )
    labelled = cfg.classifier.ckpt_path is not None or cfg.get("class_label") is not None
    if cfg.mode != "grid" and (labelled or any(guidance_scales(cfg.guidance_scale, None))):
        raise ConfigError(f"class_label, guidance_scale and classifier apply to mode=grid, not mode={cfg.mode}")
    if cfg.mode != "interpolate":
        return None
    spec = cfg.interpolate
    if spec.encoder not in ENCODERS:
        raise ConfigError(f"unknown interpolate.encoder {spec.encoder!r}; choose one of {', '.join(ENCODERS)}")
    if spec.method not in BLENDS:
        raise ConfigError(f"unknown interpolate.method {spec.method!r}; choose one of {', '.join(BLENDS)}")
    _positive(spec.num_lambdas, "interpolate.num_lambdas")
    if spec.num_lambdas < 2:
        raise ConfigError(f"interpolate.num_lambdas must be an integer >= 2, got {spec.num_lambdas!r}")
    return spec.t if spec.encoder == "q_sample" else None


def run(cfg: DictConfig) -> dict[str, Path]:
    """Sample from cfg.ckpt_path in cfg.mode; returns the written files by name."""
    until = check_settings(cfg)
    loaded, options = load_checkpoint(cfg, until=until)
    kept = visited_timesteps(loaded.diffusion, options)
    log.info(
        "mode=%s, sampler %s (%d steps, %d NFE from noise at timesteps %s), %s weights, on %s",
        cfg.mode,
        options.as_dict(),
        len(kept),
        options.nfe(loaded.diffusion.num_timesteps),
        kept if len(kept) <= 12 else f"{kept[:3]} ... {kept[-3:]}",
        "raw"
        if not loaded.use_ema
        else "EMA"
        if loaded.posthoc is None
        else f"post-hoc EMA std {loaded.posthoc.std:g} (snapshots of steps "
        f"{sorted(set(loaded.posthoc.snapshot_steps))})",
        loaded.device,
    )
    start = time.perf_counter()
    written = MODES[cfg.mode](cfg, loaded, options)
    log.info("done in %.1f s; outputs in %s", time.perf_counter() - start, Path(cfg.paths.output_dir).resolve())
    return written

"""evaluate.py's work: samples (npz + grid) of a checkpoint, one set per seed (and guidance scale), their
quality metrics (src.evaluation.scoring) and the test-set NLL -> metrics.json; or, with samples=<file.npz>,
the metrics of a file of samples from anywhere (src.evaluation.score_file).

The model, schedule, objective and data all come from the checkpoint's run config; the evaluate config
only says how to sample and what to measure.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from src.config_diff import UNSET, differences
from src.diffusion import SamplerOptions, visited_timesteps
from src.errors import ConfigError
from src.metrics.extractors import extractor_name
from src.metrics.reference_stats import dataset_name
from src.provenance import git_info
from src.sampling.conditioning import (
    check_guidance,
    guidance_scales,
)
from src.sampling.ema_rebuild import checked_stds
from src.sampling.loading import LoadedCheckpoint, load_checkpoint

from .figures import write_figures
from .interrupt import STOPS, sigterm_raises, stop_name
from .log_results import log_results
from .nll import nll_terms, save_terms, summarize
from .protocol import checked_seeds, checkpoint_hash, image_seed_range, sample_count_notes
from .report import Report, print_table
from .score_file import score_file
from .scoring import Scorer, score_settings
from .sweep import Job, guided_setup, run_sweep, sweep_points
from .sweep import stages as sweep_stages

log = logging.getLogger(__name__)


def _positive_int(cfg: DictConfig, key: str, optional: bool = False) -> int | None:
    value = cfg.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer{' or null' if optional else ''}, got {value!r}")
    return value


# Train-config groups that may appear on evaluate.py's command line (+model.base_channels=64, ...):
# the checkpoint fixes them, so such values are reported and ignored. `data` overrides are applied.
FIXED_BY_CHECKPOINT = ("model", "schedule", "objective", "diffusion", "module")


def command_line_differences(trained: DictConfig, cfg: DictConfig) -> dict:
    """Log and return the values given here that differ from the checkpoint's own config."""
    old = OmegaConf.to_container(trained, resolve=True)
    new = OmegaConf.to_container(cfg, resolve=True)
    ignored = differences(old, new, [k for k in FIXED_BY_CHECKPOINT if k in cfg])
    ignored = [(k, a, b) for k, a, b in ignored if b != UNSET]  # only what the command line sets
    applied = [(k, a, b) for k, a, b in differences(old, new, ["data"]) if b != UNSET]
    if ignored:
        log.warning(
            "using the checkpoint's own config; ignoring command-line values that differ from it: %s",
            "; ".join(f"{k}: checkpoint {a!r}, command line {b!r}" for k, a, b in ignored),
        )
    if applied:
        log.warning(
            "data overrides applied on top of the checkpoint's data config: %s",
            "; ".join(f"{k}: checkpoint {a!r}, command line {b!r}" for k, a, b in applied),
        )
    fmt = lambda rows: {k: {"checkpoint": a, "command_line": b} for k, a, b in rows}  # noqa: E731
    return {"ignored": fmt(ignored), "data_overrides": fmt(applied)}


def checkpoint_splits(loaded: LoadedCheckpoint):
    """reference=train / val: (dataset, dataset name) of the checkpoint's data, built once."""

    def split_dataset(split: str):
        datamodule = loaded.datamodule("fit")
        return {"train": datamodule.train_dataset, "val": datamodule.val_dataset}[split], dataset_name(datamodule)

    return split_dataset


def check_settings(cfg: DictConfig) -> None:
    """The evaluate config's own values, checked before anything is loaded."""
    for key in ("num_samples", "batch_size", "grid_size"):
        _positive_int(cfg, key)
    for key in ("nll_batches", "nll_num_images", "nll_batch_size"):
        _positive_int(cfg, key, optional=True)
    try:
        checked_seeds(cfg.get("seeds"), cfg.seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    stds = checked_stds(cfg.get("ema_std"))
    if stds is not None and len(stds) > 1 and (cfg.nll or cfg.rate_distortion):
        raise ConfigError("nll / rate_distortion with several ema_std values: give one ema_std for the NLL pass")
    settings = score_settings(cfg)
    extractor_name(cfg.extractor)
    if cfg.fid and "is" in settings.metrics and cfg.num_samples < cfg.isc_splits and cfg.get("samples") is None:
        raise ConfigError(
            f"num_samples={cfg.num_samples} is below isc_splits={cfg.isc_splits}; the Inception Score "
            f"needs at least one sample per split"
        )


def protocol(cfg: DictConfig, loaded: LoadedCheckpoint, options: SamplerOptions, scorer: Scorer | None) -> dict:
    """What the numbers were computed on, in one place (see src.evaluation.protocol)."""
    seeds = checked_seeds(cfg.get("seeds"), int(cfg.seed))
    return {
        "num_samples": cfg.num_samples,
        "seeds": seeds,
        "image_seeds": {str(s): list(image_seed_range(s, cfg.num_samples)) for s in seeds},
        "sampler": options.as_dict(),
        "steps": len(visited_timesteps(loaded.diffusion, options)),
        "nfe": options.nfe(loaded.diffusion.num_timesteps),
        "metrics": list(score_settings(cfg).metrics) if scorer is not None else [],
        "extractor": extractor_name(cfg.extractor) if scorer is not None else None,
        "reference": scorer.spec if scorer is not None else None,
        "checkpoint_sha256_prefix": checkpoint_hash(loaded.path),
        "weights": weights_name(loaded),
        # the EMA widths asked for and, per width, the snapshots (steps, stds) its weights were rebuilt from
        "ema_std": checked_stds(cfg.get("ema_std")),
        "posthoc_ema": None if loaded.posthoc is None else [loaded.posthoc.protocol()],
        "notes": sample_count_notes(cfg.num_samples) if scorer is not None else [],
    }


def weights_name(loaded: LoadedCheckpoint) -> str:
    if loaded.posthoc is not None:
        return "posthoc_ema"
    return "ema" if loaded.use_ema else "raw"


def run(cfg: DictConfig) -> dict:
    """Evaluate cfg.ckpt_path (or score cfg.samples); returns the metrics.json content."""
    check_settings(cfg)
    with sigterm_raises():
        content = score_file(cfg) if cfg.get("samples") is not None else evaluate_checkpoint(cfg)
    log_results(cfg, content, Path(cfg.paths.output_dir))
    return content


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    if OmegaConf.is_missing(cfg, "ckpt_path") or cfg.ckpt_path is None:
        raise ConfigError(
            "ckpt_path is required: give ckpt_path=PATH/TO/last.ckpt, or samples=<file.npz> to score a file of samples"
        )
    loaded, options = load_checkpoint(cfg)
    out_dir = Path(cfg.paths.output_dir)
    diffusion = loaded.diffusion
    scorer = Scorer(cfg, loaded.image_shape, loaded.device, checkpoint_splits(loaded)) if cfg.fid else None
    report = Report(
        out_dir / "metrics.json",
        {
            "checkpoint": str(loaded.path),
            "global_step": loaded.global_step,
            **git_info(),
            "config_vs_command_line": command_line_differences(loaded.trained, cfg),
            "data": {
                "target": loaded.trained.data._target_,
                "image_size": loaded.image_shape[1],
                "channels": loaded.image_shape[0],
            },
            "diffusion": {
                "num_timesteps": diffusion.num_timesteps,
                "var_type": diffusion.var_type,
                "mean_type": diffusion.mean_type,
                "schedule": OmegaConf.to_container(loaded.trained.schedule),
            },
            "weights": weights_name(loaded),
            "protocol": protocol(cfg, loaded, options, scorer),
        },
    )
    try:
        stages(Job(cfg, loaded, options, out_dir, report, scorer))
    except STOPS as err:
        report.stopped(stop_name(err))
        raise
    print_table(report.content, report.path)
    return report.content


def stages(job: Job) -> None:
    cfg, loaded, report = job.cfg, job.loaded, job.report
    # 1-2. samples (npz + PNG grid) and their metrics, one set per point of the sweep (EMA width, guidance scale,
    # seed); class-conditional checkpoints and classifier guidance: every class equally often
    num_classes = loaded.num_classes
    scales = guidance_scales(cfg.get("guidance_scales"), num_classes, loaded.null_label, loaded.guidance_scale)
    classifier_path = cfg.get("classifier", {}).get("ckpt_path")
    check_guidance(num_classes, scales, classifier_path is not None, null_label=loaded.null_label)
    guided = num_classes is not None or classifier_path is not None
    seeds = checked_seeds(cfg.get("seeds"), int(cfg.seed))
    points = sweep_points(checked_stds(cfg.get("ema_std")), scales if guided else None, seeds)
    nll_modes = nll_conditionings(loaded) if cfg.nll or cfg.rate_distortion else []
    report.expect(sweep_stages(points, scored=job.scorer is not None))
    report.expect([key for key, _, _ in nll_modes])
    setup = guided_setup(cfg, loaded, report, classifier_path) if guided else None
    run_sweep(job, points, setup)
    # 3. NLL bound on the validation split, full T (with the data's labels and / or the null label), and the
    # figures of its per-timestep terms
    for key, conditioning, with_labels in nll_modes:
        entry, terms = nll_report(cfg, loaded, job.out_dir, conditioning, with_labels)
        entry["figures"] = write_figures(terms, job.out_dir, key.removeprefix("nll"), bool(cfg.rate_distortion))
        report.update(**{key: entry})
        report.done(key)


def nll_conditionings(loaded: LoadedCheckpoint) -> list[tuple[str, str, bool]]:
    """(report key, conditioning, with labels) of each NLL pass: a conditional net with the data's labels
    (the bound val/bpd reports) and, with a null label, also unconditionally."""
    if loaded.num_classes is None:
        return [("nll", "unconditional model", False)]
    modes = [("nll", "data labels", True)]
    if loaded.null_label:
        modes.append(("nll_null_label", "null label (the unconditional model)", False))
    return modes


def nll_report(
    cfg: DictConfig, loaded: LoadedCheckpoint, out_dir: Path, conditioning: str, with_labels: bool
) -> tuple[dict, dict]:
    """The full-T bound in bits/dim on the validation split, with its parts (nll_terms*.npz); (entry, terms)."""
    changes = {} if cfg.get("nll_batch_size") is None else {"batch_size": cfg.nll_batch_size}
    datamodule = loaded.datamodule("validate", **changes)
    start = time.perf_counter()
    generator = torch.Generator(device=loaded.device).manual_seed(int(cfg.seed))
    try:
        terms = nll_terms(
            loaded.module,
            datamodule.val_dataloader(),
            max_batches=cfg.get("nll_batches"),
            max_images=cfg.get("nll_num_images"),
            clip_denoised=cfg.nll_clip_denoised,
            generator=generator,
            use_ema=loaded.use_ema,
            with_labels=with_labels,
            progress=True,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    name = "nll_terms.npz" if with_labels or loaded.num_classes is None else "nll_terms_null_label.npz"
    return {
        "split": "val",
        "conditioning": conditioning,
        "clip_denoised": bool(cfg.nll_clip_denoised),
        **summarize(terms),
        "terms": str(save_terms(terms, out_dir / name)),
        "seconds": round(time.perf_counter() - start, 2),
    }, terms

"""evaluate.py's work: samples (npz + grid), FID/IS and the test-set NLL of a checkpoint -> metrics.json.

The model, schedule, objective and data all come from the checkpoint's run config; the evaluate config
only says how to sample and what to measure.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from src.config_diff import UNSET, differences
from src.data import DatasetNotFoundError
from src.diffusion import NO_GUIDANCE, Guidance, SamplerOptions, visited_timesteps
from src.errors import ConfigError

from .context import LoadedCheckpoint, load_checkpoint
from .guidance import (balanced_labels, check_classifier_classes, check_guidance, guidance_scales, load_classifier,
                       per_class_rows)
from .metrics import (InceptionFeatures, MissingWeightsError, ReferenceImages, accumulate, dataset_name, fid_and_is,
                      reference_statistics, resolve_weights)
from .nll import nll_terms, save_terms, summarize
from .provenance import git_info
from .samples import sample_uint8_batches, save_grid, save_npz

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
        log.warning("using the checkpoint's own config; ignoring command-line values that differ from it: %s",
                    "; ".join(f"{k}: checkpoint {a!r}, command line {b!r}" for k, a, b in ignored))
    if applied:
        log.warning("data overrides applied on top of the checkpoint's data config: %s",
                    "; ".join(f"{k}: checkpoint {a!r}, command line {b!r}" for k, a, b in applied))
    fmt = lambda rows: {k: {"checkpoint": a, "command_line": b} for k, a, b in rows}  # noqa: E731
    return {"ignored": fmt(ignored), "data_overrides": fmt(applied)}


class Report:
    """metrics.json, rewritten after every stage so a late failure keeps the earlier results."""

    def __init__(self, path: Path, content: dict):
        self.path, self.content = path, content
        self.write()

    def update(self, **entries) -> None:
        self.content.update(entries)
        self.write()

    def updater(self, entry: dict):
        """update(**entries) for a dict nested in the report: adds to it and rewrites the file."""

        def update(**entries) -> None:
            entry.update(entries)
            self.write()

        return update

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.content, indent=2) + "\n")


def compute_fid_is(cfg: DictConfig, loaded: LoadedCheckpoint, images: torch.Tensor) -> dict:
    """FID/IS of `images` (uint8) against the run's training data; raises MissingWeightsError or
    DatasetNotFoundError when they cannot be computed."""
    weights = resolve_weights(cfg.get("feature_extractor_weights_path"))
    extractor = InceptionFeatures(weights).to(loaded.device)
    datamodule = loaded.datamodule("fit")
    split = cfg.reference_split
    dataset = {"train": datamodule.train_dataset, "val": datamodule.val_dataset}[split]
    real = ReferenceImages(dataset, cfg.get("num_reference_images"))
    batch_size = cfg.batch_size
    reference = reference_statistics(extractor, real, dataset_name(datamodule), split, cfg.cache_dir,
                                     batch_size=batch_size)
    stats, logits = accumulate(extractor, images.split(batch_size), keep_logits=True)
    result = fid_and_is(stats, logits, reference, cfg.isc_splits)
    return {"fid": result["fid"], "is": result["is"], "is_std": result["is_std"],
            "fid_reference": reference.meta, "fid_weights": str(weights)}


def sample_and_score(cfg: DictConfig, loaded: LoadedCheckpoint, options: SamplerOptions, out_dir: Path,
                     update, labels: torch.Tensor | None = None, guidance: Guidance = NO_GUIDANCE) -> None:
    """Sample cfg.num_samples images -> npz + PNG grid in out_dir, then FID / IS; `update(**entries)`
    records each stage as it completes. With labels, the grid has one row per class."""
    num_samples = cfg.num_samples
    log.info("sampling %d images (%s) on %s", num_samples, options.as_dict(), loaded.device)
    start = time.perf_counter()
    generator = torch.Generator(device=loaded.device).manual_seed(int(cfg.seed))
    images = torch.cat([b.cpu() for b in sample_uint8_batches(loaded.module, num_samples, cfg.batch_size, options,
                                                              guidance, generator=generator, progress=True,
                                                              labels=labels)])
    seconds = time.perf_counter() - start
    npz = save_npz(images, out_dir, labels)
    if labels is None:
        grid = save_grid(images[: cfg.grid_size], out_dir / "samples_grid.png", min_image_size=cfg.min_image_size)
    else:
        num_classes = int(labels.max()) + 1
        per_row = max(1, cfg.grid_size // num_classes)
        grid = save_grid(per_class_rows(images, labels, num_classes, per_row), out_dir / "samples_grid.png",
                         nrow=per_row, min_image_size=cfg.min_image_size)
    timesteps = visited_timesteps(loaded.diffusion, options)
    update(samples={"num_samples": num_samples, "sampler": options.as_dict(), "timesteps": timesteps,
                    "nfe": options.nfe(loaded.diffusion.num_timesteps),
                    "seed": int(cfg.seed), "npz": str(npz),
                    "grid": str(grid), "seconds": round(seconds, 2),
                    "images_per_sec": round(num_samples / max(seconds, 1e-9), 2)})
    if not cfg.fid:
        update(fid=None, **{"is": None, "is_std": None}, fid_unavailable="not requested (fid=false)")
        return
    start = time.perf_counter()
    try:
        metrics = compute_fid_is(cfg, loaded, images)
    except (MissingWeightsError, DatasetNotFoundError) as err:
        log.warning("FID/IS not computed: %s", err)
        update(fid=None, **{"is": None, "is_std": None}, fid_unavailable=str(err))
    else:
        metrics["fid_seconds"] = round(time.perf_counter() - start, 2)
        update(**metrics)


def check_settings(cfg: DictConfig) -> None:
    """The evaluate config's own values, checked before anything is loaded."""
    for key in ("num_samples", "batch_size", "grid_size"):
        _positive_int(cfg, key)
    for key in ("nll_batches", "nll_num_images", "nll_batch_size"):
        _positive_int(cfg, key, optional=True)
    if cfg.reference_split not in ("train", "val"):
        raise ConfigError(f"reference_split must be train or val, got {cfg.reference_split!r}")
    if cfg.fid and cfg.num_samples < cfg.isc_splits:
        raise ConfigError(f"num_samples={cfg.num_samples} is below isc_splits={cfg.isc_splits}; the Inception Score "
                          f"needs at least one sample per split")


def run(cfg: DictConfig) -> dict:
    """Evaluate cfg.ckpt_path; returns the metrics.json content."""
    check_settings(cfg)
    loaded, options = load_checkpoint(cfg)
    out_dir = Path(cfg.paths.output_dir)
    diffusion = loaded.diffusion
    report = Report(out_dir / "metrics.json", {
        "checkpoint": str(loaded.path), "global_step": loaded.global_step, **git_info(),
        "config_vs_command_line": command_line_differences(loaded.trained, cfg),
        "data": {"target": loaded.trained.data._target_, "image_size": loaded.image_shape[1],
                 "channels": loaded.image_shape[0]},
        "diffusion": {"num_timesteps": diffusion.num_timesteps, "var_type": diffusion.var_type,
                      "mean_type": diffusion.mean_type, "schedule": OmegaConf.to_container(loaded.trained.schedule)},
        "weights": "ema" if loaded.use_ema else "raw",
    })
    # 1-2. samples (npz + PNG grid) and their FID / IS; class-conditional checkpoints and classifier guidance:
    # one sample set per guidance scale, every class equally often
    num_classes = loaded.num_classes
    scales = guidance_scales(cfg.get("guidance_scales"), num_classes, loaded.null_label)
    classifier_path = cfg.get("classifier", {}).get("ckpt_path")
    check_guidance(num_classes, scales, classifier_path is not None, null_label=loaded.null_label)
    if num_classes is None and classifier_path is None:
        sample_and_score(cfg, loaded, options, out_dir, report.update)
    else:
        guided_runs(cfg, loaded, options, out_dir, report, scales, classifier_path)
    # 3. NLL bound on the validation split, full T
    if cfg.nll:
        report.update(nll=nll_report(cfg, loaded, out_dir))
    print_table(report.content, report.path)
    return report.content


def guided_runs(cfg: DictConfig, loaded: LoadedCheckpoint, options: SamplerOptions, out_dir: Path, report: Report,
                scales: list[float], classifier_path) -> None:
    """One sample set (and FID / IS) per guidance scale, every class equally often, under guidance.runs."""
    classifier, num_classes = None, loaded.num_classes
    if classifier_path is not None:
        classifier = load_classifier(classifier_path, loaded.diffusion, loaded.image_shape, loaded.device)
        num_classes = check_classifier_classes(classifier, num_classes, None)
    labels = balanced_labels(cfg.num_samples, num_classes)
    runs = []
    report.update(guidance={"num_classes": num_classes, "labels": "every class equally often",
                            "classifier": None if classifier_path is None else
                            {"ckpt_path": str(classifier_path), "scale": float(cfg.classifier.scale)},
                            "runs": runs})
    for w in scales:
        runs.append({"guidance_scale": w})
        guidance = Guidance(scale=w, classifier=classifier, classifier_scale=float(cfg.classifier.scale))
        sample_and_score(cfg, loaded, options, out_dir / f"guidance_w{w:g}", report.updater(runs[-1]),
                         labels=labels, guidance=guidance)


def nll_report(cfg: DictConfig, loaded: LoadedCheckpoint, out_dir: Path) -> dict:
    """The full-T bound in bits/dim on the validation split, with its parts (nll_terms.npz)."""
    changes = {} if cfg.get("nll_batch_size") is None else {"batch_size": cfg.nll_batch_size}
    datamodule = loaded.datamodule("validate", **changes)
    start = time.perf_counter()
    generator = torch.Generator(device=loaded.device).manual_seed(int(cfg.seed))
    try:
        terms = nll_terms(loaded.module, datamodule.val_dataloader(), max_batches=cfg.get("nll_batches"),
                          max_images=cfg.get("nll_num_images"), clip_denoised=cfg.nll_clip_denoised,
                          generator=generator, use_ema=loaded.use_ema)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return {"split": "val", "clip_denoised": bool(cfg.nll_clip_denoised), **summarize(terms),
            "terms": str(save_terms(terms, out_dir / "nll_terms.npz")), "seconds": round(time.perf_counter() - start, 2)}


def _sample_rows(entry: dict) -> list[tuple[str, str]]:
    s = entry["samples"]
    sampler = s["sampler"]
    steps = len(s["timesteps"])
    rows = [("samples", f"{s['num_samples']} ({sampler.get('sampler')}, {steps} steps = {s['nfe']} NFE, eta {sampler.get('eta')}, "
                        f"seed {s['seed']}; {s['images_per_sec']} images/s) -> {s['npz']}")]
    if entry.get("fid") is not None:
        ref = entry["fid_reference"]
        rows.append(("FID", f"{entry['fid']:.3f} ({s['num_samples']} samples vs {ref['dataset']} {ref['split']}, "
                            f"{ref['num_images']} images)"))
        rows.append(("IS", f"{entry['is']:.3f} +- {entry['is_std']:.3f}"))
    else:
        rows.append(("FID / IS", f"not computed: {entry.get('fid_unavailable')}"))
    return rows


def print_table(content: dict, path: Path) -> None:
    rows = [("checkpoint", f"{content['checkpoint']} (step {content['global_step']})")]
    if "guidance" in content:
        g = content["guidance"]
        classifier = g["classifier"]
        rows.append(("guidance", f"{g['num_classes']} classes, {g['labels']}" + (
            f"; classifier {classifier['ckpt_path']} at scale {classifier['scale']}" if classifier else "")))
        for run_entry in g["runs"]:
            rows.extend((f"w={run_entry['guidance_scale']:g} {key}", value)
                        for key, value in _sample_rows(run_entry))
    else:
        rows.extend(_sample_rows(content))
    if "nll" in content:
        n = content["nll"]
        rows.append(("NLL (val)", f"{n['bpd']:.4f} bits/dim over {n['num_images']} images, T={n['num_timesteps']}: "
                                  f"L_T {n['prior_bpd']:.4f} + L_1..T-1 {n['kl_bpd']:.4f} "
                                  f"+ L_0 {n['decoder_bpd']:.4f}"))
    rows.append(("metrics", str(path)))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows), flush=True)

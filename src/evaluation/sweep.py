"""evaluate.py's sweep: one list of points (EMA width, guidance scale, seed), built once and sampled in one loop.

Each point is one sample set (npz + PNG grid) and its metrics. Where it lands in metrics.json follows the
sweep's shape: with several EMA widths under posthoc_ema.runs, with guidance under guidance.runs (one per
scale), with several seeds under runs (one per seed, plus their summary); a level with a single value adds no
nesting and no folder. The report names each point's stages with `SweepPoint.stage`, so what was expected and
what was done are the same strings.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from src.diffusion import NO_GUIDANCE, Guidance, SamplerOptions, visited_timesteps
from src.sampling.batches import sample_uint8_batches, save_npz
from src.sampling.conditioning import balanced_labels, check_classifier_classes, load_classifier, per_class_rows
from src.sampling.grids import save_grid
from src.sampling.loading import LoadedCheckpoint

from .figures import plot_quality_vs_ema_std
from .protocol import class_balance_note, image_seed_range, summary
from .report import Report
from .scoring import Scorer, metric_keys, not_requested, score_settings

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One evaluate.py command on a loaded checkpoint: its config, the checkpoint, the sampler options, the output
    folder, the report being written and the scorer (None with fid=false)."""

    cfg: DictConfig
    loaded: LoadedCheckpoint
    options: SamplerOptions
    out_dir: Path
    report: Report
    scorer: Scorer | None


@dataclass(frozen=True)
class SweepPoint:
    """One sample set: the EMA width of a sweep over several (else None), the guidance scale of a guided
    checkpoint (else None: unguided) and the seed."""

    ema_std: float | None
    scale: float | None
    seed: int

    def stage(self, part: str) -> str:
        """The report's name of this point's `part` ("samples" or "metrics")."""
        std = "" if self.ema_std is None else f"ema_std={self.ema_std:g} "
        scale = "" if self.scale is None else f"w={self.scale:g} "
        return f"{part} {std}{scale}seed {self.seed}"


def stages(points: list[SweepPoint], scored: bool) -> list[str]:
    """The report stages of the sweep: each point's samples, and its metrics when they are computed."""
    return [p.stage(part) for p in points for part in ("samples", *(("metrics",) if scored else ()))]


def sweep_points(stds: list[float] | None, scales: list[float] | None, seeds: list[int]) -> list[SweepPoint]:
    """Every point in sampling order: widths outermost (the weights change least often), then scales, then seeds."""
    widths = stds if stds is not None and len(stds) > 1 else [None]
    return [SweepPoint(std, w, s) for std in widths for w in (scales or [None]) for s in seeds]


@dataclass
class Guided:
    """What every guided sample set shares: the classifier (classifier guidance) and the balanced labels."""

    classifier: torch.nn.Module | None
    classifier_scale: float
    labels: torch.Tensor
    info: dict  # guidance.* in metrics.json, without its runs


def guided_setup(cfg: DictConfig, loaded: LoadedCheckpoint, report: Report, classifier_path) -> Guided:
    """Load the classifier (if any) and draw the labels once: every class equally often."""
    classifier, num_classes = None, loaded.num_classes
    if classifier_path is not None:
        classifier = load_classifier(classifier_path, loaded.diffusion, loaded.image_shape, loaded.device)
        num_classes = check_classifier_classes(classifier, num_classes, None)
    labels = balanced_labels(cfg.num_samples, num_classes)
    note = class_balance_note(labels, num_classes)
    if note is not None and note not in report.content["protocol"]["notes"]:
        log.warning("%s", note)
        report.content["protocol"]["notes"].append(note)
    info = {
        "num_classes": num_classes,
        "labels": "every class equally often"
        if note is None
        else "classes in turn 0, 1, ..., K-1, 0, ... (unequal: see protocol.notes)",
        "classifier": None
        if classifier_path is None
        else {"ckpt_path": str(classifier_path), "scale": float(cfg.classifier.scale)},
    }
    return Guided(classifier, float(cfg.classifier.scale), labels, info)


def run_sweep(job: Job, points: list[SweepPoint], guided: Guided | None) -> None:
    """Sample and score every point in order, recording each stage in the report as it completes (the caller
    has told the report to expect `stages(points, scored)`)."""
    cfg, report = job.cfg, job.report
    seeds = list(dict.fromkeys(p.seed for p in points))
    scales = list(dict.fromkeys(p.scale for p in points))
    entries: dict[tuple, dict] = {}
    for i, point in enumerate(points):
        width_entry, folder = _width_entry(point, job, entries, first=i == 0)
        scale_entry = width_entry
        if point.scale is not None:
            scale_entry = _scale_entry(point, report, width_entry, guided, entries)
            folder = folder if len(scales) == 1 else folder / f"guidance_w{point.scale:g}"
        entry = scale_entry
        if len(seeds) > 1:
            entry = {"seed": point.seed}
            scale_entry.setdefault("runs", []).append(entry)
            report.updater(scale_entry)(runs=scale_entry["runs"])
            folder = folder / f"seed{point.seed}"
        _sample_and_score(job, folder, entry, point, guided)
        if len(seeds) > 1 and point.seed == seeds[-1]:
            keys = metric_keys(score_settings(cfg), cfg.extractor)
            report.updater(scale_entry)(summary=summary(scale_entry["runs"], keys))
    if points[0].ema_std is not None and job.scorer is not None:
        runs = report.content["posthoc_ema"]["runs"]
        keys = metric_keys(score_settings(cfg), cfg.extractor)
        figure = plot_quality_vs_ema_std(runs, keys, job.out_dir / "quality_vs_ema_std.png")
        report.updater(report.content["posthoc_ema"])(figure=str(figure))


def _width_entry(point: SweepPoint, job: Job, entries: dict, first: bool) -> tuple[dict, Path]:
    """The report entry and folder of the point's weights: the report itself, or one run per EMA width."""
    report, loaded = job.report, job.loaded
    if point.ema_std is None:
        return report.content, job.out_dir
    key = (point.ema_std,)
    if key not in entries:
        if first:  # the checkpoint was loaded with the first width
            report.update(posthoc_ema={"runs": []})
        else:
            report.content["protocol"]["posthoc_ema"].append(loaded.use_posthoc_ema(point.ema_std).protocol())
        entries[key] = {"ema_std": point.ema_std, "posthoc_ema": loaded.posthoc.protocol()}
        report.content["posthoc_ema"]["runs"].append(entries[key])
    return entries[key], job.out_dir / f"ema_std{point.ema_std:g}"


def _scale_entry(point, report, width_entry: dict, guided: Guided, entries) -> dict:
    """One run per guidance scale under guidance.runs of the weights' entry."""
    key = (point.ema_std, point.scale)
    if key not in entries:
        if "guidance" not in width_entry:
            report.updater(width_entry)(guidance={**guided.info, "runs": []})
        entries[key] = {"guidance_scale": point.scale}
        width_entry["guidance"]["runs"].append(entries[key])
    return entries[key]


def _sample_and_score(job: Job, folder: Path, entry: dict, point: SweepPoint, guided: Guided | None) -> None:
    labels, guidance = None, NO_GUIDANCE
    if guided is not None:
        labels = guided.labels
        guidance = Guidance(scale=point.scale, classifier=guided.classifier, classifier_scale=guided.classifier_scale)
    update = job.report.updater(entry)
    images, samples = sample_set(job.cfg, job.loaded, job.options, folder, point.seed, labels, guidance)
    update(samples=samples)
    job.report.done(point.stage("samples"))
    update(**(job.scorer(images) if job.scorer is not None else not_requested(job.cfg)))
    if job.scorer is not None:
        job.report.done(point.stage("metrics"))


def sample_set(
    cfg: DictConfig,
    loaded: LoadedCheckpoint,
    options: SamplerOptions,
    out_dir: Path,
    seed: int,
    labels: torch.Tensor | None,
    guidance: Guidance,
) -> tuple[torch.Tensor, dict]:
    """cfg.num_samples images from the seed range of `seed` -> npz + PNG grid in out_dir; (images, entry)."""
    num_samples = cfg.num_samples
    first, last = image_seed_range(seed, num_samples)
    log.info(
        "sampling %d images (%s, image seeds %d..%d) on %s", num_samples, options.as_dict(), first, last, loaded.device
    )
    start = time.perf_counter()
    batches = sample_uint8_batches(
        loaded.module,
        num_samples,
        cfg.batch_size,
        options,
        guidance,
        progress=True,
        labels=labels,
        image_seed_start=first,
        use_ema=loaded.use_ema,
    )
    images = torch.cat([b.cpu() for b in batches])
    seconds = time.perf_counter() - start
    npz = save_npz(images, out_dir, labels)
    grid_path = out_dir / "samples_grid.png"
    if labels is None:
        grid = save_grid(images[: cfg.grid_size], grid_path, min_image_size=cfg.min_image_size)
    else:  # one row per class
        num_classes = int(labels.max()) + 1
        per_row = max(1, cfg.grid_size // num_classes)
        rows = per_class_rows(images, labels, num_classes, per_row)
        grid = save_grid(rows, grid_path, nrow=per_row, min_image_size=cfg.min_image_size)
    return images, {
        "num_samples": num_samples,
        "sampler": options.as_dict(),
        "timesteps": visited_timesteps(loaded.diffusion, options),
        "nfe": options.nfe(loaded.diffusion.num_timesteps),
        "seed": seed,
        "image_seeds": [first, last],
        "npz": str(npz),
        "grid": str(grid),
        "seconds": round(seconds, 2),
        "images_per_sec": round(num_samples / max(seconds, 1e-9), 2),
    }

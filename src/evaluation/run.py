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
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.config_diff import UNSET, differences
from src.data import DatasetNotFoundError
from src.errors import ConfigError

from .checkpoint import module_from_checkpoint, read_checkpoint, run_config
from .compiled import compile_for_sampling, compile_mode
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


def sampler_kwargs(trained: dict, cfg: DictConfig) -> dict:
    """The run's sampler config, then the `sampler=` group chosen here, then `steps=` / `eta=` on top."""
    kwargs = dict(trained.get("sampler") or {})
    if cfg.get("sampler") is not None:
        kwargs.update(OmegaConf.to_container(cfg.sampler, resolve=True))
    for key in ("steps", "eta"):
        if cfg.get(key) is not None:
            kwargs[key] = cfg[key]
    return kwargs


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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def compute_fid_is(cfg: DictConfig, trained: DictConfig, images: torch.Tensor, device: torch.device) -> dict:
    """FID/IS of `images` (uint8) against the run's training data; raises MissingWeightsError or
    DatasetNotFoundError when they cannot be computed."""
    weights = resolve_weights(cfg.get("feature_extractor_weights_path"))
    extractor = InceptionFeatures(weights).to(device)
    data_cfg = OmegaConf.merge(trained.data, cfg.get("data") or {})
    datamodule = instantiate(data_cfg)
    datamodule.setup("fit")
    split = cfg.reference_split
    dataset = {"train": datamodule.train_dataset, "val": datamodule.val_dataset}[split]
    real = ReferenceImages(dataset, cfg.get("num_reference_images"))
    name = dataset_name(datamodule)
    batch_size = cfg.batch_size
    reference = reference_statistics(extractor, real, name, split, cfg.cache_dir, batch_size=batch_size)
    stats, logits = accumulate(extractor, images.split(batch_size), keep_logits=True)
    result = fid_and_is(stats, logits, reference, cfg.isc_splits)
    return {"fid": result["fid"], "is": result["is"], "is_std": result["is_std"],
            "fid_reference": reference.meta, "fid_weights": str(weights)}


def sample_and_score(cfg: DictConfig, trained: DictConfig, module, sampling: dict, device: torch.device, out_dir: Path,
                     num_samples: int, batch_size: int, update, labels: torch.Tensor | None = None,
                     **guidance) -> None:
    """Sample num_samples images (EMA weights) -> npz + PNG grid in out_dir, then FID / IS; `update(**entries)`
    records each stage as it completes. With labels, the grid has one row per class."""
    log.info("sampling %d images (%s) on %s", num_samples, sampling, device)
    start = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    images = torch.cat([b.cpu() for b in sample_uint8_batches(module, num_samples, batch_size, generator=generator,
                                                              progress=True, labels=labels, **sampling, **guidance)])
    seconds = time.perf_counter() - start
    npz = save_npz(images, out_dir, labels)
    if labels is None:
        grid = save_grid(images[: cfg.grid_size], out_dir / "samples_grid.png")
    else:
        num_classes = int(labels.max()) + 1
        per_row = max(1, cfg.grid_size // num_classes)
        grid = save_grid(per_class_rows(images, labels, num_classes, per_row), out_dir / "samples_grid.png",
                         nrow=per_row)
    update(samples={"num_samples": num_samples, "sampler": sampling, "seed": int(cfg.seed), "npz": str(npz),
                    "grid": str(grid), "seconds": round(seconds, 2),
                    "images_per_sec": round(num_samples / max(seconds, 1e-9), 2)})

    if cfg.fid:
        start = time.perf_counter()
        try:
            metrics = compute_fid_is(cfg, trained, images, device)
        except (MissingWeightsError, DatasetNotFoundError) as err:
            log.warning("FID/IS not computed: %s", err)
            update(fid=None, **{"is": None, "is_std": None}, fid_unavailable=str(err))
        else:
            metrics["fid_seconds"] = round(time.perf_counter() - start, 2)
            update(**metrics)
    else:
        update(fid=None, **{"is": None, "is_std": None}, fid_unavailable="not requested (fid=false)")


def run(cfg: DictConfig) -> dict:
    """Evaluate cfg.ckpt_path; returns the metrics.json content."""
    num_samples = _positive_int(cfg, "num_samples")
    batch_size = _positive_int(cfg, "batch_size")
    nll_batches = _positive_int(cfg, "nll_batches", optional=True)
    nll_num_images = _positive_int(cfg, "nll_num_images", optional=True)
    if cfg.reference_split not in ("train", "val"):
        raise ConfigError(f"reference_split must be train or val, got {cfg.reference_split!r}")
    if cfg.fid and num_samples < cfg.isc_splits:
        raise ConfigError(f"num_samples={num_samples} is below isc_splits={cfg.isc_splits}; the Inception Score "
                              f"needs at least one sample per split")

    compile_mode(cfg.compile)
    out_dir = Path(cfg.paths.output_dir)
    device = pick_device(cfg.device)
    ckpt_path = Path(cfg.ckpt_path).expanduser().resolve()
    ckpt = read_checkpoint(ckpt_path, map_location="cpu")
    trained = run_config(ckpt)
    module = module_from_checkpoint(ckpt).to(device)
    sampling = sampler_kwargs(OmegaConf.to_container(trained, resolve=True), cfg)
    net = module.ema.model
    compile_for_sampling(net, cfg.compile)
    report = Report(out_dir / "metrics.json", {
        "checkpoint": str(ckpt_path), "global_step": ckpt.get("global_step"), **git_info(),
        "config_vs_command_line": command_line_differences(trained, cfg),
        "data": {"target": trained.data._target_, "image_size": net.image_size, "channels": net.in_channels},
        "diffusion": {"num_timesteps": module.diffusion.num_timesteps, "var_type": module.diffusion.var_type,
                      "mean_type": module.diffusion.mean_type, "schedule": OmegaConf.to_container(trained.schedule)},
        "weights": "ema",
    })
    del ckpt

    # 1-2. samples with the EMA weights (npz + PNG grid) and their FID / IS; class-conditional checkpoints and
    # classifier guidance: one sample set per guidance scale, every class equally often
    num_classes = getattr(net, "num_classes", None)
    scales = guidance_scales(cfg.get("guidance_scales"), num_classes)
    classifier_path = cfg.get("classifier", {}).get("ckpt_path")
    check_guidance(num_classes, scales, classifier_path is not None)
    if num_classes is None and classifier_path is None:
        sample_and_score(cfg, trained, module, sampling, device, out_dir, num_samples, batch_size, report.update)
    else:
        guidance = {}
        if classifier_path is not None:
            shape = (net.in_channels, net.image_size, net.image_size)
            guidance["classifier"] = load_classifier(classifier_path, module.diffusion, shape, device)
            guidance["classifier_scale"] = float(cfg.classifier.scale)
            num_classes = check_classifier_classes(guidance["classifier"], num_classes, None)
        labels = balanced_labels(num_samples, num_classes)
        runs = []
        report.update(guidance={"num_classes": num_classes, "labels": "every class equally often",
                                "classifier": None if classifier_path is None else
                                {"ckpt_path": str(classifier_path), "scale": float(cfg.classifier.scale)},
                                "runs": runs})
        for w in scales:
            runs.append({"guidance_scale": w})
            sample_and_score(cfg, trained, module, sampling, device, out_dir / f"guidance_w{w:g}", num_samples,
                             batch_size, report.updater(runs[-1]), labels=labels, guidance_scale=w, **guidance)

    # 3. NLL bound on the validation split, full T
    if cfg.nll:
        data_cfg = OmegaConf.merge(trained.data, cfg.get("data") or {})
        if cfg.get("nll_batch_size") is not None:
            data_cfg.batch_size = cfg.nll_batch_size
        datamodule = instantiate(data_cfg)
        datamodule.setup("validate")
        start = time.perf_counter()
        generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
        try:
            terms = nll_terms(module, datamodule.val_dataloader(), max_batches=nll_batches, max_images=nll_num_images,
                              clip_denoised=cfg.nll_clip_denoised, generator=generator)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        summary = {"split": "val", "clip_denoised": bool(cfg.nll_clip_denoised), **summarize(terms),
                   "terms": str(save_terms(terms, out_dir / "nll_terms.npz")),
                   "seconds": round(time.perf_counter() - start, 2)}
        report.update(nll=summary)

    print_table(report.content, report.path)
    return report.content


def _sample_rows(entry: dict, num_timesteps: int) -> list[tuple[str, str]]:
    s = entry["samples"]
    sampler = s["sampler"]
    steps = sampler.get("steps") or num_timesteps
    rows = [("samples", f"{s['num_samples']} ({sampler.get('sampler')}, {steps} steps, eta {sampler.get('eta')}, "
                        f"EMA, seed {s['seed']}; {s['images_per_sec']} images/s) -> {s['npz']}")]
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
                        for key, value in _sample_rows(run_entry, content["diffusion"]["num_timesteps"]))
    else:
        rows.extend(_sample_rows(content, content["diffusion"]["num_timesteps"]))
    if "nll" in content:
        n = content["nll"]
        rows.append(("NLL (val)", f"{n['bpd']:.4f} bits/dim over {n['num_images']} images, T={n['num_timesteps']}: "
                                  f"L_T {n['prior_bpd']:.4f} + L_1..T-1 {n['kl_bpd']:.4f} "
                                  f"+ L_0 {n['decoder_bpd']:.4f}"))
    rows.append(("metrics", str(path)))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows), flush=True)

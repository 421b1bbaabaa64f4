"""evaluate.py samples=<file.npz>: the metrics of a file of samples from this project or any other (uint8
NHWC arr_0, optional arr_1 labels), against reference= with extractor=, on one yardstick with our own."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.checkpoints import read_checkpoint, run_config
from src.errors import ConfigError
from src.metrics.extractors import extractor_name
from src.metrics.reference_stats import dataset_name
from src.provenance import file_sha256, git_info
from src.sampling.batches import load_npz
from src.sampling.loading import pick_device

from .interrupt import STOPS, stop_name
from .protocol import sample_count_notes
from .report import Report, print_table
from .scoring import Scorer, score_settings

log = logging.getLogger(__name__)


def checkpoint_data_splits(ckpt_path):
    """reference=train / val with samples=: the splits of the checkpoint's data (its network is not built)."""
    data_cfg = run_config(read_checkpoint(ckpt_path)).data
    cache = {}

    def split_dataset(split: str):
        if "datamodule" not in cache:
            cache["datamodule"] = instantiate(data_cfg)
            cache["datamodule"].setup("fit")
        datamodule = cache["datamodule"]
        return {"train": datamodule.train_dataset, "val": datamodule.val_dataset}[split], dataset_name(datamodule)

    return split_dataset


def score_file(cfg: DictConfig) -> dict:
    """Score cfg.samples; returns the metrics.json content."""
    if not cfg.fid:
        raise ConfigError("samples= scores a file and fid=false turns scoring off: drop fid=false")
    path = Path(str(cfg.samples)).expanduser()
    images, labels = load_npz(path)
    has_ckpt = not OmegaConf.is_missing(cfg, "ckpt_path") and cfg.ckpt_path is not None
    splits = checkpoint_data_splits(cfg.ckpt_path) if has_ckpt else None
    scorer = Scorer(cfg, tuple(images.shape[1:]), pick_device(cfg.device), splits)
    out_dir = Path(cfg.paths.output_dir)
    counts = None if labels is None else torch.bincount(labels).tolist()
    report = Report(
        out_dir / "metrics.json",
        {
            "samples_file": str(path.resolve()),
            "samples_sha256_prefix": file_sha256(path)[:16],
            **git_info(),
            "samples": {"num_samples": len(images), "image_shape": list(images.shape[1:]), "labels_per_class": counts},
            "protocol": {
                "num_samples": len(images),
                "metrics": list(score_settings(cfg).metrics),
                "extractor": extractor_name(cfg.extractor),
                "reference": scorer.spec,
                "checkpoint": str(cfg.ckpt_path) if has_ckpt else None,
                "notes": sample_count_notes(len(images)),
            },
        },
    )
    report.expect(["metrics"])
    try:
        report.update(**scorer(images))
        report.done("metrics")
    except STOPS as err:
        report.stopped(stop_name(err))
        raise
    print_table(report.content, report.path)
    return report.content

"""evaluate.py's results in the training run's dashboards: `logger=tensorboard` / `logger=wandb` / `logger=csv`
(conf/logger) send every number of metrics.json and every PNG it names (sample grids, DDPM Fig. 5, the bound
terms, quality against EMA std, ...) to those loggers, at the checkpoint's training step."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from src.loggers import build_loggers, finish_wandb, log_png

log = logging.getLogger(__name__)

# metrics.json sections that describe the run rather than measure it.
NOT_MEASURED = ("protocol", "config_vs_command_line", "data", "diffusion", "extractor", "reference", "git")
PREFIX = "eval"


def scalars(content: dict) -> dict[str, float]:
    """Numbers of metrics.json as flat `eval/...` names: eval/fd_digits-mlp64, eval/nll/bpd,
    eval/runs/1/fid (the run of seed list position 1), eval/summary/fid/mean."""
    flat: dict[str, float] = {}

    def visit(value, name: str) -> None:
        if isinstance(value, bool) or value is None:
            return
        if isinstance(value, (int, float)):
            flat[name] = float(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(item, f"{name}/{key}")
        elif isinstance(value, list) and all(isinstance(item, dict) for item in value):
            for index, item in enumerate(value):  # runs per seed, per guidance scale, ...
                visit(item, f"{name}/{index}")

    for key, value in content.items():
        if key not in NOT_MEASURED and key != "global_step" and not key.startswith("git_"):
            visit(value, f"{PREFIX}/{key}")
    return flat


def pngs(content: dict, out_dir: Path) -> dict[str, Path]:
    """Every PNG that metrics.json names, keyed by its path under the output folder without the suffix."""
    found: dict[str, Path] = {}

    def visit(value) -> None:
        if isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, list):
            for item in value:
                visit(item)
        elif isinstance(value, str) and value.endswith(".png") and Path(value).is_file():
            path = Path(value)
            try:
                name = path.relative_to(out_dir).with_suffix("").as_posix()
            except ValueError:
                name = path.stem
            found[f"{PREFIX}/{name}"] = path

    visit(content)
    return found


def log_results(cfg: DictConfig, content: dict, out_dir: Path) -> None:
    """Send the numbers and figures of a finished (or partial) evaluation to the configured loggers."""
    loggers = build_loggers(cfg.get("logger"))
    if not loggers:
        return
    step = int(content.get("global_step") or 0)
    numbers, figures = scalars(content), pngs(content, out_dir)
    try:
        for logger in loggers:
            logger.log_hyperparams({"evaluate": {k: content.get(k) for k in ("checkpoint", "protocol")}})
            logger.log_metrics(numbers, step=step)
        for key, path in figures.items():
            log_png(loggers, key, path, step)
        for logger in loggers:
            logger.finalize("success")
    finally:
        finish_wandb(loggers)
    log.info(
        "logged %d numbers and %d figures to %s",
        len(numbers),
        len(figures),
        ", ".join(type(logger).__name__ for logger in loggers),
    )

"""Builds the run from the config and trains it. Entry point: `run(cfg)` (train.py calls it)."""
import logging
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.lit import DiffusionModule

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig, channels: int, image_size: int) -> DiffusionModule:
    """Network + diffusion + timestep sampler -> DiffusionModule. The network's shape comes from the
    data (channels, image size) and the objective (2C outputs when the variance is learned)."""
    diffusion = instantiate(cfg.diffusion)
    out_channels = channels * (2 if diffusion.learns_variance else 1)
    net = instantiate(cfg.model, in_channels=channels, out_channels=out_channels, image_size=image_size)
    timestep_sampler = instantiate(cfg.objective.timestep_sampler)
    # Partial first: the run config passed afterwards must not be instantiated itself.
    make_module = instantiate(cfg.module, _partial_=True)
    return make_module(net=net, diffusion=diffusion, timestep_sampler=timestep_sampler,
                       run_config=OmegaConf.to_container(cfg, resolve=True))


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry of a callbacks/logger group; entries set to null are switched off."""
    if not group:
        return []
    objects = []
    for name, entry in group.items():
        if entry is None:
            continue
        if "_target_" not in entry:
            raise ValueError(f"config entry {name!r} has no _target_; set it or remove the entry with ~{name}")
        objects.append(instantiate(entry))
    return objects


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Train from a composed config. Returns (metrics, objects) so tests can inspect both."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg, datamodule.channels, datamodule.image_size)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule}


def run(cfg: DictConfig) -> float | None:
    metrics, objects = train(cfg)
    trainer = objects["trainer"]
    if trainer.is_global_zero:
        log.info("finished at step %d; outputs in %s", trainer.global_step, Path(cfg.paths.output_dir).resolve())
        for key in sorted(metrics):
            log.info("  %s = %.5g", key, metrics[key])
    return metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None

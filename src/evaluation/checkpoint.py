"""Rebuilding a trained DiffusionModule from a Lightning checkpoint alone.

A checkpoint written by train.py holds the resolved run config (`hyper_parameters["run_config"]`) and
the full state_dict (network, EMA network, ...), so the model is rebuilt exactly as it was trained,
without any model flags on the command line.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.errors import CheckpointError
from src.lit import DiffusionModule
from src.training import build_module  # the builder train.py uses, so both build the same module


def read_checkpoint(ckpt_path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """torch.load a Lightning checkpoint, turning every way it can fail into one CheckpointError line."""
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # Lightning checkpoints hold plain containers plus the hparams (partials, dicts): not weights-only.
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(f"could not read checkpoint {path} ({type(err).__name__}: {reason}); "
                              f"is it a complete .ckpt file written by train.py?") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
    if not isinstance(ckpt.get("hyper_parameters", {}).get("run_config"), dict):
        raise CheckpointError(f"{path} has no run config (hyper_parameters.run_config); it was not written by train.py")
    return ckpt


def run_config(ckpt: dict) -> DictConfig:
    """The resolved train config stored in a checkpoint."""
    return OmegaConf.create(ckpt["hyper_parameters"]["run_config"])


def module_from_checkpoint(ckpt: dict) -> DiffusionModule:
    """Rebuild the module from the checkpoint's run config and load all its weights (strictly)."""
    cfg = run_config(ckpt)
    if cfg.get("task", "diffusion") != "diffusion":
        raise CheckpointError(f"the checkpoint is a task={cfg.task} run, not a diffusion model; give a diffusion "
                              f"checkpoint as ckpt_path (a classifier goes to classifier.ckpt_path=...)")
    datamodule = instantiate(cfg.data)  # construction does no I/O; it knows channels and image size
    module = build_module(cfg, datamodule.channels, datamodule.image_size)
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(f"the weights in the checkpoint do not fit the model rebuilt from its config "
                              f"({first})") from None
    return module.eval()


def load_module(ckpt_path: str | os.PathLike, map_location: str | torch.device = "cpu") -> DiffusionModule:
    """The DiffusionModule of a train.py checkpoint, weights loaded, in eval mode."""
    return module_from_checkpoint(read_checkpoint(ckpt_path, map_location))

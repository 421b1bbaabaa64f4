"""This project's checkpoints: read one (one set of error messages for every command), check what it holds,
and rebuild its LightningModule from the run config stored inside it.

A checkpoint written by train.py holds the resolved run config (`hyper_parameters["run_config"]`) and the
full state_dict (network, EMA network, ...), so a module is rebuilt exactly as it was trained, through the
same builders train.py uses, without any model flags on the command line.
"""
from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from src.builders import build_task_module
from src.errors import CheckpointError

# The classifier's output layer (src.models.NoisyClassifier.out) in a ClassifierModule's state_dict: its rows
# are the classes, which an image folder's data module only knows after scanning the folder.
CLASSIFIER_HEAD = "net.out.weight"

# What to give instead when a checkpoint of the other task is passed.
WRONG_TASK = {
    "diffusion": "give a diffusion checkpoint as ckpt_path (a classifier goes to classifier.ckpt_path=...)",
    "classifier": "train one with python train.py task=classifier",
}


def read_checkpoint(ckpt_path: str | os.PathLike) -> dict:
    """The checkpoint's contents on the CPU (tensors memory-mapped, so reading the config is cheap), or one
    CheckpointError line for every way it can be missing, unreadable or not a train.py checkpoint."""
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; give a .ckpt file such as "
                              f"{path}/checkpoints/last.ckpt")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # A train.py checkpoint holds the hparams (partials, dicts) next to the tensors: not weights-only.
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # a truncated zip, not a checkpoint at all, ...: many exception types
        siblings = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path)
        other = f"; other checkpoints in {path.parent}: {', '.join(siblings)}" if siblings else ""
        reason = " ".join(str(err).split()).split(". ")[0]  # torch appends paragraphs of advice
        raise CheckpointError(f"cannot read checkpoint {path} ({type(err).__name__}: {reason}); it is incomplete or "
                              f"not a checkpoint: use another one with ckpt_path=<file>{other}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
    if not isinstance(ckpt.get("hyper_parameters", {}).get("run_config"), dict):
        raise CheckpointError(f"{path} has no run config (hyper_parameters.run_config): it was not written by "
                              f"train.py")
    return ckpt


def run_config(ckpt: dict) -> DictConfig:
    """The resolved train config stored in a checkpoint."""
    return OmegaConf.create(ckpt["hyper_parameters"]["run_config"])


def task_of(ckpt: dict) -> str:
    return run_config(ckpt).get("task", "diffusion")


def module_from_checkpoint(ckpt: dict, task: str | None = "diffusion", source: str = "the checkpoint") -> L.LightningModule:
    """Rebuild the module of the checkpoint's task (which must be `task` unless None) from its run config and
    load all its weights strictly; in eval mode, on the CPU. `source` names the file in messages."""
    cfg = run_config(ckpt)
    actual = cfg.get("task", "diffusion")
    if actual == "classifier" and CLASSIFIER_HEAD not in ckpt["state_dict"]:
        actual = "an incomplete classifier"
    if task is not None and actual != task:
        raise CheckpointError(f"{source} is a task={actual} run, not a {task} checkpoint; {WRONG_TASK[task]}")
    if actual == "classifier":
        with open_dict(cfg):
            cfg.model.num_classes = int(ckpt["state_dict"][CLASSIFIER_HEAD].shape[0])
    datamodule = instantiate(cfg.data)  # construction does no I/O; it knows channels and image size
    module = build_task_module(cfg, datamodule)
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"the weights in {source} do not fit the model rebuilt from its config "
                              f"({str(err).splitlines()[0]})") from None
    return module.eval()


def load_module(ckpt_path: str | os.PathLike, task: str | None = "diffusion") -> L.LightningModule:
    """The LightningModule of a train.py checkpoint (a DiffusionModule by default), weights loaded, eval mode."""
    return module_from_checkpoint(read_checkpoint(ckpt_path), task, source=str(ckpt_path))

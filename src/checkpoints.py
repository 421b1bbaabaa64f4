"""This project's checkpoints: read one (one set of error messages for every command), check what it holds,
and rebuild its LightningModule from the run config stored inside it.

A checkpoint written by train.py holds the resolved run config (`hyper_parameters["run_config"]`) and the
full state_dict (network, EMA network, ...), so a module is rebuilt exactly as it was trained, through the
same builders train.py uses, without any model flags on the command line.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from src.builders import build_task_module
from src.diffusion import GaussianDiffusion
from src.errors import CheckpointError
from src.formats import diffusers as diffusers_format
from src.formats import import_checkpoint
from src.formats.openai import load_preset, presets

# The classifier's output layer (src.models.NoisyClassifier.out) in a ClassifierModule's state_dict: its rows
# are the classes, which an image folder's data module only knows after scanning the folder.
CLASSIFIER_HEAD = "net.out.weight"

# What to give instead when a checkpoint of the other task is passed.
WRONG_TASK = {
    "diffusion": "give a diffusion checkpoint as ckpt_path (a classifier goes to classifier.ckpt_path=...)",
    "classifier": "train one with python train.py task=classifier",
}

# Run-config keys added after checkpoints were first written, with the values that reproduce what a run without
# them did: an older checkpoint reads as if it had them (when it is rebuilt, and when a resume is checked).
ADDED_KEYS = {
    "objective.loss_weighting": "none",
    "objective.min_snr_gamma": 5.0,
    "objective.p2_gamma": 1.0,
    "objective.p2_k": 1.0,
    "schedule.zero_terminal_snr": False,
}
# The same for the model section, by the class it builds (other classes do not take these keys).
ADDED_MODEL_KEYS = {"src.models.UNet": {"patch_size": 1}, "src.models.NoisyClassifier": {"patch_size": 1}}


def upgraded(run_config: dict) -> dict:
    """A copy of a stored run config with the ADDED_KEYS it lacks (in the sections it has)."""
    config = copy.deepcopy(run_config)
    for dotted, value in ADDED_KEYS.items():
        section, key = dotted.split(".")
        if isinstance(config.get(section), dict):
            config[section].setdefault(key, value)
    model = config.get("model")
    if isinstance(model, dict):
        for key, value in ADDED_MODEL_KEYS.get(model.get("_target_"), {}).items():
            model.setdefault(key, value)
    return config


def read_checkpoint(ckpt_path: str | os.PathLike) -> dict:
    """The checkpoint's contents on the CPU (tensors memory-mapped, so reading the config is cheap), or one
    CheckpointError line for every way it can be missing, unreadable or not a train.py checkpoint."""
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder, not a checkpoint file; give a .ckpt file such as {path}/checkpoints/last.ckpt"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # A train.py checkpoint holds the hparams (partials, dicts) next to the tensors: not weights-only.
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # a truncated zip, not a checkpoint at all, ...: many exception types
        siblings = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path)
        other = f"; other checkpoints in {path.parent}: {', '.join(siblings)}" if siblings else ""
        reason = " ".join(str(err).split()).split(". ")[0]  # torch appends paragraphs of advice
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(err).__name__}: {reason}); it is incomplete or "
            f"not a checkpoint: use another one with ckpt_path=<file>{other}"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
    if not isinstance(ckpt.get("hyper_parameters", {}).get("run_config"), dict):
        raise CheckpointError(f"{path} has no run config (hyper_parameters.run_config): it was not written by train.py")
    return ckpt


def run_config(ckpt: dict) -> DictConfig:
    """The resolved train config stored in a checkpoint (with the keys added since, see ADDED_KEYS)."""
    return OmegaConf.create(upgraded(ckpt["hyper_parameters"]["run_config"]))


def module_from_checkpoint(
    ckpt: dict, task: str | None = "diffusion", source: str = "the checkpoint"
) -> L.LightningModule:
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
        raise CheckpointError(
            f"the weights in {source} do not fit the model rebuilt from its config ({str(err).splitlines()[0]})"
        ) from None
    return module.eval()


def load_module(ckpt_path: str | os.PathLike, task: str | None = "diffusion") -> L.LightningModule:
    """The LightningModule of a train.py checkpoint (a DiffusionModule by default), weights loaded, eval mode."""
    return module_from_checkpoint(read_checkpoint(ckpt_path), task, source=str(ckpt_path))


def load_pretrained(
    source: str | os.PathLike, preset: str | DictConfig | None = None, use_ema: bool = True, data: dict | None = None
) -> tuple[nn.Module, GaussianDiffusion, DictConfig]:
    """(net, diffusion, run config) of a checkpoint of ours (train.py's or convert.py's), a diffusers folder, a
    Hugging Face hub id (e.g. google/ddpm-cifar10-32, from the local cache when offline), or with `preset` (a
    conf/preset name or config) an openai .pt file; in eval mode, on the CPU.

    net holds the EMA weights where the file has them (use_ema=False: the raw ones; converted files hold one set
    in both). data: overrides of the model's data config for a conversion, e.g. {"root": "/path/to/images"}.
    A classifier checkpoint gives the classifier as net.
    """
    path = Path(source).expanduser()
    if preset is not None:
        ckpt, module = import_checkpoint(
            "openai", path, load_preset(preset) if isinstance(preset, str) else preset, data_overrides=data
        )
    elif diffusers_format.is_source(source):
        ckpt, module = import_checkpoint("diffusers", source, data_overrides=data)
    elif path.is_file():
        try:
            ckpt = read_checkpoint(path)
        except CheckpointError as err:
            if path.suffix == ".pt":
                raise CheckpointError(
                    f"{err}; an openai .pt state dict needs preset=<name> (one of {', '.join(presets())})"
                ) from None
            raise
        module = module_from_checkpoint(ckpt, task=None, source=str(source))
    else:
        raise CheckpointError(
            f"{source} is neither a checkpoint file, a diffusers folder (config.json) nor a hub id "
            f"such as google/ddpm-cifar10-32"
        )
    return (module.ema.model if use_ema else module.net), module.diffusion, run_config(ckpt)

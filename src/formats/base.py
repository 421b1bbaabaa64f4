"""What every format shares: a released model as this project's checkpoint (a full train config composed from
conf/, the module it builds, the weights loaded into its network and its EMA copy), the check of a file's
tensors against the layout a model expects, and writing results only once they are complete."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from torch import nn

from src import atomic
from src.builders import build_task_module
from src.data import DatasetNotFoundError
from src.errors import RunError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# The data group a model's image shape (channels, size) most likely comes from; image_folder otherwise.
DATA_BY_SHAPE = {(3, 32): "cifar10", (1, 16): "digits"}
SHOWN = 3  # keys listed per kind of mismatch in a message


class ConversionError(RunError, ValueError):
    """Weights, a folder or a preset that cannot be converted; the message says what differs and what to do."""


@dataclass
class Imported:
    """A released model in this project's terms, before it is built.

    weights: given the network rebuilt from the run config, the file's weights in its names (src.models'
        UNet or NoisyClassifier), after checking the file against the layout that network expects.
    model: the model config (`_target_` and flags), replacing the composed one; None keeps the composed one.
    overrides: train-config overrides (groups and keys) for schedule, objective, sampler, task and data.
    config: values merged over the composed train config after the overrides (a preset's `config`).
    image_shape: (channels, size) of the images the model makes or classifies; num_classes: its classes.
    provenance: what is recorded under `converted_from` in the checkpoint (format, source, preset, ...).
    """

    weights: Callable[[nn.Module], dict[str, torch.Tensor]]
    model: dict | None
    overrides: list[str]
    image_shape: tuple[int, int]
    provenance: dict
    num_classes: int | None = None
    config: dict = field(default_factory=dict)


# --- the run config ------------------------------------------------------------------------------
def compose_train(overrides: list[str]) -> DictConfig:
    """conf/train.yaml with `overrides`, inside a running Hydra app (convert.py) or on its own. A released model
    is not the digits quickstart: train.yaml's default experiment is dropped unless the overrides name one."""
    if not any(o.lstrip("+~").startswith("experiment") for o in overrides):
        overrides = ["~experiment", *overrides]
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def data_group(image_shape: tuple[int, int], chosen: str | None) -> list[str]:
    """Overrides that select the data the model was trained on: `chosen` or the group of its image shape."""
    channels, size = image_shape
    group = chosen or DATA_BY_SHAPE.get((channels, size), "image_folder")
    overrides = [f"data={group}", f"data.image_size={size}"]
    if group == "image_folder":
        overrides.append(f"data.channels={channels}")
    return overrides


def _data_dir() -> str:
    """paths.data_dir as train.py resolves it: $DDPM_DATA_DIR, else ./data of the working directory."""
    return os.environ.get("DDPM_DATA_DIR") or str(Path.cwd() / "data")


def run_config(
    imported: Imported,
    data_overrides: Mapping | None = None,
    data: str | None = None,
    output_dir: str | os.PathLike = ".",
) -> DictConfig:
    """The resolved train config of the imported model: groups and keys from `imported`, its model config,
    then the data overrides (e.g. {"root": "/path/to/images"}); paths resolved without Hydra's runtime."""
    cfg = compose_train([*data_group(imported.image_shape, data), *imported.overrides])
    OmegaConf.set_struct(cfg, False)
    cfg.paths.data_dir = _data_dir()
    cfg.paths.output_dir = str(Path(output_dir).resolve())
    if imported.model is not None:
        cfg.model = OmegaConf.create(imported.model)
    merged = OmegaConf.merge(cfg, imported.config, {"data": dict(data_overrides or {})})
    try:
        return OmegaConf.create(OmegaConf.to_container(merged, resolve=True, throw_on_missing=True))
    except MissingMandatoryValue as err:
        raise ConversionError(
            f"{err.full_key} is required for the model's data ({merged.data._target_}); add "
            f"+{err.full_key}=... (the images the model was trained on, which FID compares "
            f"against)"
        ) from None


def check_data(imported: Imported, cfg: DictConfig, datamodule, name: str) -> None:
    """The data must make the images the model makes, and have its classes."""
    channels, size = imported.image_shape
    if int(cfg.data.image_size) != size:
        raise ConversionError(
            f"{name} is a {size}x{size} model but data.image_size={cfg.data.image_size}; use "
            f"+data.image_size={size} or data of that size"
        )
    if datamodule.channels != channels:
        raise ConversionError(
            f"{name} makes {channels}-channel images but the data ({cfg.data._target_}) has "
            f"{datamodule.channels}; choose data with {channels} channel(s) (data_group=...)"
        )
    if imported.num_classes is not None:
        try:
            found = datamodule.num_classes
        except DatasetNotFoundError as err:
            raise ConversionError(
                f"{name} has {imported.num_classes} classes, which the data must have, but {err}"
            ) from None
        if found != imported.num_classes:
            raise ConversionError(
                f"{name} has {imported.num_classes} classes but the data ({cfg.data._target_}"
                f"{' at ' + str(cfg.data.root) if 'root' in cfg.data else ''}) has {found}; "
                f"give the data the model was trained on"
            )


def build_checkpoint(imported: Imported, cfg: DictConfig, name: str) -> tuple[dict, nn.Module]:
    """The checkpoint train.py would have written for this model (state_dict with `net.*` and `ema.model.*`,
    the run config), and its module (eval mode), the network and EMA copy holding the imported weights."""
    datamodule = instantiate(cfg.data)
    check_data(imported, cfg, datamodule, name)
    try:
        module = build_task_module(cfg, datamodule)
    except DatasetNotFoundError as err:
        raise ConversionError(f"{name}: {err}") from None
    load_strict(module.net, imported.weights(module.net), name)
    module.ema.model.load_state_dict(module.net.state_dict())
    # Lightning's keys of a step-0 checkpoint with no optimizer state yet: train.py ckpt_path=<this file> starts
    # from these weights with a fresh optimizer (fine-tuning), as it continues its own checkpoints.
    ckpt = {
        "state_dict": module.state_dict(),
        "global_step": 0,
        "epoch": 0,
        "pytorch-lightning_version": L.__version__,
        "optimizer_states": [],
        "lr_schedulers": [],
        "hyper_parameters": {"run_config": OmegaConf.to_container(cfg, resolve=True)},
        "converted_from": imported.provenance,
    }
    return ckpt, module.eval()


def load_strict(net: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:  # a bug of a mapping, not of the file (the file was checked against the layout)
        raise ConversionError(
            f"the converted weights of {name} do not fit the rebuilt net ({str(err).splitlines()[0]})"
        ) from None


# --- checking a file against a layout ------------------------------------------------------------
def layout_mismatch(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, torch.Tensor]) -> str | None:
    """None when `found` has exactly the expected keys and shapes; else what differs, the first few of each:
    'N missing: k [shape], ...; N unexpected: k [shape], ...; N of another shape: k [file] (expected [shape])'."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k])]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: " + ", ".join(f"{k} {list(expected[k])}" for k in missing[:SHOWN]))
    if unexpected:
        parts.append(
            f"{len(unexpected)} unexpected: " + ", ".join(f"{k} {list(found[k].shape)}" for k in unexpected[:SHOWN])
        )
    if wrong:
        parts.append(
            f"{len(wrong)} of another shape: "
            + ", ".join(f"{k} {list(found[k].shape)} (expected {list(expected[k])})" for k in wrong[:SHOWN])
        )
    return "; ".join(parts) or None


# --- tensor layouts ------------------------------------------------------------------------------
# A layout is a list of (our module prefix, their module prefix, Kind); a Kind converts the tensors of one
# module (keys relative to the prefixes) in both directions, exactly (reshapes and permutations only).
@dataclass(frozen=True)
class Kind:
    to_theirs: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    to_ours: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def renamed(names: Mapping[str, str], shape_theirs: Callable | None = None, shape_ours: Callable | None = None) -> Kind:
    """Sub-modules renamed (ours -> theirs), tensors reshaped by the optional functions."""
    back = {v: k for k, v in names.items()}

    def move(state, table, reshape):
        out = {}
        for key, value in state.items():
            head, _, leaf = key.rpartition(".")
            new = f"{table.get(head, head)}.{leaf}" if head else table.get(key, key)
            out[new] = reshape(value) if reshape is not None else value
        return out

    return Kind(lambda s: move(s, names, shape_theirs), lambda s: move(s, back, shape_ours))


SAME = renamed({})


def linear_as(ndim: int) -> Kind:
    """A Linear weight [O, I] as theirs with `ndim` dims (a 1x1 Conv1d 3, Conv2d 4); biases unchanged."""
    return renamed(
        {},
        lambda w: w.reshape(*w.shape[:2], *([1] * (ndim - 2))) if w.ndim > 1 else w,
        lambda w: w.reshape(w.shape[:2]) if w.ndim > 1 else w,
    )


def swapped_halves(dim: int) -> Kind:
    """A Linear whose input is [sin | cos] for us and [cos | sin] for them (dim inputs, padded when odd)."""
    half = dim // 2
    perm = torch.cat([torch.arange(half, 2 * half), torch.arange(half), torch.arange(2 * half, dim)])

    def swap(state):
        return {k: v[:, perm] if k.endswith("weight") else v for k, v in state.items()}

    return Kind(swap, swap)  # the swap is its own inverse


def convert(layout: list[tuple[str, str, Kind]], state: Mapping[str, torch.Tensor], direction: str) -> dict:
    """Apply a layout to a state dict: direction "theirs" (ours -> theirs) or "ours" (theirs -> ours). A key
    belongs to the entry with the longest module prefix it starts with; keys no entry covers are an error."""
    src_index, dst_index = (0, 1) if direction == "theirs" else (1, 0)
    groups: dict[int, dict] = {}
    left = []
    for key, value in state.items():
        best = max(
            (i for i, e in enumerate(layout) if key.startswith(e[src_index] + ".")),
            key=lambda i: len(layout[i][src_index]),
            default=None,
        )
        if best is None:
            left.append(key)
        else:
            groups.setdefault(best, {})[key[len(layout[best][src_index]) + 1 :]] = value
    if left:
        raise ConversionError(f"tensors that the layout does not place: {', '.join(left[:SHOWN])}")
    out = {}
    for i, sub in sorted(groups.items()):
        kind, dst = layout[i][2], layout[i][dst_index]
        moved = kind.to_theirs(sub) if direction == "theirs" else kind.to_ours(sub)
        out.update({f"{dst}.{k}": v for k, v in moved.items()})
    return out


def shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


# --- writing ---------------------------------------------------------------------------------------
@contextmanager
def written_atomically(dst: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary path next to dst to write into; it becomes dst only when the block succeeds, so a
    failed conversion leaves nothing at dst (src.atomic.replaced). An existing dst is an error unless overwrite."""
    dst = Path(dst).expanduser().resolve()
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} already exists; choose another dst or pass overwrite=true")
    with atomic.replaced(dst) as target:
        yield target

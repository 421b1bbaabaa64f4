"""The .pt state dicts of openai/improved-diffusion and openai/guided-diffusion (UNetModel, and guided-diffusion's
EncoderUNetModel classifiers) in as this project's checkpoints.

A .pt file holds only tensors, so a preset (conf/preset/<name>.yaml) says what the file is: the released
model's flags, the train-config overrides that build the same net, schedule, T and objective here, the image
size and classes, and the attention order of its qkv convolutions. openai's layout maps onto ours module for
module: renames, Conv1d <-> Conv2d reshapes, the [cos | sin] timestep embedding halves swapped into our
[sin | cos], and for improved-diffusion's "legacy" attention a permutation of the qkv rows (per head q, k, v
instead of q, k, v each split into heads); the functions computed are the same.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from src.models import NoisyClassifier, UNet
from src.models.blocks import AttentionBlock, Downsample, ResAttnBlock, ResBlock

from .base import (
    CONF_DIR,
    SAME,
    ConversionError,
    Imported,
    Kind,
    convert,
    layout_mismatch,
    linear_as,
    renamed,
    shapes,
    swapped_halves,
)

ATTENTION_ORDERS = ("legacy", "new")  # guided-diffusion's use_new_attention_order=False / True
PRESET_DIR = CONF_DIR / "preset"


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> DictConfig:
    """conf/preset/<name>.yaml (for library calls; convert.py composes it as its `preset` group)."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConversionError(f"unknown preset {name!r}; choose one of {', '.join(presets())} (conf/preset/)")
    return OmegaConf.load(path)


def read_state(src: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(src).expanduser()
    if not path.is_file():
        raise ConversionError(
            f"src={src}: no such file; give the .pt file of an improved-diffusion or guided-diffusion model"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle of other objects, ...: many exception types
        reason = " ".join(str(err).split()).split(". ")[0]
        raise ConversionError(f"cannot read {path} as a state dict ({type(err).__name__}: {reason})") from None
    if isinstance(state, dict) and "state_dict" in state:
        raise ConversionError(
            f"{path} is a Lightning checkpoint (it has a state_dict entry), not an openai .pt "
            f"state dict; use it directly (ckpt_path=...)"
        )
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state


def import_model(src: str | os.PathLike, preset: DictConfig | None) -> Imported:
    """An openai .pt file as an Imported model, described by `preset`."""
    if preset is None:
        raise ConversionError(
            f"format=openai needs preset=<name> to say which released model {src} is; one of "
            f"{', '.join(presets())} (conf/preset/)"
        )
    order = preset.get("attention_order")
    if order not in ATTENTION_ORDERS:
        raise ConversionError(
            f"preset {preset.name}: attention_order must be one of {', '.join(ATTENTION_ORDERS)}, got {order!r}"
        )
    state = read_state(src)

    def weights(net: nn.Module) -> dict[str, torch.Tensor]:
        entries = layout(net, order)
        problem = layout_mismatch(shapes(convert(entries, net.state_dict(), "theirs")), state)
        if problem:
            raise ConversionError(
                f"the state dict in {src} does not match preset {preset.name} ({problem}); the "
                f"preset's flags: {preset.flags}; use the preset of this file (one of "
                f"{', '.join(presets())})"
            )
        return convert(entries, state, "ours")

    return Imported(
        weights=weights,
        model=None,
        overrides=list(preset.train),
        config=OmegaConf.to_container(preset.get("config") or {}, resolve=True),
        image_shape=(int(preset.channels), int(preset.image_size)),
        num_classes=preset.get("num_classes"),
        provenance={
            "format": "openai",
            "source": str(src),
            "preset": str(preset.name),
            "url": preset.get("url"),
            "flags": str(preset.flags),
        },
    )


# --- the tensor layout ---------------------------------------------------------------------------------
RES = renamed(
    {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "emb_proj": "emb_layers.1",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "skip": "skip_connection",
    }
)


def _legacy_rows(x: torch.Tensor, heads: int, to_legacy: bool) -> torch.Tensor:
    """Reorder the 3C rows of a qkv weight / bias: ours (q | k | v, each head-major) <-> legacy (per head q, k, v)."""
    rest = x.shape[1:]
    d = x.shape[0] // (3 * heads)
    grouped = x.reshape(3, heads, d, *rest) if to_legacy else x.reshape(heads, 3, d, *rest)
    return grouped.transpose(0, 1).reshape(x.shape).contiguous()


def attention(heads: int, order: str) -> Kind:
    """AttentionBlock <-> openai's AttentionBlock (Conv1d qkv and proj_out, qkv rows in `order`)."""
    legacy = order == "legacy"

    def theirs(s):
        c = s["proj.weight"].shape[0]
        w, b = s["qkv.weight"].reshape(3 * c, c, 1), s["qkv.bias"]
        if legacy:
            w, b = _legacy_rows(w, heads, True), _legacy_rows(b, heads, True)
        return {
            "norm.weight": s["norm.weight"],
            "norm.bias": s["norm.bias"],
            "qkv.weight": w,
            "qkv.bias": b,
            "proj_out.weight": s["proj.weight"].reshape(c, c, 1),
            "proj_out.bias": s["proj.bias"],
        }

    def ours(s):
        c = s["proj_out.weight"].shape[0]
        w, b = s["qkv.weight"], s["qkv.bias"]
        if legacy:
            w, b = _legacy_rows(w, heads, False), _legacy_rows(b, heads, False)
        return {
            "norm.weight": s["norm.weight"],
            "norm.bias": s["norm.bias"],
            "qkv.weight": w.reshape(3 * c, c, 1, 1),
            "qkv.bias": b,
            "proj.weight": s["proj_out.weight"].reshape(c, c, 1, 1),
            "proj.bias": s["proj_out.bias"],
        }

    return Kind(theirs, ours)


def layout(net: UNet | NoisyClassifier, order: str) -> list[tuple[str, str, Kind]]:
    """(our module, openai's module, kind) for every module of `net` with weights."""
    dim = net.time_embed[1].in_features
    entries = [
        ("time_embed.1", "time_embed.0", swapped_halves(dim)),
        ("time_embed.3", "time_embed.2", SAME),
        ("conv_in", "input_blocks.0.0", SAME),
    ]
    if getattr(net, "label_embed", None) is not None:
        entries.append(("label_embed", "label_emb", SAME))
    for i, layer in enumerate(net.down):
        block = f"input_blocks.{i + 1}"
        if isinstance(layer, ResAttnBlock):
            entries += _layer(f"down.{i}", block, layer, order)
        elif isinstance(layer, Downsample):
            entries.append((f"down.{i}.conv", f"{block}.0.op", SAME))
        else:
            entries.append((f"down.{i}", f"{block}.0", RES))
    entries += [
        ("mid.0.res", "middle_block.0", RES),
        ("mid.0.attn", "middle_block.1", attention(net.mid[0].attn.num_heads, order)),
        ("mid.1.res", "middle_block.2", RES),
        ("norm_out", "out.0", SAME),
    ]
    if isinstance(net, NoisyClassifier):
        if net.pool is None:  # guided-diffusion's "adaptive" head: out.3 is a 1x1 Conv2d after the pooling
            return entries + [("out", "out.3", linear_as(4))]
        return entries + [("pool", "out.2", renamed({"qkv": "qkv_proj"})), ("out", "out.2.c_proj", linear_as(3))]
    for i, layer in enumerate(net.up):
        block = f"output_blocks.{i}"
        entries += _layer(f"up.{i}", block, layer, order)
        index = 1 + (layer.attn is not None)
        if isinstance(layer.upsample, ResBlock):
            entries.append((f"up.{i}.upsample", f"{block}.{index}", RES))
        elif layer.upsample is not None:
            entries.append((f"up.{i}.upsample.conv", f"{block}.{index}.conv", SAME))
    return entries + [("conv_out", "out.2", SAME)]


def _layer(ours: str, block: str, layer: ResAttnBlock, order: str) -> list:
    entries = [(f"{ours}.res", f"{block}.0", RES)]
    if isinstance(layer.attn, AttentionBlock):
        entries.append((f"{ours}.attn", f"{block}.1", attention(layer.attn.num_heads, order)))
    return entries

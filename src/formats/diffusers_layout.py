"""Which of our U-Net's tensors is which of diffusers' UNet2DModel's: the layer-by-layer correspondence, with the
split of our fused qkv convolution into to_q / to_k / to_v and the 1x1 convolutions that diffusers keeps as linears."""

from __future__ import annotations

import torch

from src.models import UNet
from src.models.blocks import ResAttnBlock, ResBlock

from .base import SAME, Kind, renamed, swapped_halves

RES = renamed(
    {
        "norm1": "norm1",
        "conv1": "conv1",
        "emb_proj": "time_emb_proj",
        "norm2": "norm2",
        "conv2": "conv2",
        "skip": "conv_shortcut",
    }
)


def _attention_theirs(s: dict) -> dict:
    c = s["proj.weight"].shape[0]
    q, k, v = (w.reshape(c, c).clone() for w in s["qkv.weight"].chunk(3))
    qb, kb, vb = (b.clone() for b in s["qkv.bias"].chunk(3))
    return {
        "group_norm.weight": s["norm.weight"],
        "group_norm.bias": s["norm.bias"],
        "to_q.weight": q,
        "to_q.bias": qb,
        "to_k.weight": k,
        "to_k.bias": kb,
        "to_v.weight": v,
        "to_v.bias": vb,
        "to_out.0.weight": s["proj.weight"].reshape(c, c),
        "to_out.0.bias": s["proj.bias"],
    }


def _attention_ours(s: dict) -> dict:
    c = s["to_out.0.weight"].shape[0]
    return {
        "norm.weight": s["group_norm.weight"],
        "norm.bias": s["group_norm.bias"],
        "qkv.weight": torch.cat([s[f"to_{p}.weight"] for p in "qkv"]).reshape(3 * c, c, 1, 1),
        "qkv.bias": torch.cat([s[f"to_{p}.bias"] for p in "qkv"]),
        "proj.weight": s["to_out.0.weight"].reshape(c, c, 1, 1),
        "proj.bias": s["to_out.0.bias"],
    }


ATTENTION = Kind(_attention_theirs, _attention_ours)


def layout(net: UNet, flip_sin_to_cos: bool = False) -> list[tuple[str, str, Kind]]:
    """(our module, diffusers' module, kind) for every module of `net` with weights."""
    dim = net.time_embed[1].in_features
    entries = [
        ("time_embed.1", "time_embedding.linear_1", swapped_halves(dim) if flip_sin_to_cos else SAME),
        ("time_embed.3", "time_embedding.linear_2", SAME),
        ("conv_in", "conv_in", SAME),
    ]
    if net.label_embed is not None:
        entries.append(("label_embed", "class_embedding", SAME))
    level, j = 0, 0
    for i, layer in enumerate(net.down):
        if isinstance(layer, ResAttnBlock):
            entries += _layer(f"down.{i}", f"down_blocks.{level}", j, layer)
            j += 1
        else:
            entries.append(_resampler(f"down.{i}", f"down_blocks.{level}.downsamplers.0", layer))
            level, j = level + 1, 0
    entries += [
        ("mid.0.res", "mid_block.resnets.0", RES),
        ("mid.0.attn", "mid_block.attentions.0", ATTENTION),
        ("mid.1.res", "mid_block.resnets.1", RES),
    ]
    level, j = 0, 0
    for i, layer in enumerate(net.up):
        entries += _layer(f"up.{i}", f"up_blocks.{level}", j, layer)
        j += 1
        if layer.upsample is not None:
            entries.append(_resampler(f"up.{i}.upsample", f"up_blocks.{level}.upsamplers.0", layer.upsample))
            level, j = level + 1, 0
    return entries + [("norm_out", "conv_norm_out", SAME), ("conv_out", "conv_out", SAME)]


def _layer(ours: str, block: str, j: int, layer: ResAttnBlock) -> list:
    entries = [(f"{ours}.res", f"{block}.resnets.{j}", RES)]
    if layer.attn is not None:
        entries.append((f"{ours}.attn", f"{block}.attentions.{j}", ATTENTION))
    return entries


def _resampler(ours: str, theirs: str, layer) -> tuple[str, str, Kind]:
    if isinstance(layer, ResBlock):
        return (ours, theirs, RES)
    return (f"{ours}.conv", f"{theirs}.conv", SAME)

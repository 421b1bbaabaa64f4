"""The DDPM U-Net (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", appendix B), laid out as
in openai/improved-diffusion's UNetModel and diffusers' UNet2DModel (google/ddpm-cifar10-32)."""
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import (
    AttentionBlock,
    Downsample,
    ResAttnBlock,
    ResBlock,
    SinusoidalTimestepEmbedding,
    Upsample,
    group_norm,
    num_groups,
    zero_module,
)


class UNet(nn.Module):
    """Noise-prediction U-Net: (x_t [B, C_in, S, S], t [B], y [B] | None) -> [B, C_out, S, S].

    Args:
        in_channels: image channels C_in.
        out_channels: output channels (C_in for eps/x0 prediction, 2 * C_in when the variance is learned).
        image_size: side S of the square input; divisible by 2 ** (len(channel_mult) - 1).
        base_channels: width ch of the first level; also the sinusoidal embedding width (MLP width 4 ch).
        channel_mult: per-level width multipliers; level i runs at S / 2**i with ch * channel_mult[i] channels.
        num_res_blocks: ResBlocks per level on the way down (one more per level on the way up).
        attention_resolutions: spatial sizes (e.g. 16) after whose ResBlocks self-attention is applied.
        dropout: dropout rate inside every ResBlock.
        num_heads: attention heads (1 in DDPM).
        num_classes: if set, a learned label embedding is added to the timestep embedding; label
            `num_classes` is the "null" (unconditional) label, used for samples whose y is None.

    At initialisation every residual branch and the output conv are zero, so the net outputs 0.
    The paper's CIFAR-10 net (3 -> 3, 32 px, ch 128, mult (1, 2, 2, 2), 2 blocks, attention at 16)
    has 35.7M parameters.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        image_size: int,
        base_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        num_heads: int = 1,
        num_classes: int | None = None,
    ):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        self._validate(in_channels, out_channels, image_size, base_channels, channel_mult, num_res_blocks,
                       attention_resolutions, dropout, num_heads, num_classes)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.image_size = image_size
        self.num_classes = num_classes

        self.time_embed = timestep_mlp(base_channels)
        emb_dim = 4 * base_channels
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None
        encoder = build_encoder(in_channels, image_size, base_channels, channel_mult, num_res_blocks,
                                attention_resolutions, dropout, num_heads)
        self.conv_in, self.down, self.mid = encoder.conv_in, encoder.down, encoder.mid
        skip_channels, ch, resolution = encoder.skip_channels, encoder.channels, encoder.resolution

        # Up path: num_res_blocks + 1 layers per level, each eating one skip (popped in reverse).
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            out_ch = base_channels * mult
            for i in range(num_res_blocks + 1):
                res = ResBlock(ch + skip_channels.pop(), out_ch, emb_dim, dropout)
                ch = out_ch
                upsample = Upsample(ch) if level != 0 and i == num_res_blocks else None
                self.up.append(ResAttnBlock(res, attention_at(ch, resolution, attention_resolutions, num_heads),
                                            upsample))
            if level != 0:
                resolution *= 2
        assert not skip_channels

        self.norm_out = group_norm(ch)
        self.conv_out = zero_module(nn.Conv2d(ch, out_channels, 3, padding=1))

    @staticmethod
    def _validate(in_channels, out_channels, image_size, base_channels, channel_mult, num_res_blocks,
                  attention_resolutions, dropout, num_heads, num_classes) -> None:
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("image_size", image_size), ("base_channels", base_channels),
                            ("num_heads", num_heads)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {list(channel_mult)}")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or None (unconditional), got {num_classes}")

        factor = 2 ** (len(channel_mult) - 1)
        if image_size % factor:
            lower = image_size // factor * factor
            options = " or ".join(str(s) for s in (lower, lower + factor) if s > 0)
            raise ValueError(
                f"image_size={image_size} must be divisible by 2**(len(channel_mult)-1)={factor} "
                f"(channel_mult={list(channel_mult)} halves the size {len(channel_mult) - 1} times); "
                f"use an image_size such as {options}, or fewer levels in channel_mult")

        visited = [image_size // 2**i for i in range(len(channel_mult))]
        unknown = [r for r in attention_resolutions if r not in visited]
        if unknown:
            raise ValueError(
                f"attention_resolutions {unknown} are never visited: with image_size={image_size} and "
                f"{len(channel_mult)} levels the net runs at resolutions {visited}; pick attention "
                f"resolutions from those")

        for mult in channel_mult:
            c = base_channels * mult
            if c % num_groups(c):
                raise ValueError(
                    f"GroupNorm uses {num_groups(c)} groups but a level has base_channels*mult = "
                    f"{base_channels}*{mult} = {c} channels; make every base_channels*mult a multiple "
                    f"of 32 (or below 32), e.g. base_channels=32, 64 or 128")
        for mult, r in zip(channel_mult, visited):
            c = base_channels * mult
            if r in attention_resolutions and c % num_heads:
                raise ValueError(
                    f"num_heads={num_heads} does not divide the {c} channels of the attention at "
                    f"resolution {r}; use a num_heads that divides {c}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the network takes and makes."""
        return (self.in_channels, self.image_size, self.image_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C_in, S, S] float, t [B] timesteps (long or float, 0..T-1), y [B] long labels or None
        (None = unconditional; a label equal to num_classes also means unconditional)
        -> [B, C_out, S, S]."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] != self.image_size \
                or x.shape[3] != self.image_size:
            raise ValueError(
                f"expected x of shape [B, {self.in_channels}, {self.image_size}, {self.image_size}] "
                f"(in_channels, image_size as built), got {list(x.shape)}; build the UNet with the data's "
                f"channels and image size")
        if t.shape != (x.shape[0],):
            raise ValueError(f"expected t of shape [{x.shape[0]}] (one timestep per image), got {list(t.shape)}")

        emb = self.time_embed(t)
        if self.label_embed is not None:
            if y is None:
                # Null label for the whole batch: broadcast one row instead of building an index tensor.
                emb = emb + self.label_embed.weight[self.num_classes]
            else:
                if y.shape != (x.shape[0],):
                    raise ValueError(f"expected y of shape [{x.shape[0]}] (one label per image), got {list(y.shape)}")
                emb = emb + self.label_embed(y)
        elif y is not None:
            raise ValueError("y was given but the UNet was built with num_classes=None; "
                             "set num_classes to use class labels, or pass y=None")
        # Every ResBlock applies SiLU before its projection of emb; do it once here.
        emb = F.silu(emb)

        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def timestep_mlp(base_channels: int) -> nn.Sequential:
    """Sinusoidal embedding of width ch and a two-layer MLP to 4 ch (DDPM's timestep embedding)."""
    emb_dim = 4 * base_channels
    return nn.Sequential(SinusoidalTimestepEmbedding(base_channels), nn.Linear(base_channels, emb_dim), nn.SiLU(),
                         nn.Linear(emb_dim, emb_dim))


def attention_at(channels: int, resolution: int, attention_resolutions: Sequence[int],
                 num_heads: int) -> AttentionBlock | None:
    return AttentionBlock(channels, num_heads) if resolution in attention_resolutions else None


class Encoder(NamedTuple):
    conv_in: nn.Conv2d
    down: nn.ModuleList
    mid: nn.ModuleList
    skip_channels: list[int]  # channels of every down-path output, conv_in's first (the U-Net's skips)
    channels: int  # width of the middle block
    resolution: int  # spatial size of the middle block


def build_encoder(in_channels: int, image_size: int, base_channels: int, channel_mult: Sequence[int],
                  num_res_blocks: int, attention_resolutions: Sequence[int], dropout: float,
                  num_heads: int) -> Encoder:
    """The U-Net's input conv, down path and middle block (shared by UNet and NoisyClassifier)."""
    emb_dim = 4 * base_channels
    ch = base_channels
    conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
    down = nn.ModuleList()
    skip_channels = [ch]
    resolution = image_size
    for level, mult in enumerate(channel_mult):
        out_ch = base_channels * mult
        for _ in range(num_res_blocks):
            res = ResBlock(ch, out_ch, emb_dim, dropout)
            down.append(ResAttnBlock(res, attention_at(out_ch, resolution, attention_resolutions, num_heads)))
            ch = out_ch
            skip_channels.append(ch)
        if level != len(channel_mult) - 1:
            down.append(Downsample(ch))
            skip_channels.append(ch)
            resolution //= 2
    mid = nn.ModuleList([
        ResAttnBlock(ResBlock(ch, ch, emb_dim, dropout), AttentionBlock(ch, num_heads)),
        ResAttnBlock(ResBlock(ch, ch, emb_dim, dropout)),
    ])
    return Encoder(conv_in, down, mid, skip_channels, ch, resolution)

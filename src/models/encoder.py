"""What the U-Net and the noisy classifier share: how their layers are built (LayerOptions), their resolution
levels (Levels) and the checks of both, the timestep embedding, and the encoder half (input conv, down path,
middle block) that the classifier ends with a pooled head and the U-Net mirrors with its up path."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from torch import nn

from .blocks import (
    NORM_EPS,
    AttentionBlock,
    Downsample,
    DownsamplePadding,
    ResAttnBlock,
    ResBlock,
    SinusoidalTimestepEmbedding,
    Upsample,
    num_groups,
)


@dataclass(frozen=True)
class LayerOptions:
    """How the layers of the U-Net (and of the classifier's encoder) are built; the defaults are DDPM's.

    num_head_channels: channels per attention head (ADM's 64), so wider levels get more heads; None: every
        attention layer has num_heads heads.
    scale_shift_norm, resblock_updown: see ResBlock (improved DDPM / ADM's AdaGN, BigGAN up/down blocks).
    norm_eps: GroupNorm epsilon (1e-6 DDPM, 1e-5 openai's nets).
    downsample_padding: see Downsample ("same" is DDPM's TensorFlow padding).
    """

    dropout: float = 0.0
    num_heads: int = 1
    num_head_channels: int | None = None
    scale_shift_norm: bool = False
    resblock_updown: bool = False
    norm_eps: float = NORM_EPS
    downsample_padding: DownsamplePadding = "symmetric"

    @classmethod
    def of(
        cls,
        dropout: float,
        num_heads: int,
        num_head_channels: int | None,
        scale_shift_norm: bool,
        resblock_updown: bool,
        norm_eps: float,
        downsample_padding: DownsamplePadding,
    ) -> "LayerOptions":
        """From the nets' constructor arguments, as config values give them."""
        return cls(
            float(dropout),
            int(num_heads),
            num_head_channels,
            bool(scale_shift_norm),
            bool(resblock_updown),
            float(norm_eps),
            downsample_padding,
        )

    def heads(self, channels: int) -> int:
        return channels // self.num_head_channels if self.num_head_channels else self.num_heads

    def res(self, in_channels: int, out_channels: int, emb_dim: int, resample: str | None = None) -> ResBlock:
        return ResBlock(
            in_channels, out_channels, emb_dim, self.dropout, self.scale_shift_norm, resample, self.norm_eps
        )

    def attention(self, channels: int) -> AttentionBlock:
        return AttentionBlock(channels, self.heads(channels), self.norm_eps)

    def downsampler(self, channels: int, emb_dim: int) -> Downsample | ResBlock:
        if self.resblock_updown:
            return self.res(channels, channels, emb_dim, "down")
        return Downsample(channels, self.downsample_padding)

    def upsampler(self, channels: int, emb_dim: int) -> Upsample | ResBlock:
        return self.res(channels, channels, emb_dim, "up") if self.resblock_updown else Upsample(channels)


class Levels(NamedTuple):
    """The resolution levels: level i runs at S / 2**i (S the size after patches) with base_channels *
    channel_mult[i] channels and num_res_blocks ResBlocks on the way down (one more on the way up);
    self-attention follows the ResBlocks at the sizes in attention_resolutions."""

    base_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]

    @classmethod
    def of(
        cls, base_channels: int, channel_mult: Sequence[int], num_res_blocks: int, attention_resolutions: Sequence[int]
    ) -> "Levels":
        """From the nets' constructor arguments, as config values give them."""
        return cls(
            base_channels,
            tuple(int(m) for m in channel_mult),
            num_res_blocks,
            tuple(int(r) for r in attention_resolutions),
        )


def check_arguments(
    in_channels: int,
    out_channels: int,
    image_size: int,
    levels: Levels,
    options: LayerOptions,
    num_classes: int | None,
    timestep_scale: float = 1.0,
    patch_size: int = 1,
) -> None:
    """The arguments of a UNet (or, with out_channels = num_classes, of a NoisyClassifier) build a net; each
    message names the fix."""
    base_channels, channel_mult, num_res_blocks, _ = levels
    num_heads, dropout = options.num_heads, options.dropout
    if patch_size < 1 or image_size % patch_size:
        raise ValueError(
            f"patch_size must be a positive divisor of image_size={image_size}, got {patch_size}; "
            f"use patch_size=1 (no patches) or e.g. 2"
        )
    for name, value in (
        ("in_channels", in_channels),
        ("out_channels", out_channels),
        ("image_size", image_size),
        ("base_channels", base_channels),
        ("num_heads", num_heads),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if options.num_head_channels is not None and options.num_head_channels < 1:
        raise ValueError(f"num_head_channels must be >= 1 or None (use num_heads), got {options.num_head_channels}")
    if not timestep_scale > 0:
        raise ValueError(f"timestep_scale must be > 0, got {timestep_scale}")
    if options.norm_eps <= 0:
        raise ValueError(f"norm_eps must be > 0, got {options.norm_eps}")
    if options.downsample_padding not in ("symmetric", "same"):
        raise ValueError(f"downsample_padding must be 'symmetric' or 'same', got {options.downsample_padding!r}")
    if options.resblock_updown and options.downsample_padding != "symmetric":
        raise ValueError(
            "downsample_padding applies to the stride-2 conv, which resblock_updown=true replaces "
            "by average pooling; leave downsample_padding at 'symmetric'"
        )
    if not channel_mult or min(channel_mult) < 1:
        raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {list(channel_mult)}")
    if num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 or None (unconditional), got {num_classes}")
    _check_layout(image_size, levels, options, patch_size)


def _check_layout(image_size: int, levels: Levels, options: LayerOptions, patch_size: int = 1) -> None:
    """The levels fit the image size (after p x p patches), the attention sits at visited resolutions, and
    the widths suit the group norm and the attention heads. Messages name the image size as set."""
    base_channels, channel_mult, _, attention_resolutions = levels
    num_heads = options.num_heads
    factor = patch_size * 2 ** (len(channel_mult) - 1)
    if image_size % factor:
        lower = image_size // factor * factor
        options = " or ".join(str(s) for s in (lower, lower + factor) if s > 0)
        patches = "patch_size * " if patch_size > 1 else ""
        raise ValueError(
            f"image_size={image_size} must be divisible by {patches}2**(len(channel_mult)-1)={factor} "
            f"(channel_mult={list(channel_mult)} halves the size {len(channel_mult) - 1} times); "
            f"use an image_size such as {options}, or fewer levels in channel_mult"
        )

    visited = [image_size // patch_size // 2**i for i in range(len(channel_mult))]
    unknown = [r for r in attention_resolutions if r not in visited]
    if unknown:
        patches = f", patch_size={patch_size}" if patch_size > 1 else ""
        raise ValueError(
            f"attention_resolutions {unknown} are never visited: with image_size={image_size}{patches} and "
            f"{len(channel_mult)} levels the net runs at resolutions {visited}; pick attention "
            f"resolutions from those"
        )

    for mult in channel_mult:
        c = base_channels * mult
        if c % num_groups(c):
            raise ValueError(
                f"GroupNorm uses {num_groups(c)} groups but a level has base_channels*mult = "
                f"{base_channels}*{mult} = {c} channels; make every base_channels*mult a multiple "
                f"of 32 (or below 32), e.g. base_channels=32, 64 or 128"
            )
    attended = [(base_channels * m, r) for m, r in zip(channel_mult, visited) if r in attention_resolutions]
    attended.append((base_channels * channel_mult[-1], visited[-1]))  # the middle block's attention
    for c, r in attended:
        if options.num_head_channels is not None and c % options.num_head_channels:
            raise ValueError(
                f"num_head_channels={options.num_head_channels} does not divide the {c} channels of the "
                f"attention at resolution {r}; use a num_head_channels that divides every attended width"
            )
        if options.num_head_channels is None and c % num_heads:
            raise ValueError(
                f"num_heads={num_heads} does not divide the {c} channels of the attention at "
                f"resolution {r}; use a num_heads that divides {c}"
            )


def timestep_mlp(base_channels: int, freq_shift: int = 0, scale: float = 1.0) -> nn.Sequential:
    """Sinusoidal embedding of width ch and a two-layer MLP to 4 ch (DDPM's timestep embedding)."""
    emb_dim = 4 * base_channels
    return nn.Sequential(
        SinusoidalTimestepEmbedding(base_channels, freq_shift=freq_shift, scale=scale),
        nn.Linear(base_channels, emb_dim),
        nn.SiLU(),
        nn.Linear(emb_dim, emb_dim),
    )


def attention_at(
    channels: int, resolution: int, attention_resolutions: Sequence[int], options: LayerOptions
) -> AttentionBlock | None:
    """Self-attention for a block at `resolution` if attention_resolutions names it."""
    return options.attention(channels) if resolution in attention_resolutions else None


class Encoder(NamedTuple):
    conv_in: nn.Conv2d
    down: nn.ModuleList
    mid: nn.ModuleList
    skip_channels: list[int]  # channels of every down-path output, conv_in's first (the U-Net's skips)
    channels: int  # width of the middle block
    resolution: int  # spatial size of the middle block


def build_encoder(in_channels: int, image_size: int, levels: Levels, options: LayerOptions) -> Encoder:
    """The U-Net's input conv, down path and middle block (shared by UNet and NoisyClassifier)."""
    base_channels, channel_mult, num_res_blocks, attention_resolutions = levels
    emb_dim = 4 * base_channels
    ch = base_channels
    conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
    down = nn.ModuleList()
    skip_channels = [ch]
    resolution = image_size
    for level, mult in enumerate(channel_mult):
        out_ch = base_channels * mult
        for _ in range(num_res_blocks):
            res = options.res(ch, out_ch, emb_dim)
            down.append(ResAttnBlock(res, attention_at(out_ch, resolution, attention_resolutions, options)))
            ch = out_ch
            skip_channels.append(ch)
        if level != len(channel_mult) - 1:
            down.append(options.downsampler(ch, emb_dim))
            skip_channels.append(ch)
            resolution //= 2
    mid = nn.ModuleList(
        [
            ResAttnBlock(options.res(ch, ch, emb_dim), options.attention(ch)),
            ResAttnBlock(options.res(ch, ch, emb_dim)),
        ]
    )
    return Encoder(conv_in, down, mid, skip_channels, ch, resolution)

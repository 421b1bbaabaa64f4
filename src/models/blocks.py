"""Building blocks of the DDPM U-Net (Ho et al. 2020): timestep embedding, residual block,
self-attention, down/up-sampling, and the variants the released improved DDPM / ADM nets use (scale-shift
norm, residual up/down-sampling, attention pooling).

Shape notation: B batch, C channels, H x W spatial size, E timestep-embedding width (4 * base_channels).
"""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

MAX_GROUPS = 32


def num_groups(channels: int) -> int:
    """GroupNorm group count: 32 as in the paper, or one group per channel below 32 channels.
    Callers check `channels % num_groups(channels) == 0` (UNet does so in its constructor)."""
    return min(MAX_GROUPS, channels)


# GroupNorm epsilon: 1e-6 as in DDPM's TensorFlow code (and diffusers' google/ddpm-* configs); openai's
# improved-diffusion / guided-diffusion nets use torch's default 1e-5.
NORM_EPS = 1e-6

DownsamplePadding = Literal["symmetric", "same"]
Resample = Literal["down", "up"]


def group_norm(channels: int, eps: float = NORM_EPS) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups(channels), channels, eps=eps)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so the residual branch it closes starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class SinusoidalTimestepEmbedding(nn.Module):
    """t [B] (long or float, 0-based) -> [B, dim] of [sin(s t f_i), cos(s t f_i)],
    f_i = max_period ** (-i / (dim // 2 - freq_shift)) for i < dim // 2 (zero-padded when dim is odd).

    freq_shift: 0 as in improved-diffusion, 1 as in DDPM's TensorFlow code (diffusers' freq_shift=1).
    scale s: 1, or improved-diffusion's rescale_timesteps (1000 / T: the net sees t on a 0..1000 scale).
    (improved-diffusion orders the halves [cos, sin]: a permutation of the next layer's inputs, which the
    weight converters apply.)
    """

    def __init__(self, dim: int, max_period: float = 10000.0, freq_shift: int = 0, scale: float = 1.0):
        super().__init__()
        self.dim = dim
        self.scale = float(scale)
        half = dim // 2
        if freq_shift not in (0, 1) or half - freq_shift < 1:
            raise ValueError(f"timestep freq_shift must be 0 or 1 (and below dim // 2 = {half}), got {freq_shift}")
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - freq_shift))
        # Not persistent: derived from (dim, max_period, freq_shift), so it stays out of checkpoints.
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # Phases in float32 even if the module was cast to half (t reaches ~1000, fp16 would lose it);
        # the result follows the buffer's dtype, i.e. the dtype the module was cast to.
        t = t.float() if self.scale == 1.0 else t.float() * self.scale
        args = t[:, None] * self.freqs.float()[None, :]
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
        if self.dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb.to(self.freqs.dtype)


class ResBlock(nn.Module):
    """x [B, C_in, H, W], emb [B, E] (already passed through SiLU) -> [B, C_out, H, W].

    GroupNorm -> SiLU -> conv3x3 -> + Linear(emb) -> GroupNorm -> SiLU -> Dropout -> conv3x3 (zero-init),
    added to x (1x1 conv on x when the channel count changes).

    scale_shift_norm: the embedding gives a scale and a shift of the second GroupNorm instead of a bias before
        it, h = GroupNorm(h) (1 + scale) + shift (improved DDPM / ADM's "AdaGN"; Linear(emb) is 2 C_out wide).
    resample: "down" / "up" makes it BigGAN's residual resampling block (ADM): both the branch (after the
        first SiLU) and x are average-pooled / nearest-upsampled by 2, so [B, C, H/2, W/2] / [B, C, 2H, 2W].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        dropout: float = 0.0,
        scale_shift_norm: bool = False,
        resample: Resample | None = None,
        norm_eps: float = NORM_EPS,
    ):
        super().__init__()
        if resample not in (None, "down", "up"):
            raise ValueError(f"resample must be None, 'down' or 'up', got {resample!r}")
        self.scale_shift_norm, self.resample = scale_shift_norm, resample
        self.norm1 = group_norm(in_channels, norm_eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels if scale_shift_norm else out_channels)
        self.norm2 = group_norm(out_channels, norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample is None:
            h = self.conv1(F.silu(self.norm1(x)))
        else:
            h = self.conv1(_resample(F.silu(self.norm1(x)), self.resample))
            x = _resample(x, self.resample)
        if self.scale_shift_norm:
            scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + self.emb_proj(emb)[:, :, None, None])
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


def _resample(x: torch.Tensor, how: Resample) -> torch.Tensor:
    """The parameter-free resampling of BigGAN's blocks: 2x2 average pooling, or nearest-neighbour x2."""
    return (
        F.avg_pool2d(x, kernel_size=2, stride=2)
        if how == "down"
        else F.interpolate(x, scale_factor=2.0, mode="nearest")
    )


class AttentionBlock(nn.Module):
    """x [B, C, H, W] -> [B, C, H, W]: multi-head self-attention over the H*W positions, residual.

    GroupNorm -> qkv 1x1 conv -> scaled_dot_product_attention -> 1x1 proj (zero-init) -> + x.
    """

    def __init__(self, channels: int, num_heads: int = 1, norm_eps: float = NORM_EPS):
        super().__init__()
        if channels % num_heads:
            raise ValueError(
                f"attention over {channels} channels cannot be split into num_heads={num_heads}; "
                f"use a num_heads that divides {channels}"
            )
        self.num_heads = num_heads
        self.norm = group_norm(channels, norm_eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        heads = self.num_heads
        # [B, 3C, H, W] -> [B, 3*heads, HW, C/heads]; contiguous so SDPA can pick its fused kernels.
        qkv = self.qkv(self.norm(x)).reshape(b, 3 * heads, c // heads, h * w).transpose(-1, -2).contiguous()
        q, k, v = qkv.chunk(3, dim=1)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, C/heads], scale 1/sqrt(C/heads)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """[B, C, H, W] -> [B, C, H/2, W/2] by a stride-2 3x3 conv.

    padding: "symmetric" pads one pixel on every side (improved-diffusion); "same" pads one row and column
    after the image only, TensorFlow's SAME padding of DDPM's code (diffusers' downsample_padding=0).
    """

    def __init__(self, channels: int, padding: DownsamplePadding = "symmetric"):
        super().__init__()
        if padding not in ("symmetric", "same"):
            raise ValueError(f"downsample padding must be 'symmetric' or 'same', got {padding!r}")
        self.same_padding = padding == "same"
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.same_padding else 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        if self.same_padding:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """[B, C, H, W] -> [B, C, 2H, 2W] by nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AttentionPool(nn.Module):
    """x [B, C, S, S] -> [B, C]: CLIP's attention pooling, as ADM's classifiers use (pool="attention").

    The mean over positions is prepended as a query token, a learned positional embedding [C, S*S + 1] is
    added, and multi-head attention (heads of num_head_channels) runs over the S*S + 1 tokens; the output
    is the attended mean token (the classifier's linear head follows).
    """

    def __init__(self, channels: int, spatial: int, num_head_channels: int):
        super().__init__()
        if channels % num_head_channels:
            raise ValueError(
                f"attention pooling over {channels} channels cannot be split into heads of {num_head_channels} channels"
            )
        self.num_heads = channels // num_head_channels
        self.positional_embedding = nn.Parameter(torch.randn(channels, spatial**2 + 1) / channels**0.5)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding[None].to(x.dtype)
        heads, n = self.num_heads, x.shape[-1]
        # [B, 3C, N] -> q, k, v [B, heads, N, C/heads] (q | k | v, each split into heads, as AttentionBlock)
        q, k, v = self.qkv(x).reshape(b, 3 * heads, c // heads, n).transpose(-1, -2).chunk(3, dim=1)
        out = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # only the mean token is read out
        return out.reshape(b, c)


class ResAttnBlock(nn.Module):
    """One U-Net layer: ResBlock, then self-attention and/or an upsampler when given (Upsample, or a
    ResBlock with resample="up"). x [B, C_in, H, W], emb [B, E] -> [B, C_out, H, W] (2H x 2W with upsample)."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None = None, upsample: Upsample | ResBlock | None = None):
        super().__init__()
        self.res = res
        self.attn = attn
        self.upsample = upsample

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x)
        if self.upsample is not None:
            x = self.upsample(x, emb)
        return x

"""Building blocks of the DDPM U-Net (Ho et al. 2020): timestep embedding, residual block,
self-attention, down/up-sampling.

Shape notation: B batch, C channels, H x W spatial size, E timestep-embedding width (4 * base_channels).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

MAX_GROUPS = 32


def num_groups(channels: int) -> int:
    """GroupNorm group count: 32 as in the paper, or one group per channel below 32 channels.
    Callers check `channels % num_groups(channels) == 0` (UNet does so in its constructor)."""
    return min(MAX_GROUPS, channels)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups(channels), channels, eps=1e-6)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so the residual branch it closes starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class SinusoidalTimestepEmbedding(nn.Module):
    """t [B] (long or float, 0-based) -> [B, dim] of [sin(t * f_i), cos(t * f_i)],
    f_i = max_period ** (-i / (dim // 2)) for i < dim // 2 (zero-padded when dim is odd)."""

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        self.dim = dim
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        # Not persistent: derived from (dim, max_period), so it stays out of checkpoints.
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # Phases in float32 even if the module was cast to half (t reaches ~1000, fp16 would lose it);
        # the result follows the buffer's dtype, i.e. the dtype the module was cast to.
        args = t.float()[:, None] * self.freqs.float()[None, :]
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
        if self.dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb.to(self.freqs.dtype)


class ResBlock(nn.Module):
    """x [B, C_in, H, W], emb [B, E] (already passed through SiLU) -> [B, C_out, H, W].

    GroupNorm -> SiLU -> conv3x3 -> + Linear(emb) -> GroupNorm -> SiLU -> Dropout -> conv3x3 (zero-init),
    added to x (1x1 conv on x when the channel count changes).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """x [B, C, H, W] -> [B, C, H, W]: multi-head self-attention over the H*W positions, residual.

    GroupNorm -> qkv 1x1 conv -> scaled_dot_product_attention -> 1x1 proj (zero-init) -> + x.
    """

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention over {channels} channels cannot be split into num_heads={num_heads}; "
                             f"use a num_heads that divides {channels}")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
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
    """[B, C, H, W] -> [B, C, H/2, W/2] by a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """[B, C, H, W] -> [B, C, 2H, 2W] by nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResAttnBlock(nn.Module):
    """One U-Net layer: ResBlock, then self-attention and/or Upsample when given.
    x [B, C_in, H, W], emb [B, E] -> [B, C_out, H, W] (2H x 2W with upsample)."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None = None, upsample: Upsample | None = None):
        super().__init__()
        self.res = res
        self.attn = attn
        self.upsample = upsample

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x

"""The noisy-image classifier of classifier guidance (Dhariwal & Nichol 2021, Sec. 4): the encoder half
of the U-Net (timestep embedding, down path, middle block) and a pooled linear head, trained on x_t."""

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import NORM_EPS, AttentionPool, DownsamplePadding, group_norm, zero_module
from .encoder import LayerOptions, Levels, build_encoder, check_arguments, timestep_mlp

Pool = Literal["adaptive", "attention"]


class NoisyClassifier(nn.Module):
    """(x_t [B, C_in, S, S], t [B]) -> logits [B, num_classes] of p(y | x_t).

    The layers are those of UNet's down path and middle block with the same arguments (so a model config
    of the U-Net builds its matching classifier), followed by GroupNorm, SiLU, a pooling and a
    zero-initialised linear layer `out`, so every class starts equally likely.

    pool: "adaptive" averages over positions (guided-diffusion's "adaptive" head); "attention" is ADM's
        attention pooling (AttentionPool, heads of num_head_channels, which it requires), as in the
        released noisy ImageNet classifiers. The layer options (num_head_channels, scale_shift_norm,
        resblock_updown, norm_eps, timestep_freq_shift, timestep_scale, downsample_padding, patch_size) are UNet's.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        base_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        num_heads: int = 1,
        num_head_channels: int | None = None,
        scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        norm_eps: float = NORM_EPS,
        timestep_freq_shift: int = 0,
        timestep_scale: float = 1.0,
        downsample_padding: DownsamplePadding = "symmetric",
        pool: Pool = "adaptive",
        patch_size: int = 1,
    ):
        super().__init__()
        _check_head(num_classes, pool, num_head_channels)
        patch_size = int(patch_size)
        levels = Levels.of(base_channels, channel_mult, num_res_blocks, attention_resolutions)
        options = LayerOptions.of(
            dropout, num_heads, num_head_channels, scale_shift_norm, resblock_updown, norm_eps, downsample_padding
        )
        check_arguments(in_channels, num_classes, image_size, levels, options, None, timestep_scale, patch_size)
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.patch_size = patch_size

        self.time_embed = timestep_mlp(base_channels, timestep_freq_shift, timestep_scale)
        encoder = build_encoder(in_channels * patch_size**2, image_size // patch_size, levels, options)
        self.conv_in, self.down, self.mid = encoder.conv_in, encoder.down, encoder.mid
        ch = encoder.channels
        self.norm_out = group_norm(ch, options.norm_eps)
        self.pool = AttentionPool(ch, encoder.resolution, num_head_channels) if pool == "attention" else None
        self.out = zero_module(nn.Linear(ch, num_classes))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the classifier takes."""
        return (self.in_channels, self.image_size, self.image_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x [B, C_in, S, S] float, t [B] timesteps (0..T-1) -> logits [B, num_classes]."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(
                f"expected x of shape [B, {self.in_channels}, {self.image_size}, {self.image_size}], "
                f"got {list(x.shape)}; build the classifier with the data's channels and image size"
            )
        if t.shape != (x.shape[0],):
            raise ValueError(f"expected t of shape [{x.shape[0]}] (one timestep per image), got {list(t.shape)}")
        emb = F.silu(self.time_embed(t))
        h = self.conv_in(F.pixel_unshuffle(x, self.patch_size) if self.patch_size > 1 else x)
        for layer in [*self.down, *self.mid]:
            h = layer(h, emb)
        h = F.silu(self.norm_out(h))
        return self.out(h.mean(dim=(2, 3)) if self.pool is None else self.pool(h))


def _check_head(num_classes: int, pool: Pool, num_head_channels: int | None) -> None:
    """The head's options: at least one class, a known pooling, and head widths for attention pooling."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if pool not in ("adaptive", "attention"):
        raise ValueError(f"pool must be 'adaptive' or 'attention', got {pool!r}")
    if pool == "attention" and num_head_channels is None:
        raise ValueError("pool='attention' splits its heads by num_head_channels; set num_head_channels (ADM: 64)")

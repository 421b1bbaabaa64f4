"""The DDPM U-Net (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", appendix B), laid out as
in openai/improved-diffusion's UNetModel and diffusers' UNet2DModel (google/ddpm-cifar10-32), with the
options of the released improved DDPM (Nichol & Dhariwal 2021) and ADM (Dhariwal & Nichol 2021) nets."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import NORM_EPS, DownsamplePadding, ResAttnBlock, group_norm, zero_module
from .encoder import Encoder, LayerOptions, Levels, attention_at, build_encoder, check_arguments, timestep_mlp


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
        num_head_channels: channels per attention head instead of a head count (ADM: 64); None: num_heads.
        scale_shift_norm: the timestep embedding scales and shifts the ResBlocks' second GroupNorm
            (improved DDPM / ADM's AdaGN) instead of adding a bias before it.
        resblock_updown: down/up-sample with BigGAN-style residual blocks (ADM) instead of a stride-2 conv /
            nearest upsampling + conv.
        null_label: with num_classes, keep the extra "null" label row (classifier-free guidance, samples with
            y None); false for nets trained without one (openai's class-conditional models), which then need
            a label for every sample.
        norm_eps: GroupNorm epsilon: 1e-6 (DDPM's TensorFlow code) or 1e-5 (openai's nets).
        timestep_freq_shift: sinusoidal frequencies 10000^(-i / (ch/2 - shift)): 0 (improved-diffusion) or 1
            (DDPM's TensorFlow code, diffusers' freq_shift=1).
        timestep_scale: the net embeds t * timestep_scale; improved-diffusion's rescale_timesteps is 1000 / T
            (0.25 for its T=4000 CIFAR-10 models), so its nets see t on a 0..1000 scale.
        downsample_padding: "symmetric" (improved-diffusion) or "same" (DDPM's TensorFlow SAME padding: one
            row and column after the image) of the stride-2 downsampling conv.
        patch_size: p > 1 folds every p x p pixel patch into channels (pixel_unshuffle) before the first conv
            and unfolds the output (pixel_shuffle), so the levels run at S / p, S / 2p, ... (a "patchified"
            first layer as in Hoogeboom et al. 2023, "simple diffusion"); attention_resolutions are sizes of
            those levels. Lossless, about p**2 times cheaper per image; for images that carry little detail
            at full size (the 8x8 digits upsampled to 16x16).

    Every option beyond num_classes defaults to this project's original net, so older configs and
    checkpoints build the same modules with the same seeded weights.

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
        num_head_channels: int | None = None,
        scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        null_label: bool = True,
        norm_eps: float = NORM_EPS,
        timestep_freq_shift: int = 0,
        timestep_scale: float = 1.0,
        downsample_padding: DownsamplePadding = "symmetric",
        patch_size: int = 1,
    ):
        super().__init__()
        patch_size = int(patch_size)
        levels = Levels.of(base_channels, channel_mult, num_res_blocks, attention_resolutions)
        options = LayerOptions.of(
            dropout, num_heads, num_head_channels, scale_shift_norm, resblock_updown, norm_eps, downsample_padding
        )
        check_arguments(in_channels, out_channels, image_size, levels, options, num_classes, timestep_scale, patch_size)
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.null_label = bool(null_label)

        self.time_embed = timestep_mlp(base_channels, timestep_freq_shift, timestep_scale)
        emb_dim = 4 * base_channels
        if num_classes is not None:
            self.label_embed = nn.Embedding(num_classes + 1 if self.null_label else num_classes, emb_dim)
        else:
            self.label_embed = None
        encoder = build_encoder(in_channels * patch_size**2, image_size // patch_size, levels, options)
        self.conv_in, self.down, self.mid = encoder.conv_in, encoder.down, encoder.mid
        self.up, ch = self._build_up_path(encoder, levels, options, emb_dim)
        self.norm_out = group_norm(ch, options.norm_eps)
        self.conv_out = zero_module(nn.Conv2d(ch, out_channels * patch_size**2, 3, padding=1))

    @staticmethod
    def _build_up_path(
        encoder: Encoder, levels: Levels, options: LayerOptions, emb_dim: int
    ) -> tuple[nn.ModuleList, int]:
        """The up path: num_res_blocks + 1 layers per level, each eating one of the encoder's skips (popped in
        reverse); returns the layers and the channels they end with."""
        base_channels, channel_mult, num_res_blocks, attention_resolutions = levels
        skip_channels, ch, resolution = list(encoder.skip_channels), encoder.channels, encoder.resolution
        up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            out_ch = base_channels * mult
            for i in range(num_res_blocks + 1):
                res = options.res(ch + skip_channels.pop(), out_ch, emb_dim)
                ch = out_ch
                upsample = options.upsampler(ch, emb_dim) if level != 0 and i == num_res_blocks else None
                up.append(ResAttnBlock(res, attention_at(ch, resolution, attention_resolutions, options), upsample))
            if level != 0:
                resolution *= 2
        assert not skip_channels
        return up, ch

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the network takes and makes."""
        return (self.in_channels, self.image_size, self.image_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C_in, S, S] float, t [B] timesteps (long or float, 0..T-1), y [B] long labels or None
        (None = unconditional; a label equal to num_classes also means unconditional)
        -> [B, C_out, S, S]."""
        if (
            x.ndim != 4
            or x.shape[1] != self.in_channels
            or x.shape[2] != self.image_size
            or x.shape[3] != self.image_size
        ):
            raise ValueError(
                f"expected x of shape [B, {self.in_channels}, {self.image_size}, {self.image_size}] "
                f"(in_channels, image_size as built), got {list(x.shape)}; build the UNet with the data's "
                f"channels and image size"
            )
        if t.shape != (x.shape[0],):
            raise ValueError(f"expected t of shape [{x.shape[0]}] (one timestep per image), got {list(t.shape)}")

        emb = self.time_embed(t)
        if self.label_embed is not None:
            if y is None and not self.null_label:
                raise ValueError(
                    "this class-conditional net was built with null_label=false (no unconditional "
                    "label, as openai's released models): give a class label y for every sample"
                )
            if y is None:
                # Null label for the whole batch: broadcast one row instead of building an index tensor.
                emb = emb + self.label_embed.weight[self.num_classes]
            else:
                if y.shape != (x.shape[0],):
                    raise ValueError(f"expected y of shape [{x.shape[0]}] (one label per image), got {list(y.shape)}")
                if not self.null_label and bool((y >= self.num_classes).any()):
                    raise ValueError(
                        f"label {self.num_classes} (the null label of classifier-free guidance) does not "
                        f"exist in this net (null_label=false, trained without label dropout); sample "
                        f"with labels 0..{self.num_classes - 1} and no classifier-free guidance"
                    )
                emb = emb + self.label_embed(y)
        elif y is not None:
            raise ValueError(
                "y was given but the UNet was built with num_classes=None; "
                "set num_classes to use class labels, or pass y=None"
            )
        # Every ResBlock applies SiLU before its projection of emb; do it once here.
        emb = F.silu(emb)

        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, self.patch_size) if self.patch_size > 1 else out

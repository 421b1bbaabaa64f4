"""The configs of diffusers' UNet2DModel and DDPMScheduler against this project's: a UNet2DModel config as our
model config (src.models.UNet flags), a scheduler config as train overrides (schedule, objective, sampler), and
back from a run config for export. What one side cannot express is a ConversionError naming the setting.
"""

from __future__ import annotations

import inspect
import math

from omegaconf import DictConfig

from src.models import UNet

from .base import ConversionError

SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")  # configs that hold the training schedule we read
LINEAR_BETAS = (1e-4, 0.02)  # src.diffusion.make_beta_schedule("linear", 1000); both scaled by 1000 / T
# diffusers' prediction_type -> objective.mean_type
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# How a diffusers block type down- or up-samples: (attention, resampling) with None = the config's
# downsample_type / upsample_type.
DOWN_BLOCKS = {
    "DownBlock2D": (False, "conv"),
    "AttnDownBlock2D": (True, None),
    "ResnetDownsampleBlock2D": (False, "resnet"),
}
UP_BLOCKS = {"UpBlock2D": (False, "conv"), "AttnUpBlock2D": (True, None), "ResnetUpsampleBlock2D": (False, "resnet")}
# UNet flags beyond DDPM's (src.models.UNet); written into a model config only when not at their defaults
OPTIONS = (
    "num_head_channels",
    "null_label",
    "scale_shift_norm",
    "resblock_updown",
    "norm_eps",
    "timestep_freq_shift",
    "timestep_scale",
    "downsample_padding",
)


# --- diffusers config -> our model config and train overrides --------------------------------------------
def _unsupported(config: dict, key: str, why: str):
    return ConversionError(
        f"{key}={config.get(key)!r} in the UNet2DModel config: {why}; this project's U-Net cannot express it"
    )


def _check_fixed_choices(c: dict) -> None:
    """The UNet2DModel settings this U-Net has only one way of doing."""
    fixed = {
        "time_embedding_type": "positional",
        "center_input_sample": False,
        "mid_block_type": "UNetMidBlock2D",
        "add_attention": True,
        "class_embed_type": None,
        "norm_num_groups": 32,
    }
    for key, value in fixed.items():
        if c.get(key, value) != value:
            raise _unsupported(c, key, f"only {value!r} is supported")
    if c.get("act_fn", "silu") not in ("silu", "swish"):
        raise _unsupported(c, "act_fn", "the U-Net uses SiLU")
    if float(c.get("mid_block_scale_factor", 1)) != 1.0:
        raise _unsupported(c, "mid_block_scale_factor", "the middle block's residuals are not rescaled here")
    if c.get("freq_shift", 0) not in (0, 1):
        raise _unsupported(c, "freq_shift", "the timestep frequencies take a shift of 0 or 1")


def model_config(c: dict) -> tuple[dict, tuple[int, int]]:
    """Our model config (src.models.UNet flags) and (channels, image size) of a UNet2DModel config."""
    _check_fixed_choices(c)
    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise _unsupported(c, "sample_size", "the U-Net makes square images")
        size = size[0]
    channels = [int(ch) for ch in c["block_out_channels"]]
    base = channels[0]
    scale_shift = _check_widths(c, channels)
    down_attn, updown, padding = _resampling(c, len(channels))
    head_dim = c.get("attention_head_dim")
    model = {
        "_target_": "src.models.UNet",
        "base_channels": base,
        "channel_mult": [ch // base for ch in channels],
        "num_res_blocks": int(c["layers_per_block"]),
        "attention_resolutions": [size // 2**i for i, a in enumerate(down_attn) if a],
        "dropout": float(c.get("dropout", 0.0)),
        "num_heads": 1,
        "num_head_channels": None if head_dim is None else int(head_dim),
        "num_classes": c.get("num_class_embeds"),
        "null_label": c.get("num_class_embeds") is None,
        "scale_shift_norm": scale_shift,
        "resblock_updown": updown,
        "norm_eps": float(c.get("norm_eps", 1e-5)),
        "timestep_freq_shift": int(c.get("freq_shift", 0)),
        "timestep_scale": 1.0,
        "downsample_padding": "symmetric" if updown else padding,
    }
    # The options at their defaults stay out, so the model config reads (and resumes) like a conf/model one.
    defaults = {
        k: v.default
        for k, v in inspect.signature(UNet.__init__).parameters.items()
        if k in OPTIONS and v.default is not inspect.Parameter.empty
    }
    return {k: v for k, v in model.items() if k not in defaults or defaults[k] != v}, (int(c["in_channels"]), int(size))


def _check_widths(c: dict, channels: list[int]) -> bool:
    """The level widths and the timestep embedding fit the U-Net's; returns whether the timestep embedding
    scales and shifts the norms (resnet_time_scale_shift)."""
    base = channels[0]
    if c.get("time_embedding_dim") not in (None, 4 * base):
        raise _unsupported(c, "time_embedding_dim", f"the timestep embedding is 4 x block_out_channels[0] = {4 * base}")
    if any(ch % base for ch in channels):
        raise _unsupported(c, "block_out_channels", "every width must be a multiple of the first")
    if min(channels) < 32 or any(ch % 32 for ch in channels):
        raise _unsupported(c, "block_out_channels", "with norm_num_groups=32 every width must be a multiple of 32")
    scale_shift = {"default": False, "scale_shift": True}.get(c.get("resnet_time_scale_shift", "default"))
    if scale_shift is None:
        raise _unsupported(c, "resnet_time_scale_shift", "only 'default' and 'scale_shift' are supported")
    if c.get("attn_norm_num_groups") not in (None, 32) or (scale_shift and c.get("attn_norm_num_groups") is None):
        raise _unsupported(
            c,
            "attn_norm_num_groups",
            "the attention layers have a 32-group GroupNorm (diffusers "
            "drops the middle one under scale_shift unless this is 32)",
        )
    return scale_shift


def _resampling(c: dict, num_levels: int) -> tuple[list[bool], bool, str | None]:
    """(attention per level, resnet up/down-sampling, downsampling conv padding) of the block types."""
    down_attn, down_kind = _block_kinds(c, "down_block_types", DOWN_BLOCKS, c.get("downsample_type", "conv"))
    up_attn, up_kind = _block_kinds(c, "up_block_types", UP_BLOCKS, c.get("upsample_type", "conv"))
    if down_attn != list(reversed(up_attn)):
        raise _unsupported(c, "up_block_types", "attention must sit at the same levels on the way down and up")
    if len({*down_kind[:-1], *up_kind[:-1]}) > 1:
        raise _unsupported(
            c, "downsample_type", "every level must resample the same way (conv, or resnet blocks for all)"
        )
    updown = down_kind[0] == "resnet" if num_levels > 1 else False
    padding = {1: "symmetric", 0: "same"}.get(c.get("downsample_padding", 1))
    if padding is None and not updown:
        raise _unsupported(c, "downsample_padding", "the stride-2 conv pads 1 pixel around (1) or TF-style (0)")
    return down_attn, updown, padding


def _block_kinds(c: dict, key: str, table: dict, resample: str) -> tuple[list[bool], list[str]]:
    attention, kinds = [], []
    for name in c[key]:
        if name not in table:
            raise _unsupported(c, key, f"block {name} has no counterpart (use {', '.join(table)})")
        attn, kind = table[name]
        attention.append(attn)
        kinds.append(kind or resample)
    return attention, kinds


def train_overrides(s: dict, image_channels: int, out_channels: int) -> list[str]:
    """Schedule, objective and sampler overrides of a DDPM scheduler config (the training process)."""
    name = s.get("_class_name", "DDPMScheduler")
    if name not in SCHEDULERS:
        raise ConversionError(
            f"a {name} config does not describe the training schedule here; give the model's "
            f"DDPMScheduler (or DDIMScheduler) config"
        )
    num_t = int(s.get("num_train_timesteps", 1000))
    for key, off in (("trained_betas", None), ("thresholding", False), ("rescale_betas_zero_snr", False)):
        if s.get(key, off) not in (off, []):
            raise _scheduler_unsupported(s, key)
    overrides = [f"schedule.num_timesteps={num_t}", "task=diffusion"]
    beta_schedule = s.get("beta_schedule", "linear")
    if beta_schedule == "linear":
        scale = 1000.0 / num_t
        given = (float(s.get("beta_start", 1e-4)), float(s.get("beta_end", 0.02)))
        if not all(math.isclose(g, scale * b, rel_tol=1e-6) for g, b in zip(given, LINEAR_BETAS)):
            raise ConversionError(
                f"beta_start={given[0]}, beta_end={given[1]} with T={num_t}: this project's linear "
                f"schedule runs from 1e-4 to 0.02 scaled by 1000/T ({scale * 1e-4:g}..{scale * 0.02:g})"
            )
        overrides.insert(0, "schedule=linear")
    elif beta_schedule == "squaredcos_cap_v2":
        overrides.insert(0, "schedule=cosine")
    else:
        raise _scheduler_unsupported(s, "beta_schedule")
    variance = s.get("variance_type", "fixed_small")
    if out_channels == 2 * image_channels:
        if variance != "learned_range":
            raise ConversionError(
                f"the UNet outputs {out_channels} channels for {image_channels}-channel images "
                f"(a learned variance) but variance_type={variance!r}; only learned_range (improved "
                f"DDPM's interpolation) is supported"
            )
        overrides.append("objective=hybrid")
    elif out_channels == image_channels and variance in ("fixed_small", "fixed_large"):
        overrides += ["objective=simple", f"objective.var_type={variance}"]
    else:
        raise _scheduler_unsupported(s, "variance_type")
    mean = PREDICTION_TYPES.get(s.get("prediction_type", "epsilon"))
    if mean is None:
        raise _scheduler_unsupported(s, "prediction_type")
    clip = str(bool(s.get("clip_sample", True))).lower()
    return overrides + [
        f"objective.mean_type={mean}",
        "sampler=ddpm",
        "sampler.steps=null",
        f"sampler.clip_denoised={clip}",
    ]


def _scheduler_unsupported(s: dict, key: str) -> ConversionError:
    return ConversionError(
        f"{key}={s.get(key)!r} in the scheduler config has no counterpart in this project's "
        f"diffusion (linear / squaredcos_cap_v2 betas, fixed_small / fixed_large / learned_range "
        f"variance, epsilon / sample / v_prediction)"
    )


# --- our model -> diffusers ------------------------------------------------------------------------------
def _cannot_export(option: str, why: str) -> ConversionError:
    return ConversionError(f"cannot export to diffusers: {option}: {why}")


def export_configs(cfg: DictConfig, net: UNet) -> tuple[dict, dict]:
    """(UNet2DModel kwargs, DDPMScheduler kwargs) of a diffusion checkpoint's run config and network; an
    option diffusers' UNet2DModel or DDPMPipeline cannot express is a ConversionError naming it."""
    m = cfg.model
    widths = _check_exportable(cfg, net)
    sizes = [net.image_size // 2**i for i in range(len(widths))]
    attn = [s in list(m.attention_resolutions) for s in sizes]
    head_dim = _attention_head_dim(m, widths, attn)
    diffusion = cfg.diffusion
    if diffusion.mean_type not in PREDICTION_TYPES.values():
        raise _cannot_export(
            f"objective.mean_type={diffusion.mean_type}", "DDPMScheduler predicts epsilon, the sample or v"
        )
    schedule = cfg.schedule.name
    if schedule not in ("linear", "cosine"):
        raise _cannot_export(f"schedule={schedule}", "DDPMScheduler has linear and squaredcos_cap_v2 betas")
    updown = bool(m.get("resblock_updown", False))
    down_plain, up_plain = (
        ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if updown else ("DownBlock2D", "UpBlock2D")
    )
    scale_shift = bool(m.get("scale_shift_norm", False))
    unet = {
        "sample_size": net.image_size,
        "in_channels": net.in_channels,
        "out_channels": net.out_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "freq_shift": int(m.get("timestep_freq_shift", 0)),
        "flip_sin_to_cos": False,
        "down_block_types": ["AttnDownBlock2D" if a else down_plain for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else up_plain for a in reversed(attn)],
        "block_out_channels": widths,
        "layers_per_block": int(m.num_res_blocks),
        "mid_block_scale_factor": 1,
        "downsample_padding": 0 if m.get("downsample_padding", "symmetric") == "same" else 1,
        "downsample_type": "resnet" if updown else "conv",
        "upsample_type": "resnet" if updown else "conv",
        "dropout": float(m.get("dropout", 0.0)),
        "act_fn": "silu",
        "attention_head_dim": head_dim,
        "norm_num_groups": 32,
        "attn_norm_num_groups": 32 if scale_shift else None,
        "norm_eps": float(m.get("norm_eps", 1e-6)),
        "resnet_time_scale_shift": "scale_shift" if scale_shift else "default",
        "add_attention": True,
    }
    return unet, _scheduler_kwargs(cfg)


def _check_exportable(cfg: DictConfig, net: UNet) -> list[int]:
    """The net is an unconditional diffusion U-Net whose embedding and widths UNet2DModel has; returns the
    widths of its levels."""
    m = cfg.model
    if not isinstance(net, UNet):
        raise _cannot_export(
            f"task={cfg.get('task', 'diffusion')}", "only the diffusion U-Net exports (DDPMPipeline has no classifier)"
        )
    if m.get("num_classes") is not None:
        raise _cannot_export(
            f"model.num_classes={m.num_classes}",
            "a class-conditional net; diffusers' DDPMPipeline "
            "samples without class labels (train with "
            "model.num_classes=null to export)",
        )
    if float(m.get("timestep_scale", 1.0)) != 1.0:
        raise _cannot_export(f"model.timestep_scale={m.timestep_scale}", "UNet2DModel embeds the timestep unscaled")
    if int(m.get("patch_size", 1)) != 1:
        raise _cannot_export(f"model.patch_size={m.patch_size}", "UNet2DModel has no patchified first layer")
    mult = [int(x) for x in m.channel_mult]
    widths = [m.base_channels * x for x in mult]
    if min(widths) < 32 or any(w % 32 for w in widths):
        raise _cannot_export(
            f"model.base_channels={m.base_channels} with channel_mult={mult}",
            "UNet2DModel uses 32 GroupNorm groups at every width (widths must be multiples of 32)",
        )
    return widths


def _attention_head_dim(m: DictConfig, widths: list[int], attn: list[bool]) -> int | None:
    """UNet2DModel's one attention_head_dim: num_head_channels, or the width per head of a head count."""
    head_dim = m.get("num_head_channels")
    if head_dim is None and m.get("num_heads", 1) != 1:
        attended = {w for w, a in zip(widths, attn) if a} | {widths[-1]}
        if len(attended) > 1:
            raise _cannot_export(
                f"model.num_heads={m.num_heads}",
                f"a head count over attention widths "
                f"{sorted(attended)}; UNet2DModel takes one attention_head_dim (use num_head_channels)",
            )
        head_dim = attended.pop() // m.num_heads
    return head_dim


def _scheduler_kwargs(cfg: DictConfig) -> dict:
    """DDPMScheduler kwargs of the run's schedule, objective and sampler clipping (checked exportable)."""
    diffusion = cfg.diffusion
    num_t = int(cfg.schedule.num_timesteps)
    scale = 1000.0 / num_t
    scheduler = {
        "num_train_timesteps": num_t,
        "variance_type": diffusion.var_type,
        "prediction_type": {m: p for p, m in PREDICTION_TYPES.items()}[diffusion.mean_type],
        "clip_sample": bool(cfg.get("sampler", {}).get("clip_denoised", True)),
    }
    if cfg.schedule.name == "linear":
        scheduler.update(beta_schedule="linear", beta_start=LINEAR_BETAS[0] * scale, beta_end=LINEAR_BETAS[1] * scale)
    else:
        scheduler.update(beta_schedule="squaredcos_cap_v2")
    return scheduler

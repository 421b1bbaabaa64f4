"""Released weights in other projects' formats, in and out of this project's checkpoints: one module per format,
one FORMATS entry each (convert.py format=<name>).

An import gives an ordinary checkpoint: the state_dict of the task's LightningModule (`net.*` and `ema.model.*`
both holding the file's weights) and a full train config composed from conf/ (hyper_parameters.run_config), so
sample.py, evaluate.py and src.checkpoints.load_module rebuild it as they rebuild train.py's checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig
from torch import nn

from . import diffusers, openai
from .base import ConversionError, Imported, build_checkpoint, run_config


@dataclass(frozen=True)
class Format:
    """A registry entry. import_model(src, preset) reads a released model; export(run_config, net, dst, overwrite)
    writes one of ours in the format (None: import only); needs_preset: the files do not describe themselves."""

    description: str
    import_model: Callable[[str, DictConfig | None], Imported]
    export: Callable[[DictConfig, nn.Module, str | os.PathLike, bool], Path] | None
    needs_preset: bool


FORMATS: dict[str, Format] = {
    "diffusers": Format(
        "diffusers' UNet2DModel folder or hub id (google/ddpm-cifar10-32, google/ddpm-ema-church-256, "
        "...), with its scheduler config",
        lambda src, preset: diffusers.import_model(src),
        diffusers.export,
        needs_preset=False,
    ),
    "openai": Format(
        "a .pt state dict of openai/improved-diffusion or openai/guided-diffusion, described by a preset "
        "(conf/preset/)",
        openai.import_model,
        None,
        needs_preset=True,
    ),
}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ConversionError(f"unknown format {name!r}; choose one of {', '.join(f'format={n}' for n in FORMATS)}")
    return FORMATS[name]


def import_checkpoint(
    format_name: str,
    src: str | os.PathLike,
    preset: DictConfig | None = None,
    data: str | None = None,
    data_overrides: Mapping | None = None,
    output_dir: str | os.PathLike = ".",
) -> tuple[dict, nn.Module]:
    """The checkpoint (as train.py writes it, in memory) of a released model in format `format_name`, and the
    LightningModule it holds (eval mode, CPU).

    preset: what an openai file is (conf/preset/<name>.yaml, see openai.load_preset); data: a conf/data group
    (default: from the model's image shape: cifar10 for 3x32x32, digits for 1x16x16, image_folder otherwise);
    data_overrides: values over that data config, e.g. {"root": "/path/to/images"}.
    """
    fmt = get_format(format_name)
    if preset is not None and not fmt.needs_preset:
        raise ConversionError(f"format={format_name} reads the model's own config; a preset applies to format=openai")
    imported = fmt.import_model(str(src), preset)
    cfg = run_config(imported, data_overrides, data, output_dir)
    name = f"preset {preset.name}" if preset is not None else f"the {format_name} model {src}"
    return build_checkpoint(imported, cfg, name)


__all__ = ["FORMATS", "ConversionError", "Format", "get_format", "import_checkpoint"]

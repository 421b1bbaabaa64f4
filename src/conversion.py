"""convert.py's work: import a released model to a checkpoint file, or export one of ours to a format's folder.
Nothing is written at dst unless the conversion succeeded and the written checkpoint loads back."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from src.checkpoints import module_from_checkpoint, read_checkpoint, run_config
from src.formats import get_format, import_checkpoint
from src.formats.base import ConversionError, written_atomically

log = logging.getLogger(__name__)
DIRECTIONS = ("import", "export")


def run(cfg: DictConfig) -> Path:
    """python convert.py format=... [direction=import|export] src=... dst=... [preset=...]; returns dst."""
    fmt = get_format(cfg.format)
    direction = cfg.get("direction", "import")
    if direction not in DIRECTIONS:
        raise ConversionError(f"unknown direction {direction!r}; use direction=import or direction=export")
    if direction == "export":
        return export(cfg, fmt)
    preset = cfg.get("preset")
    if fmt.needs_preset and preset is None:
        raise ConversionError(f"format={cfg.format} needs preset=<name>: {fmt.description}")
    dst = Path(str(cfg.dst)).expanduser()
    data = cfg.get("data")
    data_overrides = OmegaConf.to_container(data, resolve=True) if OmegaConf.is_config(data) else dict(data or {})
    ckpt, _ = import_checkpoint(
        cfg.format, str(cfg.src), preset, cfg.get("data_group"), data_overrides, output_dir=dst.resolve().parent
    )
    with written_atomically(dst, bool(cfg.get("overwrite", False))) as tmp:
        torch.save(ckpt, tmp)
        module_from_checkpoint(read_checkpoint(tmp), task=None, source=str(tmp))  # it loads as ours do
    log.info("wrote %s (%s model from %s); sample with: python sample.py ckpt_path=%s", dst, cfg.format, cfg.src, dst)
    return dst.resolve()


def export(cfg: DictConfig, fmt) -> Path:
    if fmt.export is None:
        raise ConversionError(f"format={cfg.format} is import only; export to format=diffusers")
    ckpt = read_checkpoint(str(cfg.src))
    module = module_from_checkpoint(ckpt, task=None, source=f"src={cfg.src}")
    net = module.ema.model if bool(cfg.get("use_ema", True)) else module.net
    dst = fmt.export(run_config(ckpt), net, str(cfg.dst), bool(cfg.get("overwrite", False)))
    log.info("wrote %s (%s); load it with diffusers.DDPMPipeline.from_pretrained(%r)", dst, cfg.format, str(dst))
    return dst

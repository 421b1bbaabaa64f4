"""diffusers' UNet2DModel (+ its DDPM scheduler config): google/ddpm-cifar10-32, google/ddpm-ema-church-256,
google/ddpm-celebahq-256, ... in as this project's checkpoints, and our U-Nets out as folders that
`diffusers.DDPMPipeline.from_pretrained` loads and samples from.

The layouts correspond layer for layer (src.models.UNet was built after DDPM's, as diffusers' is), so the
weights move with renames, reshapes (1x1 convs <-> linears), the split of our fused qkv convolution into
to_q / to_k / to_v, and, for configs with flip_sin_to_cos, a permutation of the timestep MLP's inputs.
diffusers_config.py translates the configs, diffusers_layout.py the tensors. The diffusers package is needed
only here, and is imported when a conversion runs.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from omegaconf import DictConfig

from src.models import UNet

from .base import ConversionError, Imported, convert, layout_mismatch, shapes, written_atomically
from .diffusers_config import export_configs, model_config, train_overrides
from .diffusers_layout import layout

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DOWNLOAD_DIR = "pretrained"  # where the offline message tells to put a hub model: pretrained/<owner>--<name>


# --- finding the model ------------------------------------------------------------------------------
def is_source(src: str | os.PathLike) -> bool:
    """A diffusers folder (config.json, or model_index.json with unet/), or a hub id that is not a local path."""
    path = Path(src).expanduser()
    if path.is_dir():
        return any((path / name).is_file() for name in ("config.json", "model_index.json", "unet/config.json"))
    return not path.exists() and bool(HUB_ID.match(str(src)))


def local_folder(src: str | os.PathLike) -> Path:
    """The folder of src: itself, or a hub id's snapshot (downloaded, or from the Hugging Face cache)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not HUB_ID.match(str(src)):
        raise ConversionError(
            f"src={src} is neither a diffusers folder (config.json, or model_index.json and "
            f"unet/) nor a Hugging Face hub id such as google/ddpm-cifar10-32"
        )
    from huggingface_hub import snapshot_download

    folder = Path(DOWNLOAD_DIR) / str(src).replace("/", "--")
    try:
        return Path(snapshot_download(str(src), allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except Exception as err:  # offline, unknown repo, gated, ...: huggingface_hub raises many types
        reason = " ".join(str(err).split()).split(". ")[0]
        raise ConversionError(
            f"cannot download {src} from the Hugging Face Hub ({type(err).__name__}: {reason}); on "
            f"a machine with internet run `hf download {src} --local-dir {folder}` (older "
            f"huggingface_hub: huggingface-cli download), copy that folder here and pass "
            f"src={folder}"
        ) from None


def _unet_dir(folder: Path) -> Path:
    unet = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    if not (unet / "config.json").is_file():
        raise ConversionError(f"{folder} has no config.json (nor unet/config.json): not a diffusers model folder")
    return unet


def _scheduler_config(folder: Path) -> dict:
    for path in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"):
        if path.is_file():
            return json.loads(path.read_text())
    raise ConversionError(
        f"{folder} has no scheduler/scheduler_config.json (nor scheduler_config.json), so its noise "
        f"schedule and variance are unknown; add the scheduler config of the model's training"
    )


def read(src: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict, Path]:
    """(UNet2DModel config with diffusers' defaults filled in, its state dict, scheduler config, folder)."""
    folder = local_folder(src)
    unet_dir = _unet_dir(folder)
    declared = json.loads((unet_dir / "config.json").read_text()).get("_class_name", "UNet2DModel")
    if declared != "UNet2DModel":
        raise ConversionError(
            f"{unet_dir}/config.json describes a {declared}; only UNet2DModel (pixel-space DDPM "
            f"U-Nets such as google/ddpm-cifar10-32) converts to this project's U-Net"
        )
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(unet_dir)
    return dict(unet.config), unet.state_dict(), _scheduler_config(folder), folder


def import_model(src: str | os.PathLike) -> Imported:
    """A diffusers folder or hub id as an Imported model (model config, overrides, the weights for our net)."""
    config, state, scheduler, folder = read(src)
    model, image_shape = model_config(config)
    overrides = train_overrides(scheduler, image_shape[0], int(config["out_channels"]))
    flip = bool(config.get("flip_sin_to_cos", True))

    def weights(net: UNet) -> dict[str, torch.Tensor]:
        entries = layout(net, flip_sin_to_cos=flip)
        problem = layout_mismatch(shapes(convert(entries, net.state_dict(), "theirs")), state)
        if problem:
            raise ConversionError(f"the weights in {folder} do not match its config.json ({problem})")
        return convert(entries, state, "ours")

    return Imported(
        weights=weights,
        model=model,
        overrides=overrides,
        image_shape=image_shape,
        num_classes=model.get("num_classes"),
        provenance={"format": "diffusers", "source": str(src), "folder": str(folder)},
    )


# --- our model -> diffusers ------------------------------------------------------------------------------
def export(cfg: DictConfig, net: UNet, dst: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `net` (with the run config it was trained with) as a DDPMPipeline folder at dst."""
    unet_config, scheduler_config = export_configs(cfg, net)
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(**unet_config)
    state = convert(layout(net), net.state_dict(), "theirs")
    problem = layout_mismatch(shapes(unet.state_dict()), state)
    if problem:
        raise ConversionError(f"the exported weights do not fit the UNet2DModel built from the run config ({problem})")
    unet.load_state_dict(state, strict=True)
    pipeline = DDPMPipeline(unet=unet.eval(), scheduler=DDPMScheduler(**scheduler_config))
    with written_atomically(dst, overwrite) as tmp:
        pipeline.save_pretrained(tmp)
    return Path(dst).expanduser().resolve()

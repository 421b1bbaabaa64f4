"""What evaluate.py and sample.py share: the sampler options of a command (one merge of the run's sampler
config and the command line, checked before the model is built), and the loaded checkpoint (network with
the chosen weights, device, image shape, the merged data config and its data module, each built once)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from torch import nn

from src.builders import build_diffusion
from src.checkpoints import module_from_checkpoint, read_checkpoint, run_config
from src.diffusion import GaussianDiffusion, SamplerOptions, visited_timesteps
from src.errors import ConfigError
from src.lit import DiffusionModule

from .compile import compile_for_sampling, compile_mode
from .ema_rebuild import Reconstruction, checked_stds, load_into, reconstruct, snapshots_folder

log = logging.getLogger(__name__)

# Command-line keys that override single sampler options of the `sampler` group.
SAMPLER_OVERRIDES = ("steps", "eta", "spacing", "order", "s_churn", "threshold", "threshold_percentile")


def pick_device(name: str) -> torch.device:
    """`device=auto` is the GPU when there is one; an unavailable CUDA device is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use device=auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA GPU is available here; use device=cpu or device=auto")
    return device


def sampler_options(trained: DictConfig, cfg: DictConfig) -> SamplerOptions:
    """The run's sampler config, then the `sampler=` group chosen on the command line, then steps / eta /
    spacing on top; a bad value is a one-line ConfigError."""
    values = OmegaConf.to_container(trained.get("sampler") or {}, resolve=True)
    if cfg.get("sampler") is not None:
        values.update(OmegaConf.to_container(cfg.sampler, resolve=True))
    for key in SAMPLER_OVERRIDES:
        value = cfg.get(key)
        if value is not None:
            values[key] = OmegaConf.to_container(value) if OmegaConf.is_list(value) else value
    if isinstance(values.get("spacing"), list):
        # spacing=[10,15,20] (Hydra's quoting of improved-diffusion's "10,15,20") means what that string means
        # there: section counts, never the literal timesteps {10, 15, 20} (a run from noise at t=20).
        values["spacing"] = ",".join(str(v) for v in values["spacing"])
    try:
        return SamplerOptions.from_mapping(values)
    except ValueError as err:
        raise ConfigError(str(err)) from None


@dataclass
class LoadedCheckpoint:
    """A diffusion checkpoint loaded for sampling: `net` is the EMA network (or the raw one) on `device`."""

    path: Path
    global_step: int | None
    trained: DictConfig  # the run config stored in the checkpoint
    module: DiffusionModule
    use_ema: bool
    device: torch.device
    data_overrides: DictConfig
    posthoc: Reconstruction | None = None  # the post-hoc EMA in `module.ema.model`, if one was asked for
    _datamodules: dict = field(default_factory=dict, repr=False)

    def use_posthoc_ema(self, std: float) -> Reconstruction:
        """Put the EMA of relative width `std` at this checkpoint's step, rebuilt from the run's post-hoc EMA
        snapshots (<run>/checkpoints/phema), into `module.ema.model` (the weights sampled with use_ema)."""
        if not self.use_ema:
            raise ConfigError("ema_std picks EMA weights but use_ema=false; drop one of them")
        self.posthoc = reconstruct(snapshots_folder(self.path), std, int(self.global_step or 0))
        load_into(self.module.ema.model, self.posthoc)
        return self.posthoc

    @property
    def net(self) -> nn.Module:
        return self.module.ema.model if self.use_ema else self.module.net

    @property
    def diffusion(self) -> GaussianDiffusion:
        return self.module.diffusion

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.net.image_shape

    @property
    def num_classes(self) -> int | None:
        return getattr(self.net, "num_classes", None)

    @property
    def guidance_scale(self) -> float | None:
        """The run's own classifier-free guidance weight (train config `guidance_scale`; None: not set)."""
        return self.trained.get("guidance_scale")

    @property
    def null_label(self) -> bool:
        """Whether the net has the null label that classifier-free guidance samples the unconditional model with."""
        return bool(getattr(self.net, "null_label", True))

    @property
    def data_config(self) -> DictConfig:
        """The checkpoint's data config with the command line's `data` overrides on top."""
        return OmegaConf.merge(self.trained.data, self.data_overrides)

    def datamodule(self, stage: str, **changes):
        """The data module of data_config (+ changes), set up for `stage`; built once per stage and changes."""
        key = (stage, tuple(sorted(changes.items())))
        if key not in self._datamodules:
            data_cfg = self.data_config
            for name, value in changes.items():
                data_cfg[name] = value
            datamodule = instantiate(data_cfg)
            datamodule.setup(stage)
            self._datamodules[key] = datamodule
        return self._datamodules[key]


def load_checkpoint(cfg: DictConfig, until: int | None = None) -> tuple[LoadedCheckpoint, SamplerOptions]:
    """Read cfg.ckpt_path, check the sampler options against its schedule (a reverse run from timestep
    `until`, default from noise), then build the module on cfg.device with the weights of cfg.use_ema
    (default EMA; with cfg.ema_std the post-hoc EMA of that width, the first of a list) and compile its network
    when cfg.compile asks."""
    try:
        ckpt_path = Path(str(cfg.ckpt_path)).expanduser()
    except MissingMandatoryValue:
        raise ConfigError("ckpt_path is required: give ckpt_path=PATH/TO/last.ckpt") from None
    compile_mode(cfg.get("compile"))
    stds = checked_stds(cfg.get("ema_std"))
    device = pick_device(cfg.device)
    ckpt = read_checkpoint(ckpt_path)
    trained = run_config(ckpt)
    options = sampler_options(trained, cfg)
    try:  # the schedule alone (cheap) says whether the steps fit, before the network is built
        visited_timesteps(build_diffusion(trained), options, until)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    module = module_from_checkpoint(ckpt, "diffusion", source=str(ckpt_path)).to(device)
    loaded = LoadedCheckpoint(
        path=ckpt_path.resolve(),
        global_step=ckpt.get("global_step"),
        trained=trained,
        module=module,
        use_ema=bool(cfg.get("use_ema", True)),
        device=device,
        data_overrides=cfg.get("data") or OmegaConf.create({}),
    )
    del ckpt
    if stds is not None:  # a sweep (evaluate.py) sets each in turn; the first one now
        loaded.use_posthoc_ema(stds[0])
    compile_for_sampling(loaded.net, cfg.get("compile"))
    return loaded, options

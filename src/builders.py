"""Config -> objects: the diffusion, the task's LightningModule (one registry of tasks), callbacks and
loggers. train.py and the checkpoint reader both build through here, so a checkpoint is rebuilt exactly
as it was trained. Errors raised while building name the config entry to change."""

import contextlib
import copy
from collections.abc import Callable, Iterator

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from src.data import DatasetNotFoundError
from src.diffusion import GaussianDiffusion
from src.errors import ConfigError, RunError
from src.lit import ClassifierModule, DiffusionModule


def sizes_at_downsample(image_size: int, *factors: int) -> list[int]:
    """`${sizes_at_downsample:${data.image_size},2}` in a model config: the spatial sizes image_size / factor, so
    attention placed by downsampling factor (as improved-diffusion's scripts convert attention_resolutions)
    fits every image size. Each factor must divide image_size."""
    for factor in factors:
        if int(factor) < 1 or int(image_size) % int(factor):
            raise ConfigError(
                f"attention at downsampling factor {factor} does not fit image_size={image_size}; "
                f"use an image_size divisible by {factor} or set model.attention_resolutions=[...]"
            )
    return [int(image_size) // int(factor) for factor in factors]


OmegaConf.register_new_resolver("sizes_at_downsample", sizes_at_downsample, replace=True)


@contextlib.contextmanager
def config_errors(key: str) -> Iterator[None]:
    """Turn a ValueError/TypeError raised while building config entry `key` (directly or inside
    Hydra's InstantiationException) into a one-line ConfigError that names the entry."""
    try:
        yield
    except (InstantiationException, ValueError, TypeError) as err:
        root = _root_cause(err)
        if isinstance(root, (RunError, DatasetNotFoundError)):
            raise root from err
        if not isinstance(root, (ValueError, TypeError)):
            raise
        raise ConfigError(f"{key}: {_one_line(root)}") from err


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if isinstance(err, ValueError) else f"{type(err).__name__}: {text}"


def build_diffusion(cfg: DictConfig) -> GaussianDiffusion:
    """The GaussianDiffusion of the config's schedule and objective."""
    with config_errors("schedule"):
        betas = instantiate(cfg.schedule)
    zero_terminal_snr = bool(cfg.schedule.get("zero_terminal_snr", False))
    if zero_terminal_snr and cfg.objective.get("mean_type") in ("eps", "mu"):
        # abar_T = 0: x_0 = (x_t - sigma_T eps) / alpha_T divides by zero (SNR 0), the loss is NaN at t = T
        raise ConfigError(
            f"schedule.zero_terminal_snr=true makes alpha_bar_T = 0, where "
            f"objective.mean_type={cfg.objective.get('mean_type')} is undefined; use objective=v_simple "
            f"(objective.mean_type=v) or objective.mean_type=x0"
        )
    inside = (betas > 0) & (betas < 1)
    if zero_terminal_snr:
        inside[-1] = betas[-1] == 1  # the rescaled schedule's last beta is exactly 1
    if not bool(inside.all()):
        # beta > 1 is rejected by GaussianDiffusion without naming the setting; beta = 1 passes there but
        # zeroes alpha_bar, so predicting x0 divides by zero and the loss is NaN from the first step.
        raise ConfigError(
            f"schedule={cfg.schedule.get('name')} with schedule.num_timesteps={len(betas)} gives betas "
            f"outside (0, 1) (largest {betas.max().item():.4g}); use a larger schedule.num_timesteps "
            f"(the linear schedule scales its betas by 1000/T) or schedule=cosine"
        )
    if cfg.objective.get("loss_type") == "hybrid" and cfg.objective.get("var_type") != "learned_range":
        # L_hybrid's vb term trains only the variance (the mean is stop-gradiented in it): with a fixed variance
        # it is a constant, and the run would be L_simple while its config says L_hybrid.
        raise ConfigError(
            f"objective=hybrid needs objective.var_type=learned_range (with "
            f"{cfg.objective.get('var_type')} its vb term has no gradient); use objective=simple for "
            f"a fixed variance"
        )
    with config_errors("diffusion (objective)"):
        return instantiate(cfg.diffusion)


def with_synthetic_data(cfg: DictConfig) -> DictConfig:
    """A copy of cfg whose data is cfg.synthetic_data (debug=fast) at the image size and channels of cfg.data, so any
    recipe runs without its dataset's files and the run config records the data it trained on; cfg itself when it
    has no synthetic_data."""
    synthetic = cfg.get("synthetic_data")
    if synthetic is None:
        return cfg
    recipe = cfg.data
    # image_folder sets its channels; the other datasets have theirs as a class attribute
    channels = recipe.get("channels") or getattr(get_class(recipe._target_), "channels", None)
    if channels is None:
        raise ConfigError(f"synthetic_data: the channels of data ({recipe._target_}) are unknown; set data.channels")
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.data = OmegaConf.merge(synthetic, {"image_size": recipe.image_size, "channels": channels})
        del cfg.synthetic_data
    return cfg


def check_num_classes(cfg: DictConfig, data_num_classes: int | None) -> None:
    """A class-conditional model needs an embedding for every label of the data."""
    num_classes = cfg.model.get("num_classes")
    if num_classes is not None and data_num_classes is not None and num_classes < data_num_classes:
        raise ConfigError(
            f"model.num_classes={num_classes} but the data has {data_num_classes} classes (labels 0.."
            f"{data_num_classes - 1}); set model.num_classes={data_num_classes}"
        )


def check_guidance_scale(cfg: DictConfig) -> None:
    """The run's guidance_scale (its grids, and evaluate.py's default) needs a class-conditional net that also
    learns the unconditional model."""
    w = cfg.get("guidance_scale")
    if w is None:
        return
    if isinstance(w, bool) or not isinstance(w, (int, float)):
        raise ConfigError(f"guidance_scale must be a number or null, got {w!r}")
    if w != 0 and cfg.model.get("num_classes") is None:
        raise ConfigError(
            f"guidance_scale={w} needs a class-conditional net: set model.num_classes, or guidance_scale=null"
        )
    if w != 0 and not cfg.get("module", {}).get("label_dropout"):
        raise ConfigError(
            f"guidance_scale={w} needs the unconditional model, which module.label_dropout=0 never "
            f"trains: set module.label_dropout=0.1, or guidance_scale=0"
        )


def build_module(
    cfg: DictConfig, channels: int, image_size: int, data_num_classes: int | None = None
) -> DiffusionModule:
    """Network + diffusion + timestep sampler -> DiffusionModule. The network's shape comes from the
    data (channels, image size) and the objective (2C outputs when the variance is learned); a
    class-conditional net (model.num_classes) must cover the data's labels."""
    diffusion = build_diffusion(cfg)
    check_num_classes(cfg, data_num_classes)
    check_guidance_scale(cfg)
    out_channels = channels * (2 if diffusion.learns_variance else 1)
    derived = {"in_channels": channels, "out_channels": out_channels, "image_size": image_size}
    _check_derived_model_shape(cfg, derived, diffusion.var_type)
    # The size and channels come from the data, so the message says where to change them.
    with config_errors(
        f"model (built for the data's {image_size}x{image_size} images with {channels} channel(s); "
        f"data.image_size sets the size)"
    ):
        net = instantiate(cfg.model, **derived)
    with config_errors("objective.timestep_sampler"):
        timestep_sampler = instantiate(cfg.objective.timestep_sampler)
    # Partial first: the run config passed afterwards must not be instantiated itself.
    with config_errors("module"):
        make_module = instantiate(cfg.module, _partial_=True)
        return make_module(
            net=net,
            diffusion=diffusion,
            timestep_sampler=timestep_sampler,
            run_config=OmegaConf.to_container(cfg, resolve=True),
        )


def _check_derived_model_shape(cfg: DictConfig, derived: dict, var_type: str) -> None:
    """The model's in/out channels and image size are derived from the data and the objective; a value
    set in the model config would be overridden silently, so one that disagrees is an error (e.g. C
    output channels with learned variance, which needs 2C)."""
    for key, value in derived.items():
        given = cfg.model.get(key)
        if given is not None and given != value:
            why = {
                "in_channels": f"the data has {derived['in_channels']} channels",
                "out_channels": f"objective var_type={var_type} with {derived['in_channels']}-channel images "
                f"needs {value} ({'2C: mean and variance' if value != derived['in_channels'] else 'C'})",
                "image_size": f"data.image_size is {value}",
            }[key]
            raise ConfigError(
                f"model.{key}={given} but {why}; remove model.{key} from the model config "
                f"(it is derived from the data and the objective)"
            )


def instantiate_group(group: DictConfig | None, name: str = "callbacks") -> list:
    """Instantiate every entry of a callbacks/logger group; entries set to null are switched off."""
    if not group:
        return []
    objects = []
    for key, entry in group.items():
        if entry is None:
            continue
        if "_target_" not in entry:
            raise ConfigError(
                f"config entry {name}.{key} has no _target_; set it or remove the entry with ~{name}.{key}"
            )
        with config_errors(f"{name}.{key}"):
            objects.append(instantiate(entry))
    return objects


def build_diffusion_module(cfg: DictConfig, datamodule) -> DiffusionModule:
    """task=diffusion: the denoiser, shaped by the data."""
    return build_module(cfg, datamodule.channels, datamodule.image_size, datamodule.num_classes)


def build_classifier_module(cfg: DictConfig, datamodule) -> ClassifierModule:
    """task=classifier: the noisy-image classifier that classifier guidance follows, with the diffusion whose
    forward process noises its images. It is the encoder half of the model config's U-Net; its classes are
    model.num_classes, or the data's when that is null."""
    diffusion = build_diffusion(cfg)
    check_num_classes(cfg, datamodule.num_classes)
    num_classes = cfg.model.get("num_classes") or datamodule.num_classes
    derived = {"in_channels": datamodule.channels, "image_size": datamodule.image_size, "num_classes": num_classes}
    with config_errors(
        f"model (the classifier, built for the data's {datamodule.image_size}x{datamodule.image_size} "
        f"images with {datamodule.channels} channel(s) and {num_classes} classes)"
    ):
        net = instantiate(cfg.model, **derived)
    with config_errors("module"):
        make_module = instantiate(cfg.module, _partial_=True)
        return make_module(net=net, diffusion=diffusion, run_config=OmegaConf.to_container(cfg, resolve=True))


# task name -> builder(cfg, datamodule) of its LightningModule (train.py task=...)
TASKS: dict[str, Callable[[DictConfig, L.LightningDataModule], L.LightningModule]] = {
    "diffusion": build_diffusion_module,
    "classifier": build_classifier_module,
}


def build_task_module(cfg: DictConfig, datamodule) -> L.LightningModule:
    """The LightningModule of the config's task (default: diffusion)."""
    task = cfg.get("task", "diffusion")
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(f'task={name}' for name in TASKS)}")
    return TASKS[task](cfg, datamodule)

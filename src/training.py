"""Builds the run from the config and trains it. Entry point: `run(cfg)` (train.py calls it)."""
import contextlib
import csv
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import CheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from src.config_diff import UNSET, differences
from src.data import DatasetNotFoundError
from src.diffusion import GaussianDiffusion
from src.errors import CheckpointError, ConfigError, RunError
from src.lit import AtomicCheckpointIO, DiffusionModule

log = logging.getLogger(__name__)

# Config entries a checkpoint must share with the run that resumes it: they fix the shapes of the
# weights and what the network has learnt to predict.
RESUME_MUST_MATCH = ("schedule", "objective", "model", "data.image_size")


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
    if not bool(((betas > 0) & (betas < 1)).all()):
        # beta > 1 is rejected by GaussianDiffusion without naming the setting; beta = 1 passes there but
        # zeroes alpha_bar, so predicting x0 divides by zero and the loss is NaN from the first step.
        raise ConfigError(f"schedule={cfg.schedule.get('name')} with schedule.num_timesteps={len(betas)} gives betas "
                          f"outside (0, 1) (largest {betas.max().item():.4g}); use a larger schedule.num_timesteps "
                          f"(the linear schedule scales its betas by 1000/T) or schedule=cosine")
    with config_errors("diffusion (objective)"):
        return instantiate(cfg.diffusion)


def check_num_classes(cfg: DictConfig, data_num_classes: int | None) -> None:
    """A class-conditional model needs an embedding for every label of the data."""
    num_classes = cfg.model.get("num_classes")
    if num_classes is not None and data_num_classes is not None and num_classes < data_num_classes:
        raise ConfigError(f"model.num_classes={num_classes} but the data has {data_num_classes} classes (labels 0.."
                          f"{data_num_classes - 1}); set model.num_classes={data_num_classes}")


def build_module(cfg: DictConfig, channels: int, image_size: int,
                 data_num_classes: int | None = None) -> DiffusionModule:
    """Network + diffusion + timestep sampler -> DiffusionModule. The network's shape comes from the
    data (channels, image size) and the objective (2C outputs when the variance is learned); a
    class-conditional net (model.num_classes) must cover the data's labels."""
    diffusion = build_diffusion(cfg)
    check_num_classes(cfg, data_num_classes)
    out_channels = channels * (2 if diffusion.learns_variance else 1)
    derived = {"in_channels": channels, "out_channels": out_channels, "image_size": image_size}
    _check_derived_model_shape(cfg, derived, diffusion.var_type)
    # The size and channels come from the data, so the message says where to change them.
    with config_errors(f"model (built for the data's {image_size}x{image_size} images with {channels} channel(s); "
                       f"data.image_size sets the size)"):
        net = instantiate(cfg.model, **derived)
    with config_errors("objective.timestep_sampler"):
        timestep_sampler = instantiate(cfg.objective.timestep_sampler)
    # Partial first: the run config passed afterwards must not be instantiated itself.
    with config_errors("module"):
        make_module = instantiate(cfg.module, _partial_=True)
        return make_module(net=net, diffusion=diffusion, timestep_sampler=timestep_sampler,
                           run_config=OmegaConf.to_container(cfg, resolve=True))


def build_task_module(cfg: DictConfig, datamodule) -> L.LightningModule:
    """The LightningModule of the config's task: the denoiser or the noisy-image classifier."""
    task = cfg.get("task", "diffusion")
    if task == "diffusion":
        return build_module(cfg, datamodule.channels, datamodule.image_size, datamodule.num_classes)
    if task == "classifier":
        from src.classifier_training import build_classifier_module  # it builds on this module's helpers

        return build_classifier_module(cfg, datamodule)
    raise ConfigError(f"unknown task {task!r}; use task=diffusion or task=classifier")


def _check_derived_model_shape(cfg: DictConfig, derived: dict, var_type: str) -> None:
    """The model's in/out channels and image size are derived from the data and the objective; a value
    set in the model config would be overridden silently, so one that disagrees is an error (e.g. C
    output channels with learned variance, which needs 2C)."""
    for key, value in derived.items():
        given = cfg.model.get(key)
        if given is not None and given != value:
            why = {"in_channels": f"the data has {derived['in_channels']} channels",
                   "out_channels": f"objective var_type={var_type} with {derived['in_channels']}-channel images "
                                   f"needs {value} ({'2C: mean and variance' if value != derived['in_channels'] else 'C'})",
                   "image_size": f"data.image_size is {value}"}[key]
            raise ConfigError(f"model.{key}={given} but {why}; remove model.{key} from the model config "
                              f"(it is derived from the data and the objective)")


def instantiate_group(group: DictConfig | None, name: str = "callbacks") -> list:
    """Instantiate every entry of a callbacks/logger group; entries set to null are switched off."""
    if not group:
        return []
    objects = []
    for key, entry in group.items():
        if entry is None:
            continue
        if "_target_" not in entry:
            raise ConfigError(f"config entry {name}.{key} has no _target_; set it or remove the entry with ~{name}.{key}")
        with config_errors(f"{name}.{key}"):
            objects.append(instantiate(entry))
    return objects


# --- resume ------------------------------------------------------------------------------------
def last_checkpoint_path(cfg: DictConfig) -> Path:
    """Where this run folder keeps its latest checkpoint: <paths.output_dir>/checkpoints/last.ckpt."""
    return Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"


def resolve_ckpt_path(cfg: DictConfig) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run.

    `ckpt_path=last` is this run folder's last.ckpt and must exist; `resume=true` (with no ckpt_path)
    uses it when it exists and otherwise warns that the run starts at step 0; any other ckpt_path is
    a file that must exist. A resume never silently becomes a fresh run.
    """
    ckpt_path, resume = cfg.get("ckpt_path"), bool(cfg.get("resume", False))
    last = last_checkpoint_path(cfg)
    if ckpt_path is None and not resume:
        return None
    if ckpt_path is None or str(ckpt_path) == "last":
        if last.is_file():
            return last
        if ckpt_path is None:
            log.warning("resume=true but there is no checkpoint at %s: STARTING A NEW RUN FROM STEP 0", last)
            return None
        raise CheckpointError(
            f"ckpt_path=last but {last} does not exist; to resume a run pass its folder: "
            f"hydra.run.dir=<run folder> ckpt_path=last (or ckpt_path=<file.ckpt>), or use resume=true to start "
            f"at step 0 when there is nothing to resume")
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={ckpt_path}: no such checkpoint file; give the path of a .ckpt file "
                              f"(e.g. <run folder>/checkpoints/last.ckpt) or ckpt_path=last with hydra.run.dir=<run folder>")
    return path


def read_checkpoint_header(path: Path) -> dict:
    """The checkpoint's metadata (run config, step) without reading its tensors into memory (mmap)."""
    try:
        # A train.py checkpoint holds the hparams (partials) next to tensors: not weights-only.
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # truncated zip, not a checkpoint, ...: many exception types
        siblings = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path)
        other = f"; other checkpoints in {path.parent}: {', '.join(siblings)}" if siblings else ""
        reason = " ".join(str(err).split()).split(". ")[0]  # torch appends paragraphs of advice
        raise CheckpointError(f"cannot read checkpoint {path} ({type(err).__name__}: {reason}); it is "
                              f"incomplete or not a checkpoint: resume from another one with ckpt_path=<file>{other}") from err
    run_config = ckpt.get("hyper_parameters", {}).get("run_config") if isinstance(ckpt, dict) else None
    if not isinstance(run_config, dict):
        raise CheckpointError(f"{path} has no run config (hyper_parameters.run_config): it was not written by "
                              f"train.py and cannot be resumed")
    return {"run_config": run_config, "global_step": int(ckpt.get("global_step", 0))}


def check_resume_compatible(run_config: dict, cfg: DictConfig, path: Path) -> None:
    """Raise a ConfigError listing every RESUME_MUST_MATCH value on which the checkpoint and cfg differ."""
    # An interpolated value (objective.timestep_sampler.num_timesteps: ${schedule.num_timesteps})
    # differs because its source does, which is listed itself.
    diffs = differences(run_config, OmegaConf.to_container(cfg, resolve=True), RESUME_MUST_MATCH,
                        skip=lambda name: _is_interpolation(cfg, name))
    if diffs:
        listed = "; ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, a, b in diffs)
        fix = " ".join(f"{k}={_override(a)}" for k, a, _ in diffs if a != UNSET)
        raise ConfigError(f"checkpoint {path} was trained with another config ({listed}); resume with the "
                          f"checkpoint's values ({fix}) or start a new run without ckpt_path/resume")


def _is_interpolation(cfg: DictConfig, dotted: str) -> bool:
    parent, _, leaf = dotted.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node and OmegaConf.is_interpolation(node, leaf)


def _override(value) -> str:
    return "null" if value is None else str(value).replace(" ", "")


def _keep_csv_history(loggers: list, resume_step: int) -> None:
    """Lightning's CSVLogger deletes an existing metrics.csv when it starts; on resume keep the rows
    logged up to the checkpoint's step (rows are logged with step = optimizer steps done before the
    update, so step < resume_step; later rows are logged again by the resumed run), so the file reads as
    one uninterrupted run."""
    if rank_zero_only.rank != 0:
        return
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            # Values stay the strings they were written as, so the kept rows are reproduced verbatim.
            rows = [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
        kept = [row for row in rows if "step" in row and int(float(row["step"])) < resume_step]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Experiment logs directory")  # we keep them
            writer = logger.experiment  # created now: this is where the old file is deleted
        writer.metrics[:0] = kept  # written with the resumed run's first rows


# --- training ------------------------------------------------------------------------------------
def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Train from a composed config. Returns (metrics, objects) so tests can inspect both."""
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg)
    header = None
    if ckpt_path is not None:
        header = read_checkpoint_header(ckpt_path)
        check_resume_compatible(header["run_config"], cfg, ckpt_path)
        log.info("resuming from %s (step %d)", ckpt_path, header["global_step"])
    with config_errors("data"):
        datamodule = instantiate(cfg.data)
    module = build_task_module(cfg, datamodule)
    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks")
    loggers = instantiate_group(cfg.get("logger"), "logger")
    if header is not None:
        _keep_csv_history(loggers, header["global_step"])
    with config_errors("trainer"):
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                         plugins=_plugins(cfg))
    try:
        # The checkpoint is this project's own (checked above), and it holds the hparams: not weights-only.
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
    finally:
        _finish_wandb(loggers)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule}


def _finish_wandb(loggers: list) -> None:
    """Close the W&B run: the jobs of a Hydra multirun share one process, and without this each
    job after the first would log into the first job's run."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()


def _plugins(cfg: DictConfig) -> list:
    """The trainer's plugins from the config plus atomic checkpoint writing (unless a CheckpointIO is given)."""
    plugins = list(instantiate(cfg.trainer.get("plugins")) or [])
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def run(cfg: DictConfig) -> float | None:
    metrics, objects = train(cfg)
    trainer = objects["trainer"]
    if trainer.is_global_zero:
        log.info("finished at step %d; outputs in %s", trainer.global_step, Path(cfg.paths.output_dir).resolve())
        for key in sorted(metrics):
            log.info("  %s = %.5g", key, metrics[key])
    return metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None

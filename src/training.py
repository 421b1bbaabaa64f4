"""Training: resolve what to resume from, build the run through src.builders and fit it. Entry point:
`run(cfg)` (train.py calls it); `train(cfg)` returns the objects too, for tests."""

import csv
import logging
import re
import warnings
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import CheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from src.builders import build_task_module, config_errors, instantiate_group, with_synthetic_data
from src.checkpoints import read_checkpoint, upgraded
from src.config_diff import UNSET, differences
from src.errors import CheckpointError, ConfigError
from src.lit import AtomicCheckpointIO
from src.loggers import build_loggers, finish_wandb

log = logging.getLogger(__name__)

# Config entries a checkpoint must share with the run that resumes it: they fix the shapes of the
# weights and what the network has learnt to predict.
RESUME_MUST_MATCH = ("schedule", "objective", "model", "data.image_size")


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
        if last.is_file() and not cfg.get("overwrite", False):
            # A fresh run here would replace the trained checkpoint with step-0 weights at its first save.
            raise CheckpointError(
                f"{last} already holds a trained run; resume it with ckpt_path=last, choose "
                f"another folder (hydra.run.dir=...), or replace it with overwrite=true"
            )
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
            f"at step 0 when there is nothing to resume"
        )
    path = Path(str(ckpt_path)).expanduser()
    if path.is_dir():
        raise CheckpointError(
            f"ckpt_path={ckpt_path} is a folder; give a .ckpt file such as "
            f"{path}/checkpoints/last.ckpt, or ckpt_path=last with hydra.run.dir={path}"
        )
    if not path.is_file():
        raise CheckpointError(
            f"ckpt_path={ckpt_path}: no such checkpoint file; give the path of a .ckpt file "
            f"(e.g. <run folder>/checkpoints/last.ckpt) or ckpt_path=last with hydra.run.dir=<run folder>"
        )
    return path


def check_resume_compatible(run_config: dict, cfg: DictConfig, path: Path) -> None:
    """Raise a ConfigError listing every RESUME_MUST_MATCH value on which the checkpoint and cfg differ."""
    # An interpolated value (objective.timestep_sampler.num_timesteps: ${schedule.num_timesteps})
    # differs because its source does, which is listed itself.
    diffs = differences(
        run_config,
        OmegaConf.to_container(cfg, resolve=True),
        RESUME_MUST_MATCH,
        skip=lambda name: _is_interpolation(cfg, name),
    )
    if diffs:
        listed = "; ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, a, b in diffs)
        fix = " ".join(f"{k}={_override(a)}" for k, a, _ in diffs if a != UNSET)
        raise ConfigError(
            f"checkpoint {path} was trained with another config ({listed}); resume with the "
            f"checkpoint's values ({fix}) or start a new run without ckpt_path/resume"
        )


def _is_interpolation(cfg: DictConfig, dotted: str) -> bool:
    """Whether cfg's value at `dotted` is a plain reference to another entry (`${schedule.num_timesteps}`). A
    resolver's result (`${sizes_at_downsample:...}`) is compared itself: its formula may have changed."""
    parent, _, leaf = dotted.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not (isinstance(node, DictConfig) and leaf in node and OmegaConf.is_interpolation(node, leaf)):
        return False
    raw = OmegaConf.to_container(node, resolve=False)[leaf]
    return isinstance(raw, str) and re.fullmatch(r"\$\{[\w.]+\}", raw) is not None


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
def check_max_steps(cfg: DictConfig) -> None:
    """trainer.max_steps: a positive number of optimizer steps, or -1 to stop by trainer.max_epochs."""
    steps = cfg.trainer.get("max_steps", -1)
    if isinstance(steps, bool) or not isinstance(steps, int) or not (steps >= 1 or steps == -1):
        raise ConfigError(
            f"trainer.max_steps must be a positive integer (or -1 to stop by trainer.max_epochs), got {steps!r}"
        )


def check_steps_left(cfg: DictConfig, ckpt_path: Path, resume_step: int) -> None:
    """A resumed run must have optimizer steps left to train (otherwise Lightning trains nothing and exits 0)."""
    steps = cfg.trainer.max_steps
    if steps != -1 and steps <= resume_step:
        raise ConfigError(
            f"{ckpt_path} is already at step {resume_step} and trainer.max_steps={steps}: nothing "
            f"to train; continue it with trainer.max_steps greater than {resume_step}"
        )


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Train from a composed config. Returns (metrics, objects) so tests can inspect both."""
    cfg = with_synthetic_data(cfg)
    check_max_steps(cfg)
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg)
    resume_step = None
    if ckpt_path is not None:
        ckpt = read_checkpoint(ckpt_path)  # memory-mapped: only the config and the step are read here
        check_resume_compatible(upgraded(ckpt["hyper_parameters"]["run_config"]), cfg, ckpt_path)
        resume_step = int(ckpt.get("global_step", 0))
        del ckpt
        check_steps_left(cfg, ckpt_path, resume_step)
        log.info("resuming from %s (step %d)", ckpt_path, resume_step)
    with config_errors("data"):
        datamodule = instantiate(cfg.data)
    module = build_task_module(cfg, datamodule)
    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks")
    loggers = build_loggers(cfg.get("logger"))
    _quiet_lightning_adverts()
    if resume_step is not None:
        _keep_csv_history(loggers, resume_step)
    with config_errors("trainer"):
        trainer: L.Trainer = instantiate(
            cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=_plugins(cfg)
        )
    try:
        with warnings.catch_warnings():
            _ignore_expected_warnings(resuming=ckpt_path is not None or bool(cfg.get("overwrite", False)))
            # The checkpoint is this project's own (checked above), and it holds the hparams: not weights-only.
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
    finally:
        finish_wandb(loggers)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule}


def _ignore_expected_warnings(resuming: bool) -> None:
    """Silence, by message and origin, the warnings of a training run that say nothing a user can act on."""
    # Lightning's own pytree helper still builds torch's deprecated LeafSpec for every DataLoader it wraps
    # (Lightning-AI/pytorch-lightning#21326); nothing in this project's code or config causes it.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    if resuming:
        # A resumed (or deliberately overwritten) run writes into its own checkpoints folder: not a surprise.
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


class _DropAdverts(logging.Filter):
    """Lightning's "💡 Tip: For seamless cloud logging / uploads ..." lines: adverts for its cloud services."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip: For seamless cloud")


def _quiet_lightning_adverts() -> None:
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdverts) for f in logger.filters):
        logger.addFilter(_DropAdverts())


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

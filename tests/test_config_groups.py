"""Every option of every config group composes and builds what it configures (data module, network, diffusion,
callbacks, loggers, trainer, sampler options), without training; every recipe runs its debug=fast steps; and the
default config, as `python train.py` composes it, trains a step on the real digits."""

import importlib.util
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from src.builders import build_diffusion, build_task_module, instantiate_group, with_synthetic_data
from src.data import DigitsDataModule, SyntheticDataModule
from src.diffusion import SamplerOptions
from src.loggers import build_loggers, finish_wandb
from src.training import train

CONF = Path(__file__).resolve().parents[1] / "conf"
TRAIN_GROUPS = (
    "data",
    "model",
    "schedule",
    "objective",
    "sampler",
    "trainer",
    "callbacks",
    "logger",
    "paths",
    "task",
    "experiment",
    "debug",
)
# Hydra's own groups (plugins), the convert presets and sample / evaluate's shared keys: tested below each
OTHER_GROUPS = ("hydra", "preset", "sampling")
HYDRA_PLUGINS = {"launcher": "hydra_plugins.hydra_submitit_launcher", "sweeper": "hydra_plugins.hydra_optuna_sweeper"}

pytestmark = pytest.mark.usefixtures("single_thread")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def group_options(*groups: str) -> list:
    return [pytest.param(group, name, id=f"{group}={name}") for group in groups for name in options(group)]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two labelled sub-folders of small RGB images (image_folder's classes)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


def build(cfg, tmp_path: Path) -> dict:
    """What train.py builds from cfg before fitting: data, task module (network + diffusion), callbacks, loggers,
    trainer; and one batch of the data through the diffusion's training loss."""
    cfg = with_synthetic_data(cfg)
    datamodule = instantiate(cfg.data)
    module = build_task_module(cfg, datamodule)
    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks")
    loggers = build_loggers(cfg.get("logger"))
    try:
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    finally:
        finish_wandb(loggers)
    assert isinstance(trainer, L.Trainer)
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    assert x.shape[1:] == (datamodule.channels, datamodule.image_size, datamodule.image_size)
    if cfg.task == "diffusion":
        t = torch.randint(0, module.diffusion.num_timesteps, (x.shape[0],))
        model_kwargs = {"y": y} if module.net.num_classes is not None else None
        losses = module.diffusion.training_losses(module.net, x, t, model_kwargs=model_kwargs)
        assert torch.isfinite(losses["loss"]).all()
    return {"cfg": cfg, "datamodule": datamodule, "module": module, "callbacks": callbacks, "trainer": trainer}


def test_every_group_is_tested():
    groups = {p.name for p in CONF.iterdir() if p.is_dir()}
    assert groups == set(TRAIN_GROUPS) | set(OTHER_GROUPS)


@pytest.mark.parametrize("group,name", group_options("model", "schedule", "objective", "sampler", "callbacks", "task"))
def test_option_builds_a_tiny_run(compose_train, tmp_path, group, name):
    """The option on the default recipe at debug=fast width, on generated images: every object train.py builds."""
    overrides = [f"{group}={name}", "debug=fast"]
    target = OmegaConf.load(CONF / group / f"{name}.yaml").get("_target_", "")
    if target.endswith("NoisyClassifier"):
        overrides.append("task=classifier")  # a classifier network is trained by the classifier task only
    if OmegaConf.load(CONF / group / f"{name}.yaml").get("num_head_channels"):
        overrides.append("model.num_head_channels=16")  # heads of the debug width (32 channels at the first level)
    if group == "model" and name != "unet_small":
        overrides.append("data.image_size=32")  # the released nets' levels go below 16x16 digits
    built = build(compose_train(*overrides, fast=False), tmp_path)
    cfg, module = built["cfg"], built["module"]
    assert isinstance(built["datamodule"], SyntheticDataModule)
    assert module.diffusion.num_timesteps == cfg.schedule.num_timesteps == 50
    if group == "sampler":
        (grid,) = [c for c in built["callbacks"] if type(c).__name__ == "SampleGridCallback"]
        assert grid.options == SamplerOptions.from_mapping(OmegaConf.to_container(cfg.sampler, resolve=True))
        assert 1 <= grid.options.num_steps(cfg.schedule.num_timesteps) <= 50
    if group == "callbacks":
        # debug=fast switches FID off: the group as the recipe has it builds every entry it names
        entries = compose_train(f"callbacks={name}", fast=False).callbacks
        assert len(instantiate_group(entries)) == sum(entry is not None for entry in entries.values())


@pytest.mark.parametrize("name", options("data"))
def test_data_option_builds_its_data_module(compose_train, tmp_path, image_folder, name):
    extra = [f"data.root={image_folder}", "data.image_size=16", "data.batch_size=4"] if name == "image_folder" else []
    cfg = compose_train(f"data={name}", *extra, fast=False)
    datamodule = instantiate(cfg.data)
    module = build_task_module(cfg, datamodule)
    assert module.net.image_size == datamodule.image_size == cfg.data.image_size
    if name == "cifar10":
        # reading CIFAR-10 needs its files (tests/test_data.py covers them with fakes); the module is built
        assert (datamodule.channels, datamodule.num_classes) == (3, 10)
        return
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    assert x.shape == (cfg.data.batch_size, datamodule.channels, cfg.data.image_size, cfg.data.image_size)
    assert x.min() >= -1 and x.max() <= 1 and 0 <= int(y.min()) and int(y.max()) < datamodule.num_classes


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_option_builds_a_trainer(compose_train, name):
    overrides = [f"trainer={name}"]
    if not torch.cuda.is_available():
        # the gpu / ddp options ask for a GPU, which Lightning refuses to configure without one: their CPU form
        overrides += ["trainer.accelerator=cpu", "trainer.devices=1"]
    cfg = compose_train(*overrides, fast=False)
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert trainer.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("config_name", ["train", "evaluate"])
@pytest.mark.parametrize("name", options("logger"))
def test_logger_option_builds_offline(compose_train, compose_evaluate, tmp_path, monkeypatch, config_name, name):
    monkeypatch.setenv("WANDB_MODE", "offline")  # the config sets offline already; no network either way
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    if config_name == "train":
        cfg = compose_train(f"logger={name}", fast=False)
    else:
        cfg = compose_evaluate("ckpt_path=x.ckpt", f"logger={name}")
    loggers = build_loggers(cfg.logger)
    try:
        assert len(loggers) == 1 and isinstance(loggers[0], L.pytorch.loggers.Logger)
        assert Path(loggers[0].save_dir) == Path(cfg.paths.output_dir)
    finally:
        finish_wandb(loggers)
    if name == "wandb":
        assert cfg.logger.wandb.offline is True


@pytest.mark.parametrize("name", options("paths"))
def test_paths_option_resolves(compose_train, tmp_path, name):
    cfg = compose_train(f"paths={name}", fast=False, output_dir=tmp_path / "out")
    assert Path(cfg.paths.output_dir) == tmp_path / "out" and cfg.paths.data_dir


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_builds_at_debug_size(compose_train, tmp_path, name):
    recipe = compose_train(f"experiment={name}", fast=False)
    built = build(compose_train(f"experiment={name}", "debug=fast", fast=False), tmp_path)
    datamodule, net = built["datamodule"], built["module"].net
    # the recipe's images and classes, at the debug width
    assert isinstance(datamodule, SyntheticDataModule) and net.image_size == recipe.data.image_size
    assert net.num_classes == recipe.model.num_classes and recipe.model._target_ == built["cfg"].model._target_


@pytest.mark.parametrize("name", options("debug"))
def test_debug_option_builds(compose_train, tmp_path, name):
    built = build(compose_train(f"debug={name}", fast=False), tmp_path)
    assert built["trainer"].accelerator.__class__.__name__ == "CPUAccelerator"
    # fast swaps in generated images; tiny keeps the real digits
    assert isinstance(built["datamodule"], SyntheticDataModule if name == "fast" else DigitsDataModule)


@pytest.mark.parametrize("kind", sorted(HYDRA_PLUGINS))
def test_hydra_plugin_options_compose(compose_train, kind):
    if importlib.util.find_spec(HYDRA_PLUGINS[kind]) is None:
        pytest.skip(f"{HYDRA_PLUGINS[kind]} is not installed (requirements-cluster.txt)")
    for name in options(f"hydra/{kind}"):
        cfg = compose_train(f"hydra/{kind}={name}", fast=False, return_hydra_config=True)
        assert cfg.hydra[kind]._target_.startswith("hydra_plugins.")


@pytest.mark.parametrize("config_name", ["sample", "evaluate"])
@pytest.mark.parametrize("name", [None, *options("sampler")])
def test_sampler_option_of_sample_and_evaluate(compose_train, compose_sample, compose_evaluate, config_name, name):
    from src.sampling.loading import sampler_options

    trained = compose_train(fast=False)
    compose = compose_sample if config_name == "sample" else compose_evaluate
    cfg = compose("ckpt_path=x.ckpt", *([f"sampler={name}"] if name else []))
    chosen = sampler_options(trained, cfg)
    expected = OmegaConf.load(CONF / "sampler" / f"{name}.yaml") if name else trained.sampler
    assert chosen.sampler == expected.sampler and chosen.steps == expected.steps
    assert 1 <= chosen.num_steps(trained.schedule.num_timesteps) <= trained.schedule.num_timesteps


@pytest.mark.parametrize("config_name", ["sample", "evaluate"])
def test_sampling_keys_are_shared_and_reach_the_sampler(compose_train, compose_sample, compose_evaluate, config_name):
    from src.sampling.loading import sampler_options

    shared = OmegaConf.load(CONF / "sampling" / "default.yaml")
    compose = compose_sample if config_name == "sample" else compose_evaluate
    cfg = compose("ckpt_path=x.ckpt")
    assert {key: cfg[key] for key in shared} == dict(shared)
    cfg = compose("ckpt_path=x.ckpt", "sampler=ddim", "steps=10", "eta=0.5", "threshold=dynamic")
    chosen = sampler_options(compose_train(fast=False), cfg)
    assert (chosen.sampler, chosen.steps, chosen.eta, chosen.threshold) == ("ddim", 10, 0.5, "dynamic")


@pytest.mark.parametrize("name", options("preset"))
def test_preset_composes_its_model(compose_config, name):
    """A convert preset and the train config it builds: its image size and classes (the default recipe's 10 digit
    classes must not leak into a released net's)."""
    preset = OmegaConf.load(CONF / "preset" / f"{name}.yaml")
    cfg = compose_config("convert", "format=openai", "src=a.pt", "dst=b.ckpt", f"preset={name}")
    assert cfg.preset.name == name
    data = ["data=image_folder", "data.root=/images", "data.channels=3"] if preset.image_size != 32 else []
    trained = compose_config("train", *data, f"data.image_size={preset.image_size}", *preset.train)
    assert trained.model.num_classes == preset.num_classes
    assert build_diffusion(trained).num_timesteps == trained.schedule.num_timesteps


def test_the_default_config_is_the_class_conditional_quickstart(compose_train):
    cfg = compose_train(fast=False, return_hydra_config=True)
    assert cfg.hydra.runtime.choices.experiment == "digits_quickstart" and cfg.hydra.runtime.choices.data == "digits"
    assert cfg.model.num_classes == 10 and cfg.guidance_scale == 0.0


@pytest.mark.parametrize(
    "overrides,choices",
    [
        (["data=cifar10"], {"data": "cifar10", "model": "unet_small"}),
        (["model=unet_small", "schedule=cosine"], {"data": "digits", "schedule": "cosine"}),
        (["experiment=cifar10_ddpm", "data=digits"], {"data": "digits", "model": "unet_ddpm_cifar10"}),
    ],
)
def test_command_line_groups_win_over_the_recipe(compose_train, overrides, choices):
    cfg = compose_train(*overrides, fast=False, return_hydra_config=True)
    assert {group: cfg.hydra.runtime.choices[group] for group in choices} == choices


@pytest.mark.slow
@pytest.mark.parametrize("name", options("experiment"))
def test_recipe_runs_its_debug_steps(compose_train, name):
    recipe = compose_train(f"experiment={name}", fast=False)
    # the 256 px recipes' end-of-run grid (16 images at 256x256) is most of their time on a CPU: 2 images here
    small_grid = ["callbacks.sample_grid.num_samples=2"] if recipe.data.image_size >= 128 else []
    cfg = compose_train(f"experiment={name}", "debug=fast", "callbacks.progress_bar=null", *small_grid, fast=False)
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 2 and math.isfinite(metrics["train/loss"])
    datamodule, net = objects["datamodule"], objects["module"].net
    assert isinstance(datamodule, SyntheticDataModule) and datamodule.image_size == recipe.data.image_size
    assert net.num_classes == recipe.model.num_classes
    assert cfg.paths.output_dir and (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").is_file()


def test_the_default_config_trains_a_step_on_the_digits(compose_train):
    # `python train.py` as composed, one step; the end-of-training grid (64 images of DDIM-50) is left out for time
    cfg = compose_train("trainer.max_steps=1", "callbacks.sample_grid.on_train_end=false", fast=False)
    metrics, objects = train(cfg)
    module = objects["module"]
    assert cfg.model.num_classes == 10 and module.net.num_classes == 10
    assert isinstance(objects["datamodule"], DigitsDataModule) and objects["datamodule"].image_size == 16
    assert objects["trainer"].global_step == 1 and math.isfinite(metrics["train/loss"])

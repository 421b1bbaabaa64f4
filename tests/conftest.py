"""Shared fixtures: Hydra configs composed with the compose API, written to tmp_path."""

from pathlib import Path
from typing import Literal

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# A fast CPU run on the real digits: the tiny net and schedule of conf/debug/tiny.yaml, unconditional (the default
# recipe is class-conditional; test_conditional.py covers it), one sample grid of a few images.
FAST_OVERRIDES = [
    "debug=tiny",
    "model.num_classes=null",
    "callbacks.sample_grid.num_samples=4",
    "sampler.steps=10",
]

ConfigName = Literal["train", "evaluate", "sample"]


def compose_config(
    config_name: ConfigName,
    *overrides: str,
    output_dir: Path | None = None,
    data_dir: Path | None = None,
    fast: bool = False,
    return_hydra_config: bool = False,
) -> DictConfig:
    """conf/<config_name>.yaml with `overrides`, as its entry point (train.py, evaluate.py, sample.py) sees it.

    Hydra's run-time values are set (HydraConfig), paths.output_dir / paths.data_dir point at the given
    folders (None keeps the config's own), and cfg.hydra is removed unless return_hydra_config=True (the
    launcher and sweeper configs live there). fast=True puts FAST_OVERRIDES (train only) before `overrides`.
    """
    if fast and config_name != "train":
        raise ValueError(f"fast=True shrinks the train config only, not {config_name!r}")
    overrides = [*(FAST_OVERRIDES if fast else []), *overrides]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        if output_dir is not None:
            cfg.paths.output_dir = str(output_dir)
        if data_dir is not None:
            cfg.paths.data_dir = str(data_dir)
        if not return_hydra_config:
            del cfg.hydra
    return cfg


@pytest.fixture(name="compose_config", scope="session")
def compose_config_fixture():
    """compose_config(config_name, *overrides, output_dir=..., data_dir=...), for fixtures wider than a test
    (module scope, folders from tmp_path_factory)."""
    return compose_config


def _under_tmp_path(tmp_path: Path, config_name: ConfigName, output_folder: str, **defaults):
    def _compose(*overrides: str, output_dir: Path | None = None, data_dir: Path | None = None, **options):
        return compose_config(
            config_name,
            *overrides,
            output_dir=output_dir or tmp_path / output_folder,
            data_dir=data_dir or tmp_path / "data",
            **{**defaults, **options},
        )

    return _compose


@pytest.fixture
def compose_train(tmp_path):
    """compose_train(*overrides, fast=True, return_hydra_config=False, output_dir=tmp_path/"run",
    data_dir=tmp_path/"data") -> the train config (shrunk to a fast CPU run unless fast=False)."""
    return _under_tmp_path(tmp_path, "train", "run", fast=True)


@pytest.fixture
def compose_evaluate(tmp_path):
    """compose_evaluate(*overrides, output_dir=tmp_path/"eval", data_dir=tmp_path/"data") -> the evaluate config."""
    return _under_tmp_path(tmp_path, "evaluate", "eval")


@pytest.fixture
def compose_sample(tmp_path):
    """compose_sample(*overrides, output_dir=tmp_path/"sample", data_dir=tmp_path/"data") -> the sample config,
    without progress bars."""
    compose_sample_config = _under_tmp_path(tmp_path, "sample", "sample")
    return lambda *overrides, **options: compose_sample_config("progress=false", *overrides, **options)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a test module (`pytestmark = pytest.mark.usefixtures("single_thread")`): tiny
    nets and elementwise ops only stall on a second thread of a shared 2-core machine (25x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

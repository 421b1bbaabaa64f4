"""Shared fixtures: Hydra configs composed with the compose API, written to tmp_path."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# A fast CPU run: tiny schedule and net, one sample grid of a few images.
FAST_OVERRIDES = [
    "trainer.accelerator=cpu",
    "schedule.num_timesteps=50",
    "model.base_channels=32",
    "model.channel_mult=[1,2]",
    "model.num_res_blocks=1",
    "model.num_heads=1",
    "data.batch_size=16",
    "callbacks.sample_grid.num_samples=4",
    "sampler.steps=10",
    "callbacks.progress_bar=null",
]


def compose_config(*overrides: str, output_dir: Path, fast: bool = True):
    """The train config as train.py would see it (optionally shrunk by FAST_OVERRIDES), writing to output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*(FAST_OVERRIDES if fast else []), *overrides],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir / "run")
        cfg.paths.data_dir = str(output_dir / "data")
        del cfg.hydra
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture
def compose_train(tmp_path):
    """compose_train(*overrides, fast=True) -> a fast train config writing under tmp_path."""

    def _compose(*overrides: str, fast: bool = True):
        return compose_config(*overrides, output_dir=tmp_path, fast=fast)

    return _compose


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a test module (`pytestmark = pytest.mark.usefixtures("single_thread")`): tiny
    nets and elementwise ops only stall on a second thread of a shared 2-core machine (25x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

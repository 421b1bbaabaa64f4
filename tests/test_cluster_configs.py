"""The SLURM launcher and Optuna sweeper configs (optional plugins, requirements-cluster.txt)."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST_OVERRIDES
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
PLUGIN_MISSING = "not installed; pip install -r requirements-cluster.txt"


def test_slurm_launcher_config_composes(compose_train):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason=f"hydra-submitit-launcher {PLUGIN_MISSING}")
    cfg = compose_train(
        "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", fast=False, return_hydra_config=True
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    # one task per GPU, as many as the trainer's devices: Lightning takes the ranks from SLURM
    assert launcher.tasks_per_node == launcher.gpus_per_node == cfg.trainer.devices
    assert launcher.nodes == cfg.trainer.num_nodes
    assert launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0


def test_optuna_sweeper_searches_keys_of_the_train_config(compose_train):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason=f"hydra-optuna-sweeper {PLUGIN_MISSING}")
    cfg = compose_train("hydra/sweeper=optuna_lr_ema_dropout", fast=False, return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("optuna_sweeper.OptunaSweeper") and sweeper.direction == "minimize"
    assert set(sweeper.params) == {"module.optimizer.lr", "module.ema_decay", "model.dropout"}
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, f"{key} is not in the train config"


@pytest.mark.slow
def test_optuna_sweep_runs_trials_and_reports_the_best(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason=f"hydra-optuna-sweeper {PLUGIN_MISSING}")
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "hydra/sweeper=optuna_lr_ema_dropout",
        "hydra.sweeper.n_trials=2",
        "+optimized_metric=val/loss",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "+trainer.limit_val_batches=1",
        *FAST_OVERRIDES,
        "callbacks.sample_grid=null",
        f"hydra.sweep.dir={tmp_path}",
        f"paths.data_dir={tmp_path}/data",
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and p.name.isdigit())
    assert jobs == ["0", "1"]
    best = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert set(best.best_params) == {"module.optimizer.lr", "module.ema_decay", "model.dropout"}
    assert best.best_value > 0

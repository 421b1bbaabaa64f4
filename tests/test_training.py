"""End-to-end runs of train.py's config through the Trainer (CPU, tiny settings)."""

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.training import train

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # every test trains through the Trainer


@pytest.mark.parametrize("objective", ["simple", "vlb", "hybrid"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_fast_dev_run_every_objective_and_schedule(compose_train, objective, schedule):
    cfg = compose_train(f"objective={objective}", f"schedule={schedule}", "+trainer.fast_dev_run=true")
    metrics, objects = train(cfg)
    module = objects["module"]
    assert module.diffusion.loss_type == objective
    assert module.net.out_channels == (2 if objective in ("vlb", "hybrid") else 1)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert {"val/loss", "val/bpd"} <= metrics.keys()


def test_short_run_writes_checkpoint_grid_and_metrics(compose_train):
    cfg = compose_train(
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "trainer.log_every_n_steps=1",
        "callbacks.sample_grid.every_n_steps=3",
        "callbacks.model_checkpoint.every_n_train_steps=3",
    )
    _, objects = train(cfg)
    out = Path(cfg.paths.output_dir)
    assert objects["trainer"].global_step == 6
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6
    assert any(k.startswith("ema.model.") for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["run_config"]["objective"]["loss_type"] == "simple"
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step_0000003.png", "step_0000006.png"]
    with open(out / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train_losses = [r["train/loss"] for r in rows if r.get("train/loss")]
    val_losses = [r["val/loss"] for r in rows if r.get("val/loss")]
    assert len(train_losses) == 6 and len(val_losses) == 2


def test_ema_differs_from_live_weights_after_training(compose_train):
    cfg = compose_train("trainer.max_steps=3", "callbacks.sample_grid=null", "module.ema_decay=0.5")
    _, objects = train(cfg)
    module = objects["module"]
    live = torch.cat([p.flatten() for p in module.net.parameters()])
    ema = torch.cat([p.flatten() for p in module.ema.model.parameters()])
    assert module.ema.num_updates == 3
    assert not torch.equal(live, ema)


def test_multirun_runs_each_job_in_its_own_folder(tmp_path):
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "schedule=linear,cosine",
        "objective=simple,hybrid",
        "trainer.max_steps=2",
        "trainer.accelerator=cpu",
        "schedule.num_timesteps=50",
        "sampler.steps=5",
        "model.base_channels=32",
        "model.channel_mult=[1,2]",
        "model.num_res_blocks=1",
        "model.num_heads=1",
        "callbacks.sample_grid.num_samples=4",
        "callbacks.progress_bar=null",
        f"hydra.sweep.dir={tmp_path}",
        f"paths.data_dir={tmp_path}/data",
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").exists()
        assert list((job / "samples").glob("*.png"))


def test_offline_cifar10_stops_with_one_clear_line(tmp_path):
    cmd = [
        sys.executable,
        "train.py",
        "data=cifar10",
        "trainer.accelerator=cpu",
        f"hydra.run.dir={tmp_path}/run",
        f"data.root={tmp_path}/cifar10",
        "data.download=false",
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert f"{tmp_path}/cifar10/cifar-10-batches-py" in errors[0]


def test_a_cosine_run_logs_the_decaying_lr_down_to_max_steps(compose_train):
    cfg = compose_train(
        "module.lr_schedule=cosine",
        "module.lr_warmup_steps=2",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=6",
        "callbacks.sample_grid.on_train_end=false",
    )
    train(cfg)
    with open(next(Path(cfg.paths.output_dir).rglob("metrics.csv"))) as f:
        lrs = [float(row["lr-Adam"]) for row in csv.DictReader(f) if row.get("lr-Adam")]
    lr = cfg.module.optimizer.lr
    expected = [lr * min(1, (s + 1) / 2) * (1 + math.cos(math.pi * min(1, max(0, s - 1) / 5))) / 2 for s in range(6)]
    assert lrs == pytest.approx(expected, rel=1e-6)

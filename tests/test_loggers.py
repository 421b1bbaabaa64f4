"""Loggers: W&B offline (no network, no API key, no prompt), TensorBoard and CSV receive the scalars,
the sample grids, the run config and the git commit."""

import csv
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_fid import fid_overrides, write_random_inception_weights

from src.provenance import git_info
from src.training import train

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # every test trains through the Trainer


def read_wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's .wandb file (a LevelDB-style log: 32 KiB blocks of
    chunks, each with a 7-byte header of crc32, length and type full / first / middle / last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero-filled space
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_run_contents(save_dir: Path, timeout: float = 60.0) -> tuple[set, dict, Path]:
    """(history keys, config {key: json}, run folder) of the single offline run under save_dir.

    W&B's service process writes the run file and may still be flushing it when wandb.finish() (or
    the training process) returns, so this waits for the run's closing `exit` record.
    """
    (run_dir,) = (save_dir / "wandb").glob("offline-run-*")
    (log_file,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_records(log_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    history, config = set(), {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "config":
            config |= {item.key or "/".join(item.nested_key): item.value_json for item in record.config.update}
    return history, config, run_dir


@pytest.fixture
def no_wandb_account(tmp_path, monkeypatch):
    """No API key, no settings or credentials from the home folder, no mode preset in the environment."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_ENTITY"):
        monkeypatch.delenv(name, raising=False)  # also restores WANDB_MODE, which the logger sets
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def test_wandb_offline_records_scalars_images_fid_config_and_commit(compose_train, tmp_path, no_wandb_account):
    import wandb

    weights = write_random_inception_weights(tmp_path / "random-inception.pth")
    cfg = compose_train(
        "logger=wandb",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=2",
        *fid_overrides(weights, tmp_path),
    )
    try:
        train(cfg)
    finally:
        wandb.finish()  # what process exit does for train.py; writes the rest of the run file
    history, config, run_dir = wandb_run_contents(Path(cfg.paths.output_dir))
    assert {
        "train/loss",
        "train/mse",
        "val/loss",
        "val/bpd",
        "lr-Adam",
        "train/images_per_sec",
        "eval/fid",
        "eval/is",
        "eval/is_std",
        "samples/_type",
    } <= history  # an image is logged as samples/*
    assert json.loads(config["run_config"])["objective"]["loss_type"] == "simple"  # the resolved Hydra config
    assert json.loads(config["git_commit"]) == git_info()["git_commit"] != "unknown"
    assert list((run_dir / "files" / "media" / "images").glob("samples_*.png"))


def test_each_training_run_closes_its_wandb_run(compose_train, no_wandb_account):
    """Multirun jobs run one after another in one process: each must get its own W&B run."""
    import wandb

    folders = []
    for lr in ("1e-3", "2e-3"):
        cfg = compose_train(
            "logger=wandb",
            "trainer.max_steps=1",
            "callbacks.sample_grid=null",
            "+trainer.limit_val_batches=0",
            f"module.optimizer.lr={lr}",
        )
        cfg.paths.output_dir = str(Path(cfg.paths.output_dir).parent / f"job_lr{lr}")
        train(cfg)
        assert wandb.run is None  # finished, not left open for the next job
        (run_dir,) = (Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*")
        folders.append(run_dir.name)
    assert folders[0] != folders[1]


def test_wandb_sample_grid_is_the_png_written_to_disk(compose_train, no_wandb_account):
    import numpy as np
    import wandb
    from PIL import Image

    cfg = compose_train("logger=wandb", "trainer.max_steps=1", "sampler.steps=5")
    try:
        train(cfg)
    finally:
        wandb.finish()
    out = Path(cfg.paths.output_dir)
    (logged,) = (out / "wandb").glob("offline-run-*/files/media/images/samples_*.png")
    (written,) = (out / "samples").glob("step_*.png")
    np.testing.assert_array_equal(
        np.asarray(Image.open(logged).convert("RGB")), np.asarray(Image.open(written).convert("RGB"))
    )


def test_tensorboard_records_scalars_and_sample_grid(compose_train):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_train(
        "logger=tensorboard",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=2",
        "sampler.steps=5",
    )
    train(cfg)
    events = EventAccumulator(str(Path(cfg.paths.output_dir) / "tensorboard")).Reload()
    assert {"train/loss", "val/bpd", "lr-Adam", "train/images_per_sec"} <= set(events.Tags()["scalars"])
    assert "samples" in events.Tags()["images"]


def test_csv_records_throughput_and_git_commit(compose_train):
    cfg = compose_train("trainer.max_steps=3", "trainer.log_every_n_steps=1", "callbacks.sample_grid=null")
    train(cfg)
    out = Path(cfg.paths.output_dir) / "csv"
    with open(out / "metrics.csv", newline="") as f:
        rates = [float(r["train/images_per_sec"]) for r in csv.DictReader(f) if r.get("train/images_per_sec")]
    assert len(rates) == 3 and all(rate > 0 for rate in rates)
    hparams = (out / "hparams.yaml").read_text()  # not safe_load-able: the optimizer partial is a python tag
    assert f"git_commit: {git_info()['git_commit']}" in hparams and "run_config:" in hparams


def test_train_py_with_wandb_needs_no_account_and_never_waits_for_input(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), NETRC=str(tmp_path / "no-netrc"))
    cmd = [
        sys.executable,
        "train.py",
        "logger=wandb",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "trainer.accelerator=cpu",
        "schedule.num_timesteps=50",
        "model.base_channels=32",
        "model.channel_mult=[1,2]",
        "model.num_res_blocks=1",
        "model.num_heads=1",
        "data.batch_size=16",
        "callbacks.sample_grid.num_samples=4",
        "sampler.steps=null",
        "callbacks.progress_bar=null",
        f"hydra.run.dir={tmp_path}/run",
        f"paths.data_dir={tmp_path}/data",
    ]
    result = subprocess.run(
        cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    history, config, _ = wandb_run_contents(tmp_path / "run")
    assert {"train/loss", "samples/_type"} <= history and "git_commit" in config


def test_evaluate_sends_its_numbers_to_wandb(compose_evaluate, tmp_path, no_wandb_account):
    """evaluate.py logger=wandb: the metrics of a scored sample file land in an offline W&B run."""
    import numpy as np

    from src.data.digits import load_digits_uint8
    from src.evaluation import run

    images, _ = load_digits_uint8(16)
    npz = tmp_path / "digits.npz"
    np.savez(npz, arr_0=images[:200].permute(0, 2, 3, 1).numpy())
    out = tmp_path / "eval"
    metrics = run(
        compose_evaluate(f"samples={npz}", "extractor=digits", "metrics=[fid,is]", "logger=wandb", output_dir=out)
    )
    history, _, _ = wandb_run_contents(out)
    assert {"eval/fd_digits-mlp64", "eval/is_digits-mlp64"} <= history and metrics["fd_digits-mlp64"] > 0

"""Faults during training: a checkpoint write that fails midway, a NaN loss, mixed precision."""

import csv
import errno
import hashlib
import math
from pathlib import Path

import pytest
import torch

from src.checkpoints import read_checkpoint
from src.errors import NonFiniteLossError
from src.lit import AtomicCheckpointIO
from src.models import UNet
from src.training import train

QUIET = ["callbacks.sample_grid=null", "+trainer.limit_val_batches=0", "+trainer.num_sanity_val_steps=0"]


def failing_save(fail_when, real_save=torch.save):
    """A torch.save that writes half of the real bytes and then fails like a full disk, when fail_when(obj, f)."""
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(getattr(f, "name", f))
        if not fail_when(obj, f):
            return real_save(obj, f, *args, **kwargs)
        real_save(obj, tmp := Path(str(f.name) + ".full"))
        data = tmp.read_bytes()
        tmp.unlink()
        f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    return save, calls


def test_interrupted_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)
    save, _ = failing_save(lambda obj, f: True)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    previous = torch.load(path, weights_only=True)
    assert previous["global_step"] == 1 and torch.equal(previous["w"], torch.ones(1000))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the partial temp file is gone


@pytest.mark.slow
def test_checkpoint_write_failing_during_training_keeps_last_ckpt_loadable(compose_train, monkeypatch):
    cfg = compose_train(*QUIET, "trainer.max_steps=4", "callbacks.model_checkpoint.every_n_train_steps=2")
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    save, calls = failing_save(lambda obj, f: str(f.name).endswith("last.ckpt.tmp") and obj["global_step"] == 4)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError, match="No space left"):
        train(cfg)
    monkeypatch.undo()
    assert str(last) + ".tmp" in calls  # written through AtomicCheckpointIO: temp file next to the target
    assert not Path(str(last) + ".tmp").exists()
    assert read_checkpoint(last)["global_step"] == 2
    assert torch.load(last, weights_only=False)["global_step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("bad_step", [3, 1])
def test_nan_loss_stops_before_the_update_and_names_the_last_good_checkpoint(compose_train, monkeypatch, bad_step):
    cfg = compose_train(*QUIET, "trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=2")
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    forward, seen = UNet.forward, {"calls": 0}

    def forward_with_nan(self, x, t, y=None):
        out = forward(self, x, t, y)
        if torch.is_grad_enabled():  # training steps only (validation and sampling run without grad)
            seen["calls"] += 1
            if seen["calls"] == bad_step:
                seen["net"] = self
                seen["sha"] = hashlib.sha256(last.read_bytes()).hexdigest() if last.exists() else None
                return out * float("nan")
        return out

    monkeypatch.setattr(UNet, "forward", forward_with_nan)
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    message = str(err.value)
    assert "\n" not in message and f"training loss is nan (not finite) at optimizer step {bad_step};" in message
    if bad_step == 1:
        assert "last good checkpoint: none saved yet" in message and not last.exists()
        return
    assert f"last good checkpoint: {last};" in message
    assert hashlib.sha256(last.read_bytes()).hexdigest() == seen["sha"]  # not rewritten after the bad step
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["global_step"] == bad_step - 1
    # The bad step raised before the optimizer step: the live weights are still those of the checkpoint.
    for name, value in seen["net"].state_dict().items():
        assert torch.equal(value, ckpt["state_dict"][f"net.{name}"]), name


@pytest.mark.slow
def test_bf16_mixed_precision_with_learned_variance_gives_finite_losses(compose_train):
    # bf16 autocast is very slow on CPUs without bf16 units: 2 steps of a tiny net.
    cfg = compose_train(
        *QUIET,
        "trainer.precision=bf16-mixed",
        "objective=hybrid",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "data.batch_size=8",
    )
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 2
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == 2
    for row in rows:
        assert all(math.isfinite(float(row[key])) for key in ("train/loss", "train/mse", "train/vb")), row

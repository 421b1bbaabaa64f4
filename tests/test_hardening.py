"""Inputs that used to lose data or pass silently: each is refused with one line that names the fix, and
nothing already on disk changes."""
from pathlib import Path

import pytest

from src.errors import CheckpointError
from src.training import resolve_ckpt_path, train


def test_a_fresh_run_never_replaces_a_trained_checkpoint(compose_train):
    cfg = compose_train("trainer.max_steps=2")
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"trained weights")
    before = sorted(p.name for p in Path(cfg.paths.output_dir).rglob("*"))
    with pytest.raises(CheckpointError) as err:
        train(cfg)
    message = str(err.value)
    assert "\n" not in message and "ckpt_path=last" in message and "overwrite=true" in message
    assert last.read_bytes() == b"trained weights"
    assert sorted(p.name for p in Path(cfg.paths.output_dir).rglob("*")) == before  # nothing else was written
    assert resolve_ckpt_path(compose_train("overwrite=true")) is None  # starting over there is a choice


def test_ckpt_path_to_a_folder_says_so(compose_train, tmp_path):
    with pytest.raises(CheckpointError, match="is a folder; give a .ckpt file such as"):
        resolve_ckpt_path(compose_train(f"ckpt_path={tmp_path}"))

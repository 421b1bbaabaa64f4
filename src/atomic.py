"""Files written whole or not at all, for every output of the project (checkpoints, metrics.json, sample
archives, grids, converted weights): the content goes to a temporary name in the destination's folder, is
fsynced, and only then renamed onto the destination (the rename made durable too). A kill, Ctrl+C or a full
disk mid-write leaves whatever the destination held before, and no temporary file."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch


def write_with(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call write(file) on a temporary file next to `path`, fsync it, then rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return write_with(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode())


def savez(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """np.savez(path, **arrays); the archive is built in memory, so `path` keeps its exact name (no .npz added)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return write_bytes(path, buffer.getvalue())


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save(obj) to a local `path`."""
    return write_with(path, lambda f: torch.save(obj, f))


@contextmanager
def replaced(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `dst` for another library to write a file or a folder into (e.g.
    diffusers' save_pretrained); it replaces `dst` only when the block succeeds, so a failure leaves `dst` as it
    was. An existing folder at `dst` is removed just before the rename."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    target = tmp / dst.name
    try:
        yield target
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(target, dst)
        _fsync_dir(dst.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable; a no-op where the filesystem does not let a folder be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""Checkpoint writing that never leaves a truncated file under the final name."""

import os
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a local checkpoint to `<path>.tmp` in the same folder, fsyncs it, then `os.replace`s it
    onto `<path>`: a kill or a full disk mid-save leaves the previous checkpoint intact.

    Lightning's own save goes through an fsspec transaction whose temporary file lives in the system
    temp folder; where that is another filesystem than the run folder (a node-local /tmp, the usual case
    on clusters) the final step is a copy, not a rename, so a kill during it truncates `last.ckpt`.
    Remote paths (s3://, gs://, ...) keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        atomic_torch_save(checkpoint, path)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save(obj) to a local `path` whole or not at all: written to `<path>.tmp` in the same folder,
    fsynced, then `os.replace`d onto `path` (the rename made durable too); on any failure the temporary file is
    removed and whatever `path` held before stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not let a folder be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""Outputs written whole or not at all: a temp file in the same folder, then os.replace, so an interrupted
run (Ctrl+C, SIGTERM, a full disk) never leaves a truncated metrics.json or npz behind."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode())


def savez(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """np.savez(path, **arrays), atomically (the archive is built in memory first)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return write_bytes(path, buffer.getvalue())

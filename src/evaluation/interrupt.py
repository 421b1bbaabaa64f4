"""Stopping evaluate.py cleanly: SIGTERM raises like Ctrl+C does, so the run can mark its report partial
before the CLI exits (130 for Ctrl+C, 143 for SIGTERM, see src.cli)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from lightning.pytorch.utilities.exceptions import SIGTERMException

# What a stop signal raises inside evaluate.py's work.
STOPS = (KeyboardInterrupt, SIGTERMException)


def _raise_sigterm(signum, frame):
    raise SIGTERMException(f"signal {signum}")


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises SIGTERMException (Python's default would end the process at once,
    leaving no mark in metrics.json). Signal handlers belong to the main thread; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_name(err: BaseException) -> str:
    return "SIGINT (Ctrl+C)" if isinstance(err, KeyboardInterrupt) else "SIGTERM"

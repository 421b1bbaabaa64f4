"""What the three entry scripts share: problems with the inputs end as one `error:` line, not a traceback."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import TypeVar

from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from src.data import DatasetNotFoundError
from src.errors import NonFiniteLossError, RunError

T = TypeVar("T")


def run_command(run: Callable[[DictConfig], T], cfg: DictConfig, resume_hint: str | None = None) -> T:
    """run(cfg), turning a RunError / DatasetNotFoundError into `error: <message>` on stderr and exit code 2
    (1 for a non-finite loss); HYDRA_FULL_ERROR=1 keeps the traceback. A stop signal (SIGTERM, SIGUSR1,
    Ctrl+C while training) exits 143 like a process ended by SIGTERM, so schedulers do not count the run as
    finished; `resume_hint` says how to continue it."""
    try:
        return run(cfg)
    except (RunError, DatasetNotFoundError, MissingMandatoryValue) as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if isinstance(err, MissingMandatoryValue):  # a `???` in the config that the command line did not set
            err = f"{err.full_key} is required and has no value; set it on the command line ({err.full_key}=...)"
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1 if isinstance(err, NonFiniteLossError) else 2)
    except SIGTERMException:
        print(f"stopped by a signal{'; ' + resume_hint if resume_hint else ''}", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:  # Ctrl+C outside training (evaluate.py, sample.py): one line, the shell's code 130
        print(f"interrupted (Ctrl+C){'; ' + resume_hint if resume_hint else ''}", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)

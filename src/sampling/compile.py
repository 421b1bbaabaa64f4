"""torch.compile for the network that sample.py and evaluate.py call at every sampling step."""

from __future__ import annotations

import logging

import torch

from src.errors import ConfigError

log = logging.getLogger(__name__)

# torch.compile's modes; reduce-overhead also replays the step as a CUDA graph on a GPU, which removes the
# per-kernel launch cost that dominates small-batch sampling.
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(value) -> str | None:
    """The `compile=` setting as a torch.compile mode: false/null -> None (eager), true -> "default"."""
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if value in MODES:
        return value
    raise ConfigError(f"compile must be false, true or one of {', '.join(MODES)}; got {value!r}")


def compile_for_sampling(net: torch.nn.Module, value) -> None:
    """Compile `net` in place (nn.Module.compile), so its attributes and state_dict keys stay as they are.

    Shapes are static (dynamic=False): a sampling run calls the network with one batch size (two with a
    shorter last batch), and each shape gets its own specialised graph. The first call pays the compile.
    """
    mode = compile_mode(value)
    if mode is None:
        return
    log.info("torch.compile(mode=%s) for the sampling network; the first batch includes the compile time", mode)
    net.compile(mode=mode, dynamic=False)

"""Errors that the entry points report as a single line (`error: ...`, no traceback).

They describe a problem with what the user gave the run (config, checkpoint, data) or with its
numerics, and their message names the fix. Anything else is a bug and keeps its traceback.
"""


class RunError(Exception):
    """Base class: a problem the user can fix; the message is one line that says how."""


class ConfigError(RunError, ValueError):
    """A config value, or a combination of values, that cannot work (also: a checkpoint whose config
    does not match the run it should resume)."""


class CheckpointError(RunError, RuntimeError):
    """A checkpoint to resume from is missing, unreadable or not one of this project's."""


class NonFiniteLossError(RunError, FloatingPointError):
    """The training loss became NaN or infinite; raised before the optimizer applies the bad step."""

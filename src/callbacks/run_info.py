"""Records which code produced a run."""

import lightning as L

from src.provenance import git_info


class RunInfoCallback(L.Callback):
    """Adds the git commit of the code (`git_commit`, "unknown" outside a git checkout, and `git_dirty`)
    to every logger's hyperparameters when fitting starts (the run config is logged by Lightning)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        info = git_info()
        for logger in trainer.loggers:
            logger.log_hyperparams(info)

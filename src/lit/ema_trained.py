"""The base of the LightningModules: a network trained with LR warm-up, with an EMA of its weights."""

import warnings

import lightning as L
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn

from .ema import EMA
from .optim import with_linear_warmup


class EMATrainedModule(L.LightningModule):
    """Owns `self.net` (the trained network) and `self.ema` (an EMA of its weights, updated after every
    optimizer step), and builds the optimizer with a linear LR warm-up.

    A subclass calls `super().__init__(net, ema_decay)` and then `self.save_hyperparameters(...)`, which must
    record `optimizer` (a partial taking `params`), `lr_warmup_steps` and `lr_schedule`. The state_dict names
    are `net.*`, `ema.model.*` and `ema._extra_state`.
    """

    def __init__(self, net: nn.Module, ema_decay: float):
        super().__init__()
        self.net = net
        self.ema = EMA(net, decay=ema_decay)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.net)

    def configure_optimizers(self):
        # Run configs written before lr_schedule existed trained with a constant LR after the warm-up.
        schedule = self.hparams.get("lr_schedule", "constant")
        total = self.trainer.max_steps if schedule != "constant" else None
        return with_linear_warmup(
            self.hparams.optimizer(params=self.net.parameters()), self.hparams.lr_warmup_steps, schedule, total
        )

    def on_fit_start(self) -> None:
        # When training starts, Lightning warns about every module in eval mode (lightning/pytorch/loops/
        # fit_loop.py, _warn_if_modules_in_eval_mode). The EMA copy always is, on purpose (EMA.train keeps it
        # there: it is only ever run for inference), so that warning is dropped when the modules in eval mode
        # are exactly as many as the EMA copy has; one more anywhere else changes the count and it shows.
        # The filter is process-wide but matches only this message from that module.
        num_ema_modules = sum(1 for _ in self.ema.model.modules())
        warnings.filterwarnings(
            "ignore",
            message=rf"Found {num_ema_modules} module\(s\) in eval mode at the start",
            category=PossibleUserWarning,
            module=r"lightning\.pytorch\.loops\.fit_loop",
        )

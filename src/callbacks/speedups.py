"""Speed switches for the network: channels_last memory format and torch.compile."""

import lightning as L
import torch


class Speedups(L.Callback):
    """Applies the switches when the Trainer sets up, before the optimizer is built and before DDP wraps
    the module. Both default to off: on CPUs neither helps (measure with benchmarks/throughput.py).

    Args:
        channels_last: store 4-D weights (the network's and the EMA copy's) as NHWC, which tensor-core
            convolutions prefer; convolutions then run NHWC whatever the input's layout.
        compile: torch.compile the training network in place (nn.Module.compile), so parameter names,
            checkpoints and the EMA are unchanged. The EMA copy used for sampling stays eager.
        compile_kwargs: passed to torch.compile (e.g. mode: max-autotune).
    """

    def __init__(self, channels_last: bool = False, compile: bool = False, compile_kwargs: dict | None = None):
        super().__init__()
        self.channels_last, self.compile, self.compile_kwargs = (
            bool(channels_last),
            bool(compile),
            dict(compile_kwargs or {}),
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.channels_last:
            pl_module.to(memory_format=torch.channels_last)
        if self.compile:
            pl_module.net.compile(**self.compile_kwargs)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.channels_last:
            return
        # Optimizer state restored from a checkpoint comes back contiguous; give it the weights' layout
        # so the foreach/fused kernels see matching strides.
        for optimizer in trainer.optimizers:
            for param, state in optimizer.state.items():
                for key, value in state.items():
                    if torch.is_tensor(value) and value.shape == param.shape and value.ndim == 4:
                        state[key] = value.contiguous(memory_format=torch.channels_last)

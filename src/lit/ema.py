"""Exponential moving average of a network's parameters."""
import copy

import torch
from torch import nn


class EMA(nn.Module):
    """Keeps `self.model`, a frozen copy of the network whose parameters track an EMA of the live ones.

    Only parameters are averaged (buffers are copied), and the decay warms up as
    min(decay, (1 + n) / (10 + n)) so early samples are not dominated by the random initialisation.
    The update count is saved in the state_dict, so resume continues the same warm-up.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay must be in [0, 1], got {decay}")
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        # ema <- ema + (1 - decay) (param - ema), one fused kernel over all tensors.
        torch._foreach_lerp_(ema_params, params, 1.0 - self.current_decay())
        for ema_buf, buf in zip(self.model.buffers(), model.buffers()):
            ema_buf.copy_(buf)
        self.num_updates += 1

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # the average is always used in inference mode (no dropout)
        return self

    def get_extra_state(self) -> dict:
        return {"num_updates": self.num_updates}

    def set_extra_state(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])

"""Exponential moving average of a network's parameters."""

import copy

import torch
from torch import nn

from .ema_profiles import power_beta


class EMA(nn.Module):
    """Keeps `self.model`, a frozen copy of the network whose parameters track an EMA of the live ones.

    Only parameters are averaged (buffers are copied), and the decay warms up as
    min(decay, (1 + n) / (10 + n)) so early samples are not dominated by the random initialisation.
    The update count is saved in the state_dict, so resume continues the same warm-up.

    The average is kept in float32 whatever the network's dtype: with bf16 / fp16 parameters (e.g.
    trainer.precision=bf16-true) a float32 copy is averaged and rounded into `self.model` after each update,
    and saved with the update count, because (1 - decay) (param - ema) is below half a unit in the last
    place of a bf16 value of 0.25 already at decay 0.999, and such an average would stop moving.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay must be in [0, 1], got {decay}")
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0
        self._float32: list[torch.Tensor] | None = None  # the average of non-float32 parameters

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        weight = 1.0 - self.current_decay()
        if all(p.dtype in (torch.float32, torch.float64) for p in ema_params):
            # ema <- ema + (1 - decay) (param - ema), one fused kernel over all tensors.
            torch._foreach_lerp_(ema_params, params, weight)
        else:
            average = self._float32_average(ema_params)
            torch._foreach_lerp_(average, [p.float() for p in params], weight)
            for ema_param, value in zip(ema_params, average):
                ema_param.copy_(value)
        for ema_buf, buf in zip(self.model.buffers(), model.buffers()):
            ema_buf.copy_(buf)
        self.num_updates += 1

    def _float32_average(self, ema_params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The float32 average, started from the model's values at the first update (after any dtype change of
        the module) and on the parameters' device."""
        if self._float32 is None or len(self._float32) != len(ema_params):
            self._float32 = [p.detach().float().clone() for p in ema_params]
        elif self._float32[0].device != ema_params[0].device:  # restored from a checkpoint on the CPU, or moved
            self._float32 = [t.to(ema_params[0].device) for t in self._float32]
        return self._float32

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # the average is always used in inference mode (no dropout)
        return self

    def get_extra_state(self) -> dict:
        state = {"num_updates": self.num_updates}
        if self._float32 is not None:
            state["float32_average"] = self._float32
        return state

    def set_extra_state(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
        self._float32 = state.get("float32_average")


class PowerFunctionEMA(EMA):
    """A power-function EMA (EDM2, Karras et al. 2024, Eq. 3): update t (1-based) decays with
    beta_t = (1 - 1/t)^(gamma + 1), so after t updates the average weighs the parameters of update tau by
    (tau / t)^(gamma + 1) - ((tau - 1) / t)^(gamma + 1), the profile (gamma + 1) tau^gamma / t^(gamma + 1)
    integrated over (tau - 1, tau] (src.lit.ema_profiles). Its length grows with training; its relative width
    is fixed by gamma. The first update copies the parameters (beta_1 = 0), whatever the initial copy held.
    """

    def __init__(self, model: nn.Module, gamma: float):
        super().__init__(model, decay=1.0, warmup=False)
        if not gamma >= 0.0:
            raise ValueError(f"power-function EMA exponent gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)

    def current_decay(self) -> float:
        return power_beta(self.gamma, self.num_updates + 1)

    def averaged_state(self) -> dict[str, torch.Tensor]:
        """The averaged parameters by name, in float32 where the network is not (the average itself, not its
        rounding), cloned to the CPU."""
        names = [name for name, _ in self.model.named_parameters()]
        values = self._float32 if self._float32 is not None else [p.detach() for p in self.model.parameters()]
        return {name: value.detach().to("cpu", copy=True) for name, value in zip(names, values)}

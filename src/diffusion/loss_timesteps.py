"""Distributions over timesteps for the training loss (improved DDPM Sec. 3.3).

A sampler returns timesteps t [N] and importance weights [N] such that the weighted loss is an
unbiased estimate of the loss under uniform t.
"""

import numpy as np
import torch
from torch import nn


class UniformSampler(nn.Module):
    """t ~ Uniform{0..T-1}, all weights 1."""

    def __init__(self, num_timesteps: int):
        super().__init__()
        self.num_timesteps = num_timesteps

    def weights(self) -> np.ndarray:
        return np.full(self.num_timesteps, 1.0 / self.num_timesteps)

    def sample(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None):
        t = torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)
        return t, torch.ones(batch_size, device=device)


class LossSecondMomentResampler(UniformSampler):
    """p(t) proportional to sqrt(E[L_t^2]) over the last `history_per_term` losses of each t, mixed
    with `uniform_prob` of the uniform distribution; uniform until every t has a full history.

    The history is host-side state (updated with all ranks' losses so every rank keeps the same
    distribution) and travels in the module's state_dict as extra state, so it survives resume.
    """

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._history = np.zeros((num_timesteps, history_per_term), dtype=np.float64)
        self._counts = np.zeros(num_timesteps, dtype=np.int64)

    @property
    def warmed_up(self) -> bool:
        return bool((self._counts == self.history_per_term).all())

    def weights(self) -> np.ndarray:
        if not self.warmed_up:
            return super().weights()
        w = np.sqrt(np.mean(self._history**2, axis=-1))
        w /= w.sum()
        return w * (1.0 - self.uniform_prob) + self.uniform_prob / len(w)

    def sample(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None):
        p = torch.from_numpy(self.weights()).to(device=device, dtype=torch.float32)
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t, weights

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-example losses [N] at timesteps t [N] (pass the losses of all ranks)."""
        for ti, loss in zip(t.detach().cpu().tolist(), losses.detach().float().cpu().tolist()):
            if self._counts[ti] == self.history_per_term:
                self._history[ti, :-1] = self._history[ti, 1:]  # drop the oldest
                self._history[ti, -1] = loss
            else:
                self._history[ti, self._counts[ti]] = loss
                self._counts[ti] += 1

    def get_extra_state(self) -> dict:
        return {"history": torch.from_numpy(self._history.copy()), "counts": torch.from_numpy(self._counts.copy())}

    def set_extra_state(self, state: dict) -> None:
        history, counts = state["history"].numpy(), state["counts"].numpy()
        if history.shape != self._history.shape:
            raise ValueError(
                f"timestep sampler history has shape {history.shape}, expected "
                f"{self._history.shape}: the checkpoint was trained with another T"
            )
        self._history, self._counts = history.astype(np.float64), counts.astype(np.int64)

"""Strided sampling (improved DDPM Sec. 4): a diffusion over a subsequence of the training timesteps.

For kept steps S = {s_1 < ... < s_K} the respaced process uses beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}},
so its alphas_cumprod equal the original ones at the kept steps; the network is still called with the
original timestep s_k.
"""
import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion, Model


def space_timesteps(num_timesteps: int, spacing: str | int | list[int]) -> list[int]:
    """The sorted 0-based timesteps to keep.

    spacing:
        int or "N" / "uniform:N": N steps evenly strided over [0, T) (improved-diffusion's sections);
        "ddimN": improved-diffusion's "ddimN": range(0, T, stride) with the smallest stride that gives
            exactly N steps (stride T // N when N divides T, as diffusers' "leading" spacing with
            steps_offset=0; otherwise the two differ and a list reproduces diffusers);
        "quadN": DDIM's quadratic spacing int(linspace(0, sqrt(0.8 T), N)^2), denser at small t;
        "10,20,30": improved-diffusion sections: T is cut into equal sections with that many evenly
            strided steps each;
        a list of ints: those timesteps.
    """
    if isinstance(spacing, (list, tuple)):
        steps = sorted({int(s) for s in spacing})
        if not steps or steps[0] < 0 or steps[-1] >= num_timesteps:
            raise ValueError(f"timesteps must lie in [0, {num_timesteps}), got {spacing}")
        return steps
    text = str(spacing).strip().lower()
    if text.startswith("uniform:"):
        text = text[len("uniform:"):]
    if text.startswith("ddim"):
        n = _positive_int(text[4:], spacing, num_timesteps)
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == n:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot take exactly {n} equally strided steps of T={num_timesteps} ('ddim{n}'); "
                         f"use '{n}' (improved-diffusion's even spacing) instead")
    if text.startswith("quad"):
        n = _positive_int(text[4:], spacing, num_timesteps)
        # DDIM's formula verbatim (numpy's linspace), so the steps match its runs to the integer.
        steps = [int(s) for s in np.linspace(0, np.sqrt(num_timesteps * 0.8), n) ** 2]
        if len(set(steps)) != n:
            raise ValueError(f"quadratic spacing with {n} steps repeats timesteps at T={num_timesteps}; use fewer")
        return steps
    counts = [_positive_int(part, spacing, num_timesteps) for part in text.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    steps, start = [], 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps (spacing {spacing!r})")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        # Accumulate the fractional index as improved-diffusion does: its float sums decide the
        # half-way roundings (round(stride * j) picks a different step for ~30% of the counts).
        index = 0.0
        for _ in range(count):
            steps.append(start + round(index))
            index += stride
        start += size
    return steps


def _positive_int(text: str, spacing, num_timesteps: int) -> int:
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"unknown timestep spacing {spacing!r}; use N, 'ddimN', 'quadN' or "
                         f"comma-separated section counts like '10,20'") from None
    if not 1 <= n <= num_timesteps:
        raise ValueError(f"number of sampling steps must be in [1, {num_timesteps}], got {n}")
    return n


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over the kept timesteps of `base`; its methods take 0-based indices into the
    kept steps and call the network with the original timesteps. Learned variances interpolate between
    the respaced beta'_k and beta~'_k, which is what the network's v means after respacing."""

    def __init__(self, base: GaussianDiffusion, timesteps: list[int]):
        abar = base.alphas_cumprod.cpu()
        kept = torch.tensor(sorted(timesteps), dtype=torch.long)
        abar_kept = abar[kept]
        abar_prev = torch.cat([abar.new_ones(1), abar_kept[:-1]])
        super().__init__(1.0 - abar_kept / abar_prev, base.mean_type, base.var_type, base.loss_type)
        self.register_buffer("timestep_map", kept, persistent=False)
        self.to(base.betas.device)

    def wrap(self, model: Model) -> Model:
        timestep_map = self.timestep_map

        def wrapped(xt, t, **kwargs):
            return model(xt, timestep_map[t], **kwargs)

        return wrapped

    # The classifier of classifier guidance sees the original timesteps too.
    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self.wrap(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self.wrap(cond_fn), *args, **kwargs)

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self.wrap(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self.wrap(model), *args, **kwargs)

    def calc_bpd_loop(self, model, *args, **kwargs):
        return super().calc_bpd_loop(self.wrap(model), *args, **kwargs)

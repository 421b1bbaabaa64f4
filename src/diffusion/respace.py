"""Step placement: which training timesteps (or noise levels between them) a sampler visits.

Strided sampling (improved DDPM Sec. 4): for kept steps S = {s_1 < ... < s_K} the respaced process uses
beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}}, so its alphas_cumprod equal the original ones at the kept steps;
the network is still called with the original timestep s_k.

The ODE / SDE solvers also take placements that fall between training timesteps (uniform in logSNR,
Karras sigmas): `log_snr_grid` places them on the continuous-time view, lambda_t = log(alpha_t / sigma_t)
interpolated linearly in t between the T training steps (exact at integer t).
"""

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion, Model

# What each kind of spacing places (the kinds a sampler accepts are listed in its registry entry).
SPACINGS = {
    "even": "improved-diffusion's N evenly strided steps ('N', 'uniform:N', sections '10,20')",
    "ddim": "DDIM's range(0, T, stride) ('ddimN')",
    "quad": "DDIM's quadratic spacing ('quadN')",
    "list": "the listed timesteps",
    "linspace": "N of N + 1 points uniform in t over [0, T - 1], t = 0 dropped ('linspaceN', diffusers' linspace)",
    "trailing": "uniform in t from T - 1 in strides of T / N ('trailingN', as zero-terminal-SNR papers use)",
    "logsnr": "uniform in logSNR lambda_t between t = T - 1 and t = 0 ('logsnrN', DPM-Solver's default)",
    "karras": "Karras et al.'s sigmas, rho = 7, between t = T - 1 and t = 0 ('karrasN', EDM)",
}
INTEGER_SPACINGS = frozenset({"even", "ddim", "quad", "list", "linspace", "trailing"})  # at training timesteps
CONTINUOUS_SPACINGS = frozenset({"logsnr", "karras"})  # between training timesteps: the solvers only
NAMED_SPACINGS = ("linspace", "trailing", "logsnr", "karras", "ddim", "quad")  # a bare name counts `steps`
KARRAS_RHO = 7.0
_SPACING_HELP = (
    "use N, 'ddimN', 'quadN', comma-separated section counts like '10,20', or for the solvers "
    "'linspaceN', 'trailingN', 'logsnrN', 'karrasN'"
)


def spacing_kind(spacing: str | int | list[int] | tuple[int, ...]) -> str:
    """The SPACINGS key of a spacing (its form only; its count is checked where the steps are placed)."""
    if isinstance(spacing, (list, tuple)):
        return "list"
    text = str(spacing).strip().lower()
    for name in NAMED_SPACINGS:
        if text.startswith(name):
            return name
    if text.startswith("uniform:") or all(part.strip().isdigit() for part in text.split(",")):
        return "even"
    raise ValueError(f"unknown timestep spacing {spacing!r}; {_SPACING_HELP}")


def spacing_count(spacing: str) -> int:
    """N of a named spacing such as 'karras10' (a positive integer)."""
    text = str(spacing).strip().lower()
    name = spacing_kind(text)
    return _positive_int(text[len(name) :], spacing, 10**9)


def log_snr(alphas_cumprod: torch.Tensor | np.ndarray) -> np.ndarray:
    """lambda_t = log(alpha_t / sigma_t) = 0.5 log(abar_t / (1 - abar_t)) at the T training steps: [T] float64,
    decreasing in t (DPM-Solver's half-logSNR; the EDM noise level is sigma_t / alpha_t = exp(-lambda_t))."""
    abar = torch.as_tensor(alphas_cumprod).detach().cpu().double().numpy()
    return 0.5 * (np.log(abar) - np.log1p(-abar))


def time_of_log_snr(lam: np.ndarray | float, table: np.ndarray) -> np.ndarray:
    """The continuous timestep t in [0, T - 1] where the interpolated lambda_t equals `lam` (the inverse of
    lambda_t linear in t between training steps; diffusers' _sigma_to_t, which interpolates t in log sigma)."""
    return np.interp(-np.asarray(lam, dtype=np.float64), -table, np.arange(len(table), dtype=np.float64))


def log_snr_grid(
    alphas_cumprod: torch.Tensor | np.ndarray, spacing: str, until: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(times [N], lambdas [N]), ascending in t, of a continuous spacing from timestep `until` (default
    T - 1, i.e. from noise) down to t = 0; a solver evaluates the network at these N points and ends at the
    clean image (lambda = +inf).

    'logsnrN': lambda uniform between lambda_until and lambda_0 (DPM-Solver's default for pixel models;
        diffusers' use_lu_lambdas); 'karrasN': sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) -
        sigma_max^(1/rho)))^rho with sigma = exp(-lambda) (EDM eq. 5, rho = 7; diffusers' use_karras_sigmas).
    """
    table = log_snr(alphas_cumprod)
    until = len(table) - 1 if until is None else until
    if not 0 <= until < len(table):
        raise ValueError(f"until must be in [0, {len(table)}), got {until}")
    kind, n = spacing_kind(spacing), spacing_count(spacing)
    if kind == "logsnr":
        lambdas = np.linspace(table[until], table[0], n)[::-1].copy()  # from the noisiest: reversed to ascending t
    elif kind == "karras":
        sigma_min, sigma_max = np.exp(-table[0]), np.exp(-table[until])
        ramp = np.linspace(0.0, 1.0, n)
        inv_rho_min, inv_rho_max = sigma_min ** (1.0 / KARRAS_RHO), sigma_max ** (1.0 / KARRAS_RHO)
        sigmas = (inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** KARRAS_RHO
        lambdas = -np.log(sigmas)[::-1].copy()
    else:
        raise ValueError(f"spacing {spacing!r} is at training timesteps; place it with space_timesteps")
    if n > 1 and len(np.unique(lambdas)) != n:
        raise ValueError(f"spacing {spacing!r} repeats noise levels from t={until}; use fewer steps")
    return time_of_log_snr(lambdas, table), lambdas


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
        "linspaceN": round(linspace(0, T - 1, N + 1)) without t = 0 (diffusers' "linspace" for its solvers);
        "trailingN": round(arange(T, 0, -T / N)) - 1 (diffusers' / zero-terminal-SNR papers' "trailing");
        a list of ints: those timesteps.
    ('logsnrN' and 'karrasN' fall between training timesteps: `log_snr_grid` places them.)
    """
    if isinstance(spacing, (list, tuple)):
        steps = sorted({int(s) for s in spacing})
        if not steps or steps[0] < 0 or steps[-1] >= num_timesteps:
            raise ValueError(f"timesteps must lie in [0, {num_timesteps}), got {spacing}")
        return steps
    text = str(spacing).strip().lower()
    if text.startswith("uniform:"):
        text = text[len("uniform:") :]
    if text.startswith(tuple(CONTINUOUS_SPACINGS)):
        raise ValueError(
            f"spacing {spacing!r} places steps between training timesteps; only the ODE / SDE "
            f"solvers take it (see log_snr_grid)"
        )
    for prefix, place in PLACED_AT_TIMESTEPS.items():
        if text.startswith(prefix):
            largest = num_timesteps - 1 if prefix == "linspace" else num_timesteps
            return place(_positive_int(text[len(prefix) :], spacing, largest), num_timesteps)
    return _sections([_positive_int(part, spacing, num_timesteps) for part in text.split(",")], num_timesteps, spacing)


def _linspace(n: int, num_timesteps: int) -> list[int]:
    # diffusers' timestep_spacing="linspace" of its multistep solvers: N + 1 points from 0 to T - 1, the
    # first (t = 0) dropped, as the run ends at the clean image after the lowest kept step.
    steps = np.linspace(0, num_timesteps - 1, n + 1).round()[1:].astype(np.int64).tolist()
    if len(set(steps)) != n:
        raise ValueError(f"'linspace{n}' repeats timesteps at T={num_timesteps}; use fewer steps")
    return steps


def _trailing(n: int, num_timesteps: int) -> list[int]:
    # diffusers' (and Lin et al. 2024, Table 2's) "trailing": from T - 1 down in strides of T / N.
    steps = sorted((np.arange(num_timesteps, 0, -num_timesteps / n).round() - 1).astype(np.int64).tolist())
    if len(set(steps)) != n or steps[0] < 0:
        raise ValueError(f"'trailing{n}' does not give {n} distinct timesteps at T={num_timesteps}; use fewer")
    return steps


def _ddim(n: int, num_timesteps: int) -> list[int]:
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == n:
            return list(range(0, num_timesteps, stride))
    raise ValueError(
        f"cannot take exactly {n} equally strided steps of T={num_timesteps} ('ddim{n}'); "
        f"use '{n}' (improved-diffusion's even spacing) instead"
    )


def _quad(n: int, num_timesteps: int) -> list[int]:
    # DDIM's formula verbatim (numpy's linspace), so the steps match its runs to the integer.
    steps = [int(s) for s in np.linspace(0, np.sqrt(num_timesteps * 0.8), n) ** 2]
    if len(set(steps)) != n:
        raise ValueError(f"quadratic spacing with {n} steps repeats timesteps at T={num_timesteps}; use fewer")
    return steps


def _sections(counts: list[int], num_timesteps: int, spacing) -> list[int]:
    """improved-diffusion's sections: T cut into len(counts) equal sections with counts[i] even steps each."""
    if counts == [1]:
        # improved-diffusion keeps t = 0 here: a reverse run that starts from noise at the cleanest step. The
        # one step of a one-step process goes from T - 1 to 0.
        return [num_timesteps - 1]
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


# Spacings at training timesteps named by a prefix and a step count ("ddim50"); anything else is read as
# improved-diffusion's sections.
PLACED_AT_TIMESTEPS = {"linspace": _linspace, "trailing": _trailing, "ddim": _ddim, "quad": _quad}


def _positive_int(text: str, spacing, num_timesteps: int) -> int:
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"unknown timestep spacing {spacing!r}; {_SPACING_HELP}") from None
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
        super().__init__(
            1.0 - abar_kept / abar_prev,
            base.mean_type,
            base.var_type,
            base.loss_type,
            base.loss_weighting,
            base.min_snr_gamma,
            base.p2_gamma,
            base.p2_k,
        )
        if isinstance(base, SpacedDiffusion):  # kept indexes base's steps: the network needs the original ones
            kept = base.timestep_map.cpu()[kept]
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

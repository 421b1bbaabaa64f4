"""Gaussian diffusion: forward process, posterior, model parameterisations and reverse steps; the losses and the
NLL bound are its methods too, written in losses.py.

Notation follows Ho et al. 2020 and Nichol & Dhariwal 2021; timesteps are 0-based (t = 0..T-1 stands
for the papers' 1..T). Pure torch: the network is an argument (`model(x_t, t, **model_kwargs)`).
"""

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from .losses import DiffusionLosses, LossType, LossWeighting, Model, loss_weights
from .schedules import schedule_buffers

MeanType = Literal["eps", "x0", "mu", "v"]
VarType = Literal["fixed_small", "fixed_large", "learned_range"]
ThresholdType = Literal["none", "clip", "dynamic"]


def _check_choice(name: str, value: str, literal) -> None:
    choices = get_args(literal)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def _check_options(mean_type, var_type, loss_type, loss_weighting, min_snr_gamma, p2_gamma, p2_k) -> None:
    """GaussianDiffusion's options (see there) name known choices and make a loss that trains every output."""
    _check_choice("mean_type", mean_type, MeanType)
    _check_choice("var_type", var_type, VarType)
    _check_choice("loss_type", loss_type, LossType)
    _check_choice("loss_weighting", loss_weighting, LossWeighting)
    if loss_weighting != "none" and loss_type == "vlb":
        raise ValueError(
            f"loss_weighting={loss_weighting!r} weights the MSE term, which loss_type='vlb' does not "
            f"have; use loss_type='simple' or 'hybrid', or loss_weighting='none'"
        )
    if loss_weighting != "none" and mean_type == "mu":
        raise ValueError(
            f"loss_weighting={loss_weighting!r} is defined for mean_type eps, x0 or v, not 'mu'; use "
            f"one of those or loss_weighting='none'"
        )
    if not min_snr_gamma > 0 or not p2_k > 0 or not p2_gamma >= 0:
        raise ValueError(
            f"need min_snr_gamma > 0, p2_k > 0 and p2_gamma >= 0; got min_snr_gamma={min_snr_gamma}, "
            f"p2_k={p2_k}, p2_gamma={p2_gamma}"
        )
    if loss_type == "simple" and var_type == "learned_range":
        raise ValueError(
            "loss_type='simple' gives the learned variance no training signal; use "
            "loss_type='hybrid' or 'vlb' with var_type='learned_range'"
        )


@dataclass(frozen=True)
class Threshold:
    """How a sampler bounds each predicted x_0 [N x C x ...]: "none"; "clip" to [-1, 1]; "dynamic" (Imagen,
    Saharia et al. 2022, Sec. 2.3): per sample s = max(1, the `percentile` quantile of |x_0|), x_0 clipped to
    [-s, s] and divided by s."""

    kind: ThresholdType = "clip"
    percentile: float = 0.995

    def __post_init__(self):
        _check_choice("threshold", self.kind, ThresholdType)
        if (
            isinstance(self.percentile, bool)
            or not isinstance(self.percentile, (int, float))
            or not 0 < self.percentile <= 1
        ):
            raise ValueError(f"threshold_percentile must be a number in (0, 1], got {self.percentile!r}")

    @classmethod
    def of(cls, clip_denoised: "bool | Threshold") -> "Threshold":
        """A Threshold as given, or the bool clip_denoised: True is "clip", False "none"."""
        return clip_denoised if isinstance(clip_denoised, Threshold) else cls("clip" if clip_denoised else "none")

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return x0
        if self.kind == "clip":
            return x0.clamp(-1.0, 1.0)
        # 1. s = the percentile of |x_0| per sample, at least 1 (images already in range are left as they are)
        s = torch.quantile(x0.flatten(1).abs(), self.percentile, dim=1).clamp(min=1.0)
        s = s.view(-1, *([1] * (x0.ndim - 1)))
        # 2. clip to [-s, s] and rescale to [-1, 1]
        return torch.maximum(torch.minimum(x0, s), -s) / s


class GaussianDiffusion(DiffusionLosses, nn.Module):
    """The diffusion math for a fixed beta schedule.

    Args:
        betas: [T] noise schedule (any float dtype; stored as float64).
        mean_type: what the network predicts: the noise "eps", the clean image "x0", the posterior
            mean "mu" of q(x_{t-1} | x_t, x_0) (DDPM Table 2), or the velocity "v" = alpha_t eps - sigma_t x_0
            with alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) (Salimans & Ho 2022, Sec. 4).
        var_type: reverse-process variance: "fixed_small" (posterior variance beta~_t),
            "fixed_large" (beta_t, with beta~_1 at t=0 so the decoder likelihood is finite), or
            "learned_range" (the network outputs v in [-1, 1] per pixel as a second block of C
            channels; log sigma^2 = frac log beta_t + (1 - frac) log beta~_t with frac = (v + 1) / 2).
        loss_type: "simple" (MSE on the parameterised target), "vlb" (the variational bound, T times
            the per-step term so it estimates L_vlb in bits/dim), or "hybrid" (simple + T/1000 times
            the per-step vb term with the mean's gradient stopped, improved DDPM's lambda = 0.001).
        loss_weighting: a per-timestep weight w_t of the MSE term of "simple" and "hybrid" (the vb term stays
            unweighted), as a function of SNR_t = abar_t / (1 - abar_t) (`loss_weights` holds w_t [T]):
            "none" (w_t = 1); "min_snr", min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR on eps,
            min(SNR, gamma) on x0, min(SNR, gamma) / (SNR + 1) on v; "p2" (Choi et al. 2022, eq. 8 on L_simple):
            1 / (k + SNR)^gamma on eps, times SNR on x0 and SNR / (SNR + 1) on v (the same loss: the squared eps
            error is SNR times the x0 error and SNR / (SNR + 1) times the v error at fixed x_t). Both are
            defined for eps, x0 and v; mean_type mu is refused.
        min_snr_gamma: gamma of "min_snr" (> 0; the paper's 5).
        p2_gamma, p2_k: gamma (>= 0) and k (> 0) of "p2" (the paper's 1 and 1).

    Schedule tensors are non-persistent float64 buffers: they follow the module's device, stay out of
    checkpoints (they are derived from the config) and never reach an EMA of the network.
    """

    def __init__(
        self,
        betas: torch.Tensor,
        mean_type: MeanType = "eps",
        var_type: VarType = "fixed_large",
        loss_type: LossType = "simple",
        loss_weighting: LossWeighting = "none",
        min_snr_gamma: float = 5.0,
        p2_gamma: float = 1.0,
        p2_k: float = 1.0,
    ):
        super().__init__()
        _check_options(mean_type, var_type, loss_type, loss_weighting, min_snr_gamma, p2_gamma, p2_k)
        self.mean_type, self.var_type, self.loss_type = mean_type, var_type, loss_type
        self.loss_weighting, self.min_snr_gamma = loss_weighting, float(min_snr_gamma)
        self.p2_gamma, self.p2_k = float(p2_gamma), float(p2_k)

        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a 1-D tensor with at least 1 step, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.num_timesteps = int(betas.numel())

        buffers = schedule_buffers(betas)
        abar = buffers["alphas_cumprod"]
        if mean_type in ("eps", "mu") and not bool((abar > 0).all()):
            # x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) divides by zero where abar = 0 (SNR 0)
            first = int((abar == 0).nonzero()[0])
            raise ValueError(
                f"alphas_cumprod reaches 0 at t={first} (beta_t = 1): mean_type={mean_type!r} is undefined "
                f"at SNR 0; use mean_type='v' or 'x0' (or betas below 1)"
            )
        buffers["loss_weights"] = loss_weights(
            abar, mean_type, loss_weighting, self.min_snr_gamma, self.p2_gamma, self.p2_k
        )
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)

    def _apply(self, fn, recurse=True):
        # Keep the schedule in float64 when the module is cast (e.g. .half() or precision="bf16-true"):
        # only device moves apply to it, taken from the saved originals so no precision is lost.
        saved = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, original in saved.items():
            if original is not None:
                self._buffers[name] = original.to(device=self._buffers[name].device)
        return self

    @property
    def learns_variance(self) -> bool:
        return self.var_type == "learned_range"

    def extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Gather schedule value `name` at timesteps t [N] and shape it [N, 1, ..., 1] to broadcast
        against `like`, in like's precision (at least float32)."""
        values = getattr(self, name)[t]
        dtype = torch.promote_types(like.dtype, torch.float32)
        return values.to(dtype).view(-1, *([1] * (like.ndim - 1)))

    # --- forward process ---------------------------------------------------------------------
    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log variance of q(x_t | x_0) (DDPM eq. 4)."""
        mean = self.extract("sqrt_alphas_cumprod", t, x0) * x0
        variance = (1.0 - self.extract("alphas_cumprod", t, x0)).expand_as(x0)
        log_variance = self.extract("log_one_minus_alphas_cumprod", t, x0).expand_as(x0)
        return mean, variance, log_variance

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I): [N x C x H x W]."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (
            self.extract("sqrt_alphas_cumprod", t, x0) * x0
            + self.extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def q_posterior_mean_variance(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7)."""
        mean = self.extract("posterior_mean_coef1", t, xt) * x0 + self.extract("posterior_mean_coef2", t, xt) * xt
        variance = self.extract("posterior_variance", t, xt).expand_as(xt)
        log_variance = self.extract("posterior_log_variance_clipped", t, xt).expand_as(xt)
        return mean, variance, log_variance

    # --- parameterisations -------------------------------------------------------------------
    def predict_x0_from_eps(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (
            self.extract("sqrt_recip_alphas_cumprod", t, xt) * xt
            - self.extract("sqrt_recipm1_alphas_cumprod", t, xt) * eps
        )

    def predict_eps_from_x0(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1 / abar_t - 1); at abar_t = 0 (zero terminal SNR) x_t is eps."""
        eps = (self.extract("sqrt_recip_alphas_cumprod", t, xt) * xt - x0) / self.extract(
            "sqrt_recipm1_alphas_cumprod", t, xt
        )
        return torch.where(self.extract("alphas_cumprod", t, xt) == 0, xt, eps)

    def predict_x0_from_v(self, xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x_0 = alpha_t x_t - sigma_t v (Salimans & Ho 2022, Sec. 4; finite at abar_t = 0)."""
        return (
            self.extract("sqrt_alphas_cumprod", t, xt) * xt - self.extract("sqrt_one_minus_alphas_cumprod", t, xt) * v
        )

    def predict_eps_from_v(self, xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps = sigma_t x_t + alpha_t v."""
        return (
            self.extract("sqrt_one_minus_alphas_cumprod", t, xt) * xt + self.extract("sqrt_alphas_cumprod", t, xt) * v
        )

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = alpha_t eps - sigma_t x_0, the velocity target of x_t = alpha_t x_0 + sigma_t eps: [N x C x ...]."""
        return (
            self.extract("sqrt_alphas_cumprod", t, x0) * noise
            - self.extract("sqrt_one_minus_alphas_cumprod", t, x0) * x0
        )

    def predict_x0_from_mu(self, xt: torch.Tensor, t: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """Invert the posterior mean: x_0 = (mu - coef2 x_t) / coef1."""
        return (mu - self.extract("posterior_mean_coef2", t, xt) * xt) / self.extract("posterior_mean_coef1", t, xt)

    def split_model_output(self, output: torch.Tensor, xt: torch.Tensor):
        """Split the network output into (mean part [N x C x ...], v [N x C x ...] or None)."""
        channels = xt.shape[1]
        expected = 2 * channels if self.learns_variance else channels
        if output.shape[1] != expected:
            hint = " (var_type='learned_range' needs out_channels = 2 * image channels)" if self.learns_variance else ""
            raise ValueError(
                f"model returned {output.shape[1]} channels for {channels}-channel images "
                f"with var_type={self.var_type!r}; expected {expected}{hint}"
            )
        if self.learns_variance:
            return output[:, :channels], output[:, channels:]
        return output, None

    def p_mean_variance_from_output(
        self, output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, clip_denoised: bool | Threshold = True
    ) -> dict:
        """p(x_{t-1} | x_t) given the raw network output [N x C(2C) x ...]. clip_denoised: a Threshold applied to
        the predicted x_0, or True ("clip" to [-1, 1]) / False ("none").

        Returns dict(mean, variance, log_variance, pred_x0, pred_eps). Computed in float32 or better
        so the log variance is safe under mixed precision.
        """
        output = output.to(torch.promote_types(output.dtype, torch.float32))
        mean_out, v = self.split_model_output(output, xt)

        # 1. variance
        if self.var_type == "learned_range":
            min_log = self.extract("posterior_log_variance_clipped", t, xt)
            max_log = self.extract("log_betas", t, xt)
            frac = (v + 1.0) / 2.0  # v in [-1, 1] -> [0, 1]; interpolate in log space (IDDPM eq. 15)
            log_variance = frac * max_log + (1.0 - frac) * min_log
            variance = torch.exp(log_variance)
        elif self.var_type == "fixed_large":
            variance = self.extract("large_variance", t, xt).expand_as(xt)
            log_variance = self.extract("large_log_variance", t, xt).expand_as(xt)
        else:  # fixed_small
            variance = self.extract("posterior_variance", t, xt).expand_as(xt)
            log_variance = self.extract("posterior_log_variance_clipped", t, xt).expand_as(xt)

        # 2. predicted x_0 (eq. 15 for eps; x_0 = alpha_t x_t - sigma_t v for v), thresholded to the data range when
        #    sampling (clip or dynamic)
        if self.mean_type == "eps":
            pred_x0 = self.predict_x0_from_eps(xt, t, mean_out)
        elif self.mean_type == "x0":
            pred_x0 = mean_out
        elif self.mean_type == "v":
            pred_x0 = self.predict_x0_from_v(xt, t, mean_out)
        else:  # mu
            pred_x0 = self.predict_x0_from_mu(xt, t, mean_out)
        pred_x0 = Threshold.of(clip_denoised)(pred_x0)

        # 3. mean: the posterior mean at the predicted x_0 (eq. 7), or the network's mu directly
        if self.mean_type == "mu":
            mean = mean_out
        else:
            mean, _, _ = self.q_posterior_mean_variance(pred_x0, xt, t)
        pred_eps = mean_out if self.mean_type == "eps" else self.predict_eps_from_x0(xt, t, pred_x0)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_x0": pred_x0,
            "pred_eps": pred_eps,
        }

    def p_mean_variance(
        self,
        model: Model,
        xt: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
    ) -> dict:
        """Run the network and return p(x_{t-1} | x_t): dict(mean, variance, log_variance, pred_x0, pred_eps)."""
        output = model(xt, t, **(model_kwargs or {}))
        return self.p_mean_variance_from_output(output, xt, t, clip_denoised)

    def condition_mean(self, cond_fn, out: dict, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Classifier guidance of the ancestral step (Dhariwal & Nichol 2021, Alg. 1): the mean shifted by
        Sigma * cond_fn(x_t, t), where cond_fn returns s * grad_x log p(y | x_t)."""
        return out["mean"] + out["variance"] * cond_fn(xt, t)

    def condition_score(self, cond_fn, out: dict, xt: torch.Tensor, t: torch.Tensor) -> dict:
        """Classifier guidance of the DDIM step (Dhariwal & Nichol 2021, Alg. 2): eps - sqrt(1 - abar_t) *
        cond_fn(x_t, t), with pred_x0 and the mean recomputed from the shifted eps."""
        eps = self.predict_eps_from_x0(xt, t, out["pred_x0"])
        eps = eps - self.extract("sqrt_one_minus_alphas_cumprod", t, xt) * cond_fn(xt, t)
        pred_x0 = self.predict_x0_from_eps(xt, t, eps)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, xt, t)
        return {**out, "mean": mean, "pred_x0": pred_x0, "pred_eps": eps}

    def p_sample(
        self,
        model: Model,
        xt: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
        cond_fn=None,
    ) -> dict:
        """One ancestral step x_t -> x_{t-1} = mean + sigma_t z (no noise at t=0). Returns dict(sample, pred_x0).
        cond_fn(x_t, t) (classifier guidance) shifts the mean, see `condition_mean`."""
        out = self.p_mean_variance(model, xt, t, clip_denoised, model_kwargs)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, xt, t)
        nonzero = (t != 0).to(xt.dtype).view(-1, *([1] * (xt.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_x0": out["pred_x0"]}

    def ddim_step(
        self,
        model: Model,
        xt: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None,
        eta: float = 0.0,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
        cond_fn=None,
    ) -> dict:
        """One DDIM step x_t -> x_{t-1} (Song et al. 2020, eq. 12). eta=0 is deterministic; eta=1 uses
        the DDPM posterior variance beta~_t. Returns dict(sample, pred_x0). cond_fn(x_t, t) (classifier
        guidance) shifts eps, see `condition_score`."""
        out = self.p_mean_variance(model, xt, t, clip_denoised, model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, xt, t)
        # 1. eps consistent with the (clipped) predicted x_0
        eps = self.predict_eps_from_x0(xt, t, out["pred_x0"])
        abar = self.extract("alphas_cumprod", t, xt)
        abar_prev = self.extract("alphas_cumprod_prev", t, xt)
        # 2. sigma_t(eta) = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        # 3. x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z
        sample = abar_prev.sqrt() * out["pred_x0"] + torch.sqrt((1 - abar_prev - sigma**2).clamp(min=0)) * eps
        if eta > 0:
            nonzero = (t != 0).to(xt.dtype).view(-1, *([1] * (xt.ndim - 1)))
            sample = sample + nonzero * sigma * noise
        return {"sample": sample, "pred_x0": out["pred_x0"]}

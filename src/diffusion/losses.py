"""The training losses and the variational bound of GaussianDiffusion, a mixin of it: the MSE on each
parameterisation's target with its per-timestep weight (min-SNR, P2), the per-step bound term L_t and the whole
bound on -log p(x_0) in bits/dim (DDPM eq. 5, improved DDPM Sec. 3.1-3.2).

GaussianDiffusion provides the schedule buffers, the forward process, the posterior and the parameterisations
these methods use; the network is an argument.
"""

from collections.abc import Callable
from typing import Literal

import torch

from .likelihoods import LOG2, discretized_gaussian_log_likelihood, mean_flat, normal_kl

LossType = Literal["simple", "vlb", "hybrid"]
LossWeighting = Literal["none", "min_snr", "p2"]
# The network: model(x_t [N x C x ...], t [N], **model_kwargs) -> [N x C x ...] (2C with a learned variance).
Model = Callable[..., torch.Tensor]


def loss_weights(
    alphas_cumprod: torch.Tensor,
    mean_type: str,
    loss_weighting: LossWeighting,
    min_snr_gamma: float,
    p2_gamma: float,
    p2_k: float,
) -> torch.Tensor:
    """w_t [T] of `loss_weighting` for this mean_type (see GaussianDiffusion); finite at abar_t = 0 (SNR 0) for x0
    and v."""
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    if loss_weighting == "none":
        return torch.ones_like(snr)
    if loss_weighting == "min_snr":
        # 1. min(SNR, gamma) on x0; divided by SNR on eps and by SNR + 1 on v (Hang et al. 2023, Sec. 3.4)
        clipped = snr.clamp(max=min_snr_gamma)
        return {"eps": clipped / snr, "x0": clipped, "v": clipped * (1.0 - alphas_cumprod)}[mean_type]
    # 2. P2 (Choi et al. 2022, eq. 8): 1 / (k + SNR)^gamma on the eps MSE, converted to x0 (x SNR) and v
    #    (x SNR / (SNR + 1) = abar)
    p2 = (p2_k + snr) ** -p2_gamma
    return {"eps": p2, "x0": snr * p2, "v": alphas_cumprod * p2}[mean_type]


class DiffusionLosses:
    """The losses and the likelihood of GaussianDiffusion (its only user, which mixes them in)."""

    def vb_terms_bpd(
        self, output: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> dict:
        """Per-step variational bound term in bits/dim [N]: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
        for t > 0 and the discretized Gaussian decoder NLL -log p(x_0|x_1) at t = 0 (DDPM eq. 5)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, xt, t)
        out = self.p_mean_variance_from_output(output, xt, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / LOG2
        decoder_nll = (
            -mean_flat(discretized_gaussian_log_likelihood(x0, means=out["mean"], log_scales=0.5 * out["log_variance"]))
            / LOG2
        )
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_x0": out["pred_x0"]}

    def training_losses(
        self,
        model: Model,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        model_kwargs: dict | None = None,
    ) -> dict:
        """Per-example losses for x0 [N x C x H x W] in [-1, 1] at timesteps t [N].

        Returns dict(loss [N], mse [N], vb [N]); mse is unweighted (loss holds w_t mse, see loss_weighting); vb is
        the per-step bound term in bits/dim (computed without gradient when the loss does not use it, so it can
        always be logged).
        """
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        output = model(xt, t, **(model_kwargs or {}))
        output = output.to(torch.promote_types(output.dtype, torch.float32))
        mean_out, v = self.split_model_output(output, xt)

        if self.mean_type == "eps":
            target = noise
        elif self.mean_type == "x0":
            target = x0
        elif self.mean_type == "v":
            target = self.v_target(x0, t, noise)
        else:  # mu
            target, _, _ = self.q_posterior_mean_variance(x0, xt, t)
        mse = mean_flat((target - mean_out) ** 2)
        weighted = mse if self.loss_weighting == "none" else self.loss_weights[t].to(mse.dtype) * mse

        if self.loss_type == "simple":
            with torch.no_grad():
                vb = self.vb_terms_bpd(output.detach(), x0, xt, t)["output"]
            loss = weighted
        elif self.loss_type == "hybrid":
            # Stop the gradient of the mean inside the vb term: L_vlb trains only the variance.
            frozen = torch.cat([mean_out.detach(), v], dim=1) if v is not None else output.detach()
            vb = self.vb_terms_bpd(frozen, x0, xt, t)["output"]
            loss = weighted + vb * (self.num_timesteps / 1000.0)
        else:  # vlb: T * E_t[L_t] estimates the whole bound in bits/dim
            vb = self.vb_terms_bpd(output, x0, xt, t)["output"]
            loss = vb * self.num_timesteps
        return {"loss": loss, "mse": mse, "vb": vb}

    # --- likelihood --------------------------------------------------------------------------
    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits/dim [N]: the L_T term, ~0 for a good schedule."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x0, t)
        return mean_flat(normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(mean))) / LOG2

    @torch.no_grad()
    def calc_bpd_loop(
        self,
        model: Model,
        x0: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> dict:
        """The full-T variational bound on -log p(x_0) in bits/dim.

        Returns dict(total_bpd [N], prior_bpd [N], vb [N x T], xstart_mse [N x T], mse [N x T]);
        total_bpd = sum_t vb[:, t] + prior_bpd, with vb[:, 0] the decoder NLL L_0.
        """
        n, num_t = x0.shape[0], self.num_timesteps
        vb, xstart_mse, mse = (x0.new_zeros(n, num_t, dtype=torch.float32) for _ in range(3))
        steps = range(num_t - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="bpd", leave=False)
        for i in steps:
            t = torch.full((n,), i, device=x0.device, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            xt = self.q_sample(x0, t, noise)
            output = model(xt, t, **(model_kwargs or {}))
            terms = self.vb_terms_bpd(output, x0, xt, t, clip_denoised=clip_denoised)
            vb[:, i] = terms["output"]
            xstart_mse[:, i] = mean_flat((terms["pred_x0"] - x0) ** 2)
            mse[:, i] = mean_flat((self.predict_eps_from_x0(xt, t, terms["pred_x0"]) - noise) ** 2)
        prior = self.prior_bpd(x0)
        return {"total_bpd": vb.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb, "xstart_mse": xstart_mse, "mse": mse}

"""Numerics at the edges: tails of the decoder, one-step processes, nested respacing, the EMA in bf16."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

from src.diffusion import discretized_gaussian_log_likelihood


@pytest.mark.parametrize("z", [-5.0, -6.0, -7.0, -8.0, 5.0, 8.0])
def test_interior_bins_of_the_decoder_are_accurate_in_the_tails(z):
    # An interior pixel z standard deviations from the mean; the bin is half a standard deviation wide.
    width = 2.0 / 255.0
    scale = 2 * width
    x = torch.full((1, 4), 10 / 127.5 - 1)  # pixel value 10: an interior bin
    means = x - z * scale
    log_p = discretized_gaussian_log_likelihood(x, means, torch.full_like(x, np.log(scale)), bin_width=width)
    assert log_p.dtype == torch.float32
    z64 = (x.double() - means.double()) / scale  # z as rounded to float32 inputs
    upper, lower = z64 + width / 2 / scale, z64 - width / 2 / scale
    expected = (
        np.log(norm.cdf(upper.numpy()) - norm.cdf(lower.numpy()))
        if z < 0
        else np.log(norm.sf(lower.numpy()) - norm.sf(upper.numpy()))
    )
    # relative error of the bin's probability
    assert np.abs(np.expm1(log_p.double().numpy() - expected)).max() < 1e-4


def _recording_net(seen: list):
    def net(xt, t, **kwargs):
        seen.append(t.tolist())
        return torch.zeros_like(xt)  # eps = 0: x0 = x_t / sqrt(abar)

    return net


def test_one_step_processes_run_from_the_last_step_to_0():
    from src.diffusion import GaussianDiffusion, SamplerOptions, make_beta_schedule, sample
    from src.diffusion.editing import ddim_invert
    from src.diffusion.reverse_process import denoise_from

    diffusion = GaussianDiffusion(make_beta_schedule("linear", 50))
    seen = []
    for sampler in ("ddpm", "ddim"):
        seen.clear()
        images = sample(diffusion, _recording_net(seen), (2, 1, 4, 4), SamplerOptions(sampler=sampler, steps=1))
        assert seen == [[49, 49]] and bool(torch.isfinite(images).all())  # one step, from T - 1
    seen.clear()
    xt = torch.rand(2, 1, 4, 4) - 0.5
    abar0 = diffusion.alphas_cumprod[0].float()
    assert torch.allclose(denoise_from(diffusion, _recording_net(seen), xt, 0), xt / abar0.sqrt())
    assert seen == [[0, 0]]
    seen.clear()
    x0 = torch.rand(2, 1, 4, 4) - 0.5
    options = SamplerOptions(sampler="ddim", steps=1, clip_denoised=False)
    latent = ddim_invert(diffusion, _recording_net(seen), x0, options)
    assert seen == [[49, 49]]
    assert torch.allclose(latent, diffusion.alphas_cumprod[49].float().sqrt() * x0)  # eps = 0: x0 scaled down


def test_respacing_a_respaced_diffusion_calls_the_net_with_the_original_timesteps():
    from src.diffusion import GaussianDiffusion, make_beta_schedule
    from src.diffusion.respace import SpacedDiffusion

    base = GaussianDiffusion(make_beta_schedule("linear", 100))
    outer = SpacedDiffusion(base, list(range(0, 100, 10)))  # 0, 10, ..., 90
    inner = SpacedDiffusion(outer, [0, 3, 9])  # outer's steps 0, 3, 9: original 0, 30, 90
    assert inner.timestep_map.tolist() == [0, 30, 90]
    direct = SpacedDiffusion(base, [0, 30, 90])
    assert torch.allclose(inner.betas, direct.betas)
    seen = []
    xt = torch.zeros(3, 1, 2, 2)
    inner.p_mean_variance(_recording_net(seen), xt, torch.tensor([0, 1, 2]))
    assert seen == [[0, 30, 90]]


def test_the_ema_of_a_bf16_module_moves_as_in_float32():
    from torch import nn

    from src.lit.ema import EMA

    net = nn.Linear(4, 4).to(torch.bfloat16)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    ema = EMA(net, decay=0.999, warmup=False)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
    for _ in range(1000):
        ema.update(net)
    expected = 1.0 - 0.999**1000  # 0.632; a bf16 lerp stalls near 0.25
    for p in ema.model.parameters():
        assert p.dtype == torch.bfloat16
        assert torch.allclose(p.float(), torch.full_like(p.float(), expected), atol=4e-3)
    restored = EMA(net, decay=0.999, warmup=False)
    restored.load_state_dict(ema.state_dict())  # the float32 average travels with the checkpoint
    restored.update(net)
    ema.update(net)
    for a, b in zip(restored.model.parameters(), ema.model.parameters()):
        assert torch.equal(a, b)

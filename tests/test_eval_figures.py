"""DDPM Fig. 5 (rate-distortion) and the bound's terms per timestep, from the NLL pass's terms."""

import json

import numpy as np
import pytest

from src.evaluation.figures import bound_terms, rate_distortion, write_figures


def synthetic_terms(n: int = 3, num_t: int = 6) -> dict:
    rng = np.random.default_rng(0)
    vb = rng.uniform(0.01, 0.5, size=(n, num_t))
    xstart_mse = np.linspace(0.001, 0.5, num_t)[None, :] * rng.uniform(0.9, 1.1, size=(n, 1))  # more noise, worse x0
    return {
        "vb": vb,
        "xstart_mse": xstart_mse,
        "prior_bpd": np.full(n, 0.002),
        "total_bpd": vb.sum(1) + 0.002,
        "mse": xstart_mse,
    }


def test_rate_is_the_prior_plus_the_terms_after_t_and_distortion_the_rmse_on_255():
    terms = synthetic_terms()
    data = rate_distortion(terms)
    vb = terms["vb"].mean(0)
    assert data["rate_bpd"][-1] == pytest.approx(0.002)  # holding x_{T-1}: only the prior was sent
    assert data["rate_bpd"][0] == pytest.approx(0.002 + vb[1:].sum())
    assert data["lossless_bpd"] == pytest.approx(terms["total_bpd"].mean())
    assert data["distortion_rmse"][2] == pytest.approx(127.5 * np.sqrt(terms["xstart_mse"][:, 2].mean()))
    # as t goes to 0, the rate rises and the distortion falls
    assert np.all(np.diff(data["rate_bpd"]) <= 0) and np.all(np.diff(data["distortion_rmse"]) > 0)
    assert bound_terms(terms)["vb_bpd"] == pytest.approx(vb.tolist())


def test_figures_are_written_as_png_and_json(tmp_path):
    written = write_figures(synthetic_terms(), tmp_path, "", rate_distortion_too=True)
    for name in ("bound_terms", "rate_distortion"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and written[name].endswith(".png")
        assert len(json.loads((tmp_path / f"{name}.json").read_text())["t"]) == 6
    assert set(write_figures(synthetic_terms(), tmp_path, "_null_label", rate_distortion_too=False)) == {"bound_terms"}

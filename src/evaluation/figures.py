"""The DDPM paper's figures from the per-timestep terms of the NLL pass (src.evaluation.nll.nll_terms).

- Rate-distortion (Ho et al. 2020, Fig. 5 and Sec. 4.3, progressive coding): a receiver that holds x_t has
  been sent x_{T-1} (0-based t here; the prior term L_T) and then each x_{s-1} given x_s for s = T-1 .. t+1,
  so rate(t) = L_T + sum_{s > t} L_s in bits/dim; the distortion is the RMSE of the x_0 it predicts from x_t,
  on the [0, 255] scale. Rate rises and distortion falls as t goes to 0.
- The bound's terms per timestep (Nichol & Dhariwal 2021, Fig. 2): L_t in bits/dim against t; the first few
  steps carry most of the bound.
Each is written as a PNG (matplotlib) and its numbers as JSON.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from src.atomic import write_bytes as atomic_write_bytes
from src.atomic import write_text as atomic_write_text

PIXEL_SCALE = 127.5  # [-1, 1] -> [0, 255]


def rate_distortion(terms: dict) -> dict:
    """Per t (0 .. T-1): rate in bits/dim and distortion (RMSE on [0, 255]), means over the images."""
    vb = terms["vb"].mean(axis=0)  # [T], vb[0] = L_0 (decoder), vb[t] = KL of step t
    prior = float(terms["prior_bpd"].mean())
    after = np.concatenate([np.cumsum(vb[::-1])[::-1][1:], [0.0]])  # sum_{s > t} vb[s]
    distortion = PIXEL_SCALE * np.sqrt(terms["xstart_mse"].mean(axis=0))
    return {
        "t": list(range(len(vb))),
        "rate_bpd": (prior + after).tolist(),
        "distortion_rmse": distortion.tolist(),
        "prior_bpd": prior,
        "lossless_bpd": prior + float(vb.sum()),
        "num_images": int(terms["vb"].shape[0]),
        "definition": "rate(t) = L_T + sum_{s>t} L_s (bits/dim received when x_t is held); distortion(t) = "
        "RMSE of the x_0 predicted from x_t, on [0, 255]; t is 0-based",
    }


def bound_terms(terms: dict) -> dict:
    vb = terms["vb"].mean(axis=0)
    return {
        "t": list(range(len(vb))),
        "vb_bpd": vb.tolist(),
        "prior_bpd": float(terms["prior_bpd"].mean()),
        "num_images": int(terms["vb"].shape[0]),
        "definition": "vb_bpd[0] = L_0 (decoder NLL), vb_bpd[t] = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), bits/dim",
    }


def _save_png(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_rate_distortion(data: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = len(data["t"]) - np.asarray(data["t"])  # reverse-process steps done: T - t
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, data["distortion_rmse"])
    axes[0].set(xlabel="reverse process steps (T - t)", ylabel="distortion (RMSE, [0, 255])", title="distortion")
    axes[1].plot(steps, data["rate_bpd"])
    axes[1].set(xlabel="reverse process steps (T - t)", ylabel="rate (bits/dim)", title="rate")
    axes[2].plot(data["rate_bpd"], data["distortion_rmse"])
    axes[2].set(xlabel="rate (bits/dim)", ylabel="distortion (RMSE, [0, 255])", title="rate-distortion")
    fig.suptitle(f"DDPM Fig. 5 from {data['num_images']} validation images")
    return _save_png(fig, path)


def plot_bound_terms(data: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.semilogy(data["t"], np.maximum(np.asarray(data["vb_bpd"]), 1e-12))
    ax.set(
        xlabel="diffusion step t",
        ylabel="bound term (bits/dim)",
        title=f"terms of the bound, {data['num_images']} validation images",
    )
    return _save_png(fig, path)


def write_figures(terms: dict, out_dir: Path, suffix: str, rate_distortion_too: bool) -> dict:
    """bound_terms<suffix>.png/.json always, rate_distortion<suffix>.png/.json when asked; their paths."""
    written = {}
    data = bound_terms(terms)
    atomic_write_text(out_dir / f"bound_terms{suffix}.json", json.dumps(data) + "\n")
    written["bound_terms"] = str(plot_bound_terms(data, out_dir / f"bound_terms{suffix}.png"))
    if rate_distortion_too:
        data = rate_distortion(terms)
        atomic_write_text(out_dir / f"rate_distortion{suffix}.json", json.dumps(data) + "\n")
        written["rate_distortion"] = str(plot_rate_distortion(data, out_dir / f"rate_distortion{suffix}.png"))
    return written


def plot_quality_vs_ema_std(runs: list[dict], keys: list[str], path: Path) -> Path:
    """Post-hoc EMA sweep (EDM2 Fig. 5 style): each metric against the EMA's relative width, one panel per metric;
    with several seeds the mean and the min..max band. `runs` are metrics.json's posthoc_ema.runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def values(run: dict, key: str) -> tuple[float, float, float] | None:
        if "summary" in run:
            s = run["summary"].get(key)
            return None if s is None else (s["mean"], s["min"], s["max"])
        value = run.get(key)
        return (value, value, value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    keys = [k for k in keys if "_std" not in k]  # is_std / kid_std: spreads, not qualities of their own
    panels = [k for k in keys if any(values(r, k) is not None for r in runs)] or ["(no metrics)"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        points = [(r["ema_std"], *v) for r in runs if (v := values(r, key)) is not None]
        if points:
            std, mean, low, high = map(np.asarray, zip(*sorted(points)))
            ax.plot(std, mean, "o-")
            if np.any(high > low):
                ax.fill_between(std, low, high, alpha=0.25)
        ax.set_xlabel("EMA std (sigma_rel)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    fig.suptitle("sample quality against the post-hoc EMA width")
    return _save_png(fig, path)

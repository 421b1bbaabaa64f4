"""Sample quality per network evaluation (NFE) of every sampler on a digits checkpoint.

    python benchmarks/sampler_quality.py outputs/train/.../last.ckpt --out results/sampler_quality
        [--num-samples 500] [--samplers dpmpp_2m unipc euler ...] [--nfe 5 10 20 50] [--ddim-steps 10 20 50]
        [--device auto] [--batch-size 500] [--seed 0]

The grid: every ODE / SDE solver (dpmpp_2m, dpmpp_3m, dpmpp_2m_sde, unipc, euler, heun) at each --nfe with
its default step placement (Heun makes 2 network calls per step but the last, so it runs (NFE + 1) // 2
steps: 9, 19, 49 NFE for 10, 20, 50); ddpm over all T training steps; ddim at each --ddim-steps. Every
configuration draws the same N samples' noise (one seed), from the EMA weights.

Scores come from benchmarks/digits_sample_quality.py's judge (src/metrics/digits_judge.py: an MLP
digit classifier fitted on its own part of the digits stands in for Inception; FD and KID on its hidden
features against its 500 reference digits, lower is better; digit IS, 10 at best). The floor scores its
500 held-out real digits the same way: what a perfect model reaches with 500 samples (the default count;
FD falls with the count, so compare rows of equal counts only). Writes <out>/sampler_quality.json (one
row per configuration: sampler options, NFE, FD, digit IS, confidence, seconds per image) and
<out>/sampler_quality.png (FD against NFE, one line per sampler, the floor dashed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.digits_sample_quality import DigitsJudge  # noqa: E402
from src.checkpoints import module_from_checkpoint, read_checkpoint  # noqa: E402
from src.diffusion import SAMPLERS, SamplerOptions  # noqa: E402
from src.sampling import pick_device  # noqa: E402
from src.sampling.batches import sample_uint8_batches  # noqa: E402

SOLVERS = [name for name, entry in SAMPLERS.items() if entry.continuous]
DEFAULT_SAMPLERS = [*SOLVERS, "ddpm", "ddim"]


def configurations(samplers: list[str], nfes: list[int], ddim_steps: list[int]) -> list[SamplerOptions]:
    """The options of every grid point: solvers at each NFE, ddpm over all T steps, ddim at each step count."""
    grid = []
    for name in samplers:
        if name not in SAMPLERS:
            raise SystemExit(f"error: unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
        entry = SAMPLERS[name]
        if name == "ddpm":
            grid.append(SamplerOptions("ddpm"))
        elif name == "ddim":
            grid += [SamplerOptions("ddim", steps=n) for n in ddim_steps]
        else:  # the most steps whose calls fit in the budget: N steps cost calls_per_step * N - (calls_per_step - 1)
            grid += [
                SamplerOptions(name, steps=max(1, (nfe + entry.calls_per_step - 1) // entry.calls_per_step))
                for nfe in nfes
            ]
    return grid


def measure(
    module, options: SamplerOptions, num_samples: int, batch_size: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, float]:
    """(uint8 images [N, C, H, W], seconds) of num_samples samples drawn with `options` from `seed`."""
    generator = torch.Generator(device=device).manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    images = torch.cat(
        [b.cpu() for b in sample_uint8_batches(module, num_samples, batch_size, options, generator=generator)]
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return images, seconds


def plot(rows: list[dict], floor: float, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(row["sampler"] for row in rows):
        points = sorted((row["nfe"], row["fd"]) for row in rows if row["sampler"] == name)
        nfe, fd = zip(*points)
        ax.plot(nfe, fd, marker="o", label=name)
    ax.axhline(floor, color="gray", linestyle="--", label="real held-out digits (floor)")
    ax.set_xscale("log")
    ax.set_xticks(sorted({row["nfe"] for row in rows}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("FD (digit-classifier features)")
    ax.set_title(f"sample quality per NFE ({rows[0]['num_samples']} samples each)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--samplers", nargs="+", default=DEFAULT_SAMPLERS)
    parser.add_argument("--nfe", nargs="+", type=int, default=[5, 10, 20, 50])
    parser.add_argument("--ddim-steps", nargs="+", type=int, default=[10, 20, 50])
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if args.num_samples < 2:
        raise SystemExit("error: --num-samples must be at least 2 (FD needs a covariance)")
    return args


def score_grid(module, grid: list[SamplerOptions], judge: DigitsJudge, args, device: torch.device) -> list[dict]:
    """One row per configuration: its options, NFE, the judge's scores and seconds per image (printed as it goes)."""
    num_timesteps = module.diffusion.num_timesteps
    measure(module, SamplerOptions("ddim", steps=2), 2, 2, args.seed, device)  # warm-up, untimed
    rows = []
    for options in grid:
        x, seconds = measure(module, options, args.num_samples, args.batch_size, args.seed, device)
        s = judge.score(x)
        rows.append(
            {
                "sampler": options.sampler,
                "options": options.as_dict(),
                "nfe": options.nfe(num_timesteps),
                "num_samples": args.num_samples,
                "fd": s["fd"],
                "kid_x1000": s["kid_x1000"],
                "digit_is": s["digit_is"],
                "confidence": s["confidence"],
                "seconds_per_image": seconds / args.num_samples,
            }
        )
        print(
            f"{options.sampler:>13} {options.resolved_spacing() or options.steps or num_timesteps!s:>12} "
            f"NFE {rows[-1]['nfe']:>4}: FD {s['fd']:8.3f}  digit IS {s['digit_is']:5.2f}  "
            f"{1e3 * rows[-1]['seconds_per_image']:8.2f} ms/image",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    ckpt = read_checkpoint(args.ckpt)
    device = pick_device(args.device)
    module = module_from_checkpoint(ckpt, "diffusion", source=str(args.ckpt)).to(device)
    grid = configurations(args.samplers, args.nfe, args.ddim_steps)
    judge = DigitsJudge(module.net.image_shape[1])
    floor = judge.real_rows()[0][1]
    rows = score_grid(module, grid, judge, args, device)

    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "checkpoint": str(args.ckpt.resolve()),
        "global_step": ckpt.get("global_step"),
        "num_timesteps": module.diffusion.num_timesteps,
        "device": str(device),
        "seed": args.seed,
        "weights": "ema",
        "judge": judge.extractor.name,
        "floor": {"what": "real held-out digits", "n": floor["n"], "fd": floor["fd"], "digit_is": floor["digit_is"]},
        "rows": rows,
    }
    (args.out / "sampler_quality.json").write_text(json.dumps(result, indent=2))
    plot(rows, floor["fd"], args.out / "sampler_quality.png")
    print(f"wrote {args.out / 'sampler_quality.json'} and {args.out / 'sampler_quality.png'}")
    return result


if __name__ == "__main__":
    main()

"""Where a training step's time goes, ours against the peer (diffusers' UNet2DModel at the same config):
the profiler's self time per step, grouped into convolutions (forward and backward), attention and
matmuls, group norm, and everything else (activations, adds, the loss, the optimizer and the EMA).
It explains the ratios of benchmarks/throughput.py: both nets run the same convolutions with the same
kernels, so the ratio can only move by the other groups.

    python benchmarks/step_breakdown.py [--model unet_small] [--device cpu] [--steps 5] [--threads 1]
"""

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import synchronize  # noqa: E402
from benchmarks.throughput import CPU_BATCH, MODEL_DATA, build_ours, build_peer, ours, peer  # noqa: E402

# Substrings of aten op names, checked in this order; the first that matches names the group.
GROUPS = (
    ("convolution", ("conv",)),
    ("attention + matmul", ("scaled_dot_product", "attention", "mm", "linear")),
    ("group norm", ("group_norm",)),
)
OTHER = "everything else"


def group_of(op_name: str) -> str:
    for group, keys in GROUPS:
        if any(key in op_name for key in keys):
            return group
    return OTHER


def breakdown(step, device: torch.device, steps: int) -> dict[str, float]:
    """Milliseconds of self time per step in each group (device time on CUDA, CPU time otherwise)."""
    for _ in range(2):
        step()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    totals = dict.fromkeys([g for g, _ in GROUPS] + [OTHER], 0.0)
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):  # skip the optimizer's and autograd's wrapper ranges
            continue
        us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        totals[group_of(event.key)] += us / 1e3 / steps
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="unet_small", choices=sorted(MODEL_DATA))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5, help="profiled training steps per implementation")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    channels, size = MODEL_DATA[args.model]
    batch = args.batch_size or (CPU_BATCH[args.model] if device.type == "cpu" else 128)
    torch.manual_seed(0)
    x0 = torch.rand(batch, channels, size, size, device=device).mul(2).sub(1)
    results = {}
    for key, build, make in (("ours", build_ours, ours), ("peer", build_peer, peer)):
        impl = make(build(args.model, device), x0, contextlib.nullcontext)
        results[key] = breakdown(impl.train_step, device, args.steps)

    print(
        f"{args.model}, batch {batch}, {device} ({torch.get_num_threads()} threads), fp32: "
        f"ms of self time per training step"
    )
    print("| group | ours | peer | ours share | peer share |")
    print("|---|---|---|---|---|")
    total = {k: sum(v.values()) for k, v in results.items()}
    for group in results["ours"]:
        o, p = results["ours"][group], results["peer"][group]
        print(f"| {group} | {o:.1f} | {p:.1f} | {o / total['ours']:.0%} | {p / total['peer']:.0%} |")
    print(f"| total | {total['ours']:.1f} | {total['peer']:.1f} | | |")
    conv = results["ours"]["convolution"]
    print(
        f"peer total / ours total = {total['peer'] / total['ours']:.2f}; "
        f"even with every non-convolution op free, ours could reach {total['peer'] / conv:.2f}x the peer"
    )


if __name__ == "__main__":
    main()

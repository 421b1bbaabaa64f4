"""Time of the per-step weight updates of a config's U-Net: the Adam step with each of torch's kernels
and the EMA update as one foreach lerp (src.lit.EMA) against a loop over tensors.

    python benchmarks/update_kernels.py [--model unet_ddpm_cifar10] [--device cpu] [--repeats 10]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import synchronize  # noqa: E402
from benchmarks.throughput import build_ours  # noqa: E402
from src.lit import EMA  # noqa: E402
from src.lit.optim import make_optimizer  # noqa: E402


def median_ms(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (allocates the optimizer state)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="unet_ddpm_cifar10")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    net = build_ours(args.model, device)
    params = list(net.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    print(
        f"{args.model}: {sum(p.numel() for p in params) / 1e6:.1f}M parameters in {len(params)} tensors, "
        f"torch {torch.__version__}, {device}"
    )
    print("| update | implementation | ms per step |\n|---|---|---|")
    for impl in ("for-loop", "foreach", "fused"):
        try:
            optimizer = make_optimizer(params, implementation=impl, lr=1e-4)
        except RuntimeError as err:  # fused is not built for every device
            print(f"| Adam step | {impl} | n/a ({err}) |")
            continue
        print(f"| Adam step | {impl} | {median_ms(optimizer.step, device, args.repeats):.1f} |")

    ema = EMA(net, decay=0.9999)
    ema_params = list(ema.model.parameters())

    @torch.no_grad()
    def loop_update():
        decay = ema.current_decay()
        for e, p in zip(ema_params, params):
            e.mul_(decay).add_(p, alpha=1 - decay)

    print(f"| EMA update | loop (mul_ + add_ per tensor) | {median_ms(loop_update, device, args.repeats):.1f} |")
    print(
        f"| EMA update | foreach lerp (src.lit.EMA) | {median_ms(lambda: ema.update(net), device, args.repeats):.1f} |"
    )


if __name__ == "__main__":
    main()

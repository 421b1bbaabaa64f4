"""Training and sampling throughput, peak memory and FLOP utilisation of our U-Net configs, side by side
with diffusers' UNet2DModel built at the same configuration (the peer).

    python benchmarks/throughput.py                      # CPU defaults, about 2 minutes on 2 cores
    python benchmarks/throughput.py --device cuda --precision bf16 --compile --channels-last

Per model and implementation it measures
- training images/s: forward + loss + backward + grad-norm clip + Adam step + EMA update;
- sampling image-steps/s: one reverse step (network forward under no_grad + the DDPM step) times the
  batch; divide by the number of sampling steps (1000 DDPM, 50-100 strided/DDIM) for images/s;
- peak memory: CUDA max allocated during the step (weights and optimizer state included); on CPU the
  growth of the resident set over the step (activations and temporaries), polled every 2 ms;
- FLOPs per image (torch.utils.flop_counter: convolutions, matmuls, attention) and the achieved FLOP
  rate as a fraction of a plain matmul's rate measured in the same run.
Implementations alternate (ours, peer, ours, peer, ...) after a warm-up; the table holds medians.

Ours: src.models.UNet from conf/model/<name>.yaml, GaussianDiffusion.training_losses (L_simple, which
also computes the vb term for logging), the configured optimizer (conf/train.yaml) and src.lit.EMA.
Peer: diffusers' UNet2DModel + DDPMScheduler (add_noise, step), MSE, torch.optim.Adam (torch's default
kernel choice) and diffusers' EMAModel, i.e. what diffusers' own training example does.
"""

import argparse
import contextlib
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import count_flops, matmul_flops_per_second, timed  # noqa: E402
from src.builders import sizes_at_downsample  # noqa: E402,F401  (registers the resolver the model configs use)
from src.diffusion import GaussianDiffusion  # noqa: E402
from src.lit import EMA  # noqa: E402

# The data each model config is used with: (channels, image size) of digits and CIFAR-10.
MODEL_DATA = {"unet_small": (1, 16), "unet_ddpm_cifar10": (3, 32), "unet_ddpm_256": (3, 256)}
# Per-model default batch on CPU (the 35.7M net takes seconds per step on 2 cores); GPUs use 128.
CPU_BATCH = {"unet_small": 32, "unet_ddpm_cifar10": 8, "unet_ddpm_256": 1}
GRAD_CLIP = 1.0  # conf/trainer/default.yaml gradient_clip_val


# --- building both implementations ------------------------------------------------------------------
def model_config(name: str):
    """conf/model/<name>.yaml with its ${data.image_size} references resolved at the benchmark's image size."""
    _, size = MODEL_DATA[name]
    model = OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")
    root = OmegaConf.create({"data": {"image_size": size}, "model": model})
    return OmegaConf.create(OmegaConf.to_container(root, resolve=True)["model"])


def build_ours(name: str, device: torch.device) -> torch.nn.Module:
    channels, size = MODEL_DATA[name]
    cfg = model_config(name)
    return instantiate(cfg, in_channels=channels, out_channels=channels, image_size=size).to(device)


def build_peer(name: str, device: torch.device) -> torch.nn.Module:
    """diffusers' UNet2DModel with our config's channels, multipliers, blocks, attention and dropout."""
    from diffusers import UNet2DModel

    channels, size = MODEL_DATA[name]
    cfg = model_config(name)
    mult, ch = list(cfg.channel_mult), cfg.base_channels
    attn = [size // 2**i in list(cfg.attention_resolutions) for i in range(len(mult))]
    heads = cfg.num_heads
    # diffusers takes one head width for every attention block (ours: a head count); equal here since
    # attention runs at a single level and in the middle, which have the same width in these configs.
    head_dim = None if heads == 1 else ch * mult[attn.index(True)] // heads
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(ch * m for m in mult),
        layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        dropout=cfg.dropout,
        attention_head_dim=head_dim,
        norm_num_groups=min(32, ch),
        norm_eps=1e-6,
        flip_sin_to_cos=False,
        freq_shift=1,
    ).to(device)


def num_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@dataclass
class Impl:
    """One implementation's training and sampling step on a fixed batch."""

    name: str
    net: torch.nn.Module
    train_step: Callable[[], None]
    sample_step: Callable[[], None]
    extra: torch.nn.Module = field(default_factory=torch.nn.Identity)  # a second net it runs (EMA copy)
    flops: dict = field(default_factory=dict)


def ours(net: torch.nn.Module, x0: torch.Tensor, autocast) -> Impl:
    cfg = OmegaConf.load(ROOT / "conf" / "train.yaml")
    betas = instantiate(OmegaConf.load(ROOT / "conf" / "schedule" / "linear.yaml"))
    diffusion = GaussianDiffusion(betas, "eps", "fixed_large", "simple").to(x0.device)
    optimizer = instantiate(cfg.module.optimizer)(params=net.parameters())
    ema = EMA(net, decay=0.9999)
    batch, device = x0.shape[0], x0.device
    num_t = diffusion.num_timesteps

    def train_step():
        t = torch.randint(0, num_t, (batch,), device=device)
        with autocast():
            loss = diffusion.training_losses(net, x0, t)["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP)
        optimizer.step()
        ema.update(net)

    x = torch.randn_like(x0)
    t = torch.full((batch,), num_t // 2, device=device, dtype=torch.long)

    @torch.no_grad()
    def sample_step():
        with autocast():
            diffusion.p_sample(ema.model, x, t, torch.randn_like(x))

    return Impl("ours", net, train_step, sample_step, extra=ema.model)


def peer(net: torch.nn.Module, x0: torch.Tensor, autocast) -> Impl:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_large")
    lr = OmegaConf.load(ROOT / "conf" / "train.yaml").module.optimizer.lr
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    ema = EMAModel(net.parameters(), decay=0.9999, use_ema_warmup=True)
    ema.to(x0.device)
    batch, device = x0.shape[0], x0.device
    num_t = scheduler.config.num_train_timesteps

    def train_step():
        t = torch.randint(0, num_t, (batch,), device=device)
        noise = torch.randn_like(x0)
        with autocast():
            pred = net(scheduler.add_noise(x0, noise, t), t).sample
        loss = F.mse_loss(pred.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP)
        optimizer.step()
        ema.step(net.parameters())

    x = torch.randn_like(x0)
    t_int = num_t // 2
    t = torch.full((batch,), t_int, device=device, dtype=torch.long)

    @torch.no_grad()
    def sample_step():
        # The peer samples with the live net (EMAModel keeps a shadow list, not a module); same work.
        with autocast():
            out = net(x, t).sample
        scheduler.step(out.float(), t_int, x)

    return Impl("peer", net, train_step, sample_step)


# --- the run ----------------------------------------------------------------------------------------
def bench_model(name: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    """Both implementations of conf/model/<name>.yaml measured alternately: per implementation the medians of
    its training and sampling rates and peak memory, with its parameters, batch and FLOPs per image."""
    batch = args.batch_size or (CPU_BATCH[name] if device.type == "cpu" else 128)
    impls, counts = build_impls(name, args, device, dtype, batch)
    for _ in range(args.warmup):
        for impl in impls.values():
            impl.train_step()
            impl.sample_step()
    samples = {(k, m): [] for k in impls for m in ("train", "sample")}
    memory = {(k, m): [] for k in impls for m in ("train", "sample")}
    for repeat in range(args.repeats):
        for key, impl in impls.items():  # alternate ours / peer
            for mode in ("train", "sample"):
                step = impl.train_step if mode == "train" else impl.sample_step
                rate, peak = timed(step, batch, device, args.min_seconds)
                samples[key, mode].append(rate)
                memory[key, mode].append(peak)
        print(
            f"  repeat {repeat + 1}/{args.repeats}: "
            + ", ".join(f"{k} {m} {samples[k, m][-1]:.1f}" for k in impls for m in ("train", "sample")),
            flush=True,
        )

    def med(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    rows = {}
    for key in impls:
        rows[key] = {
            "params": counts[key],
            "batch": batch,
            "flops": impls[key].flops,
            **{m: med(samples[key, m]) for m in ("train", "sample")},
            **{f"mem_{m}": med(memory[key, m]) for m in ("train", "sample")},
        }
    return rows


def build_impls(name: str, args, device: torch.device, dtype: torch.dtype, batch: int) -> tuple[dict, dict]:
    """({"ours": Impl, "peer": Impl} on one fixed batch, with FLOPs counted and compiled if asked; their
    parameter counts), after checking that the peer has our net's size."""
    channels, size = MODEL_DATA[name]
    torch.manual_seed(0)
    nets = {"ours": build_ours(name, device), "peer": build_peer(name, device)}
    counts = {k: num_params(v) for k, v in nets.items()}
    gap = abs(counts["ours"] - counts["peer"]) / counts["peer"]
    print(f"{name}: parameters ours {counts['ours']:,}, peer {counts['peer']:,} (differ by {100 * gap:.2f}%)")
    if gap > 0.02:
        raise SystemExit(f"{name}: the peer is not the same configuration (parameter counts differ by more than 2%)")

    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    x0 = torch.rand(batch, channels, size, size, device=device).mul(2).sub(1).contiguous(memory_format=memory_format)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if dtype == torch.bfloat16
        else contextlib.nullcontext
    )
    impls = {}
    for key, make in (("ours", ours), ("peer", peer)):
        net = nets[key].to(memory_format=memory_format)
        impl = make(net, x0, autocast)
        if args.channels_last:
            impl.extra.to(memory_format=memory_format)
        # Counted eagerly, before compiling (FlopCounterMode does not see inside compiled graphs).
        impl.flops = {"train": count_flops(impl.train_step) / batch, "sample": count_flops(impl.sample_step) / batch}
        if args.compile:
            net.compile()
            impl.extra.compile()
        impls[key] = impl
    return impls, counts


def fmt_mem(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def fmt_rate(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"  # three significant digits (2.31, 117)


def ratio(a, b) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per step (default: 32 for unet_small, 8 for unet_ddpm_cifar10 on CPU; 128 on GPU)",
    )
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast, as bf16-mixed")
    parser.add_argument("--compile", action="store_true", help="torch.compile both networks")
    parser.add_argument("--channels-last", action="store_true", help="channels_last weights and inputs for both")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per implementation (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each kind first")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=None,
        help="each timed run repeats its step until this long (default 2.0 CPU, 0.5 GPU)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: torch's choice); 1 is steadier on a machine shared with other jobs",
    )
    parser.add_argument("--models", default="unet_small,unet_ddpm_cifar10", help="comma-separated conf/model names")
    return parser.parse_args()


def print_table(results: dict, matmul: float, on_cpu: bool) -> None:
    """The markdown table: one row per model and implementation, then ours / peer."""
    mem_name = "peak RSS growth (MiB)" if on_cpu else "peak allocated (MiB)"
    print()
    print(
        f"| model | impl | params | batch | train img/s | sample img-steps/s | train {mem_name} | "
        f"sample {mem_name} | GFLOP/img train (fwd+bwd) | GFLOP/img sample | train FLOP rate / matmul | "
        f"sample FLOP rate / matmul |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        for key, r in rows.items():
            f = r["flops"]
            print(
                f"| {name} | {key} | {r['params'] / 1e6:.2f}M | {r['batch']} | {fmt_rate(r['train'])} | {fmt_rate(r['sample'])} | "
                f"{fmt_mem(r['mem_train'])} | {fmt_mem(r['mem_sample'])} | {f['train'] / 1e9:.2f} | "
                f"{f['sample'] / 1e9:.2f} | {f['train'] * r['train'] / matmul:.0%} | "
                f"{f['sample'] * r['sample'] / matmul:.0%} |"
            )
        o, p = rows["ours"], rows["peer"]
        print(
            f"| {name} | **ours/peer** | | | **{ratio(o['train'], p['train'])}** | **{ratio(o['sample'], p['sample'])}** | "
            f"{ratio(o['mem_train'], p['mem_train'])} | {ratio(o['mem_sample'], p['mem_sample'])} | | | | |"
        )


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    on_cpu = device.type == "cpu"
    args.repeats = args.repeats or 5
    args.min_seconds = args.min_seconds if args.min_seconds is not None else (2.0 if on_cpu else 0.5)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__}, {where}; precision {args.precision}, compile {args.compile}, "
        f"channels_last {args.channels_last}, {args.repeats} repeats"
    )
    matmul = matmul_flops_per_second(device, dtype, 2048 if on_cpu else 8192)
    print(f"plain matmul: {matmul / 1e9:.1f} GFLOP/s")
    results = {name: bench_model(name, args, device, dtype) for name in args.models.split(",")}
    print_table(results, matmul, on_cpu)


if __name__ == "__main__":
    main()

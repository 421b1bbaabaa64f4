"""The benchmark scripts still run against the installed diffusers and build a peer of the same size.
Speed itself is never asserted here: the scripts measure it."""

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.step_breakdown import OTHER, group_of
from benchmarks.throughput import build_ours, build_peer, num_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["unet_small", "unet_ddpm_cifar10"])
def test_peer_unet_has_our_parameter_count(name):
    import torch

    device = torch.device("cpu")
    assert num_params(build_peer(name, device)) == num_params(build_ours(name, device))


@pytest.mark.parametrize(
    "op, group",
    [
        ("aten::mkldnn_convolution", "convolution"),
        ("aten::convolution_backward", "convolution"),
        ("aten::cudnn_convolution", "convolution"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention + matmul"),
        ("aten::addmm", "attention + matmul"),
        ("aten::bmm", "attention + matmul"),
        ("aten::native_group_norm_backward", "group norm"),
        ("aten::silu_backward", OTHER),
        ("aten::addcmul_", OTHER),
        ("aten::linalg_vector_norm", OTHER),
    ],
)
def test_breakdown_groups_ops_by_name(op, group):
    assert group_of(op) == group


@pytest.mark.slow
def test_throughput_script_prints_the_side_by_side_table():
    cmd = [
        sys.executable,
        "benchmarks/throughput.py",
        "--models",
        "unet_small",
        "--batch-size",
        "2",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--min-seconds",
        "0",
        "--threads",
        "1",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| unet_small |")]
    assert [row.split("|")[2].strip() for row in rows] == ["ours", "peer", "**ours/peer**"]
    assert "plain matmul:" in out.stdout


@pytest.mark.slow
def test_step_breakdown_script_accounts_for_both_steps():
    cmd = [sys.executable, "benchmarks/step_breakdown.py", "--batch-size", "2", "--steps", "1", "--threads", "1"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    conv = next(line for line in out.stdout.splitlines() if line.startswith("| convolution |"))
    ours_ms, peer_ms = (float(cell) for cell in conv.split("|")[2:4])
    assert ours_ms > 0 and peer_ms > 0

"""Timing, peak memory and FLOP counting of one step function, for the benchmark scripts."""

import ctypes
import gc
import os
import statistics
import threading
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_host_memory() -> None:
    gc.collect()
    try:  # glibc keeps freed blocks; hand them back so the next run's growth is visible
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """Peak memory of a block: CUDA max allocated, or the growth of the CPU resident set (Linux)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/statm"):
            _release_host_memory()
            self._base, self._max, self._stop = _rss_bytes(), 0, threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self._max = max(self._max, _rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, _rss_bytes()) - self._base


def timed(step: Callable[[], None], images_per_step: int, device: torch.device, min_seconds: float):
    """Run `step` until min_seconds have passed (at least once); -> (images/s, peak memory bytes)."""
    synchronize(device)
    with PeakMemory(device) as memory:
        start, steps = time.perf_counter(), 0
        while True:
            step()
            steps += 1
            synchronize(device)
            seconds = time.perf_counter() - start
            if seconds >= min_seconds:
                break
    return images_per_step * steps / seconds, memory.peak


def count_flops(step: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """A plain n x n matmul's FLOP rate, the yardstick for the models' achieved rates."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    rates = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        rates.append(2 * n**3 / (time.perf_counter() - start))
    return statistics.median(rates)

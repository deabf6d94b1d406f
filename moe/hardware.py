"""The machine's roofline, measured: peak matmul FLOP/s and memory bandwidth, and the timer
every benchmark uses.

Timings are medians over many iterations, and the things compared take turns call by call,
so that a slow patch of the machine (frequency, a neighbour) hits all of them alike instead
of skewing one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_times(fns: dict[str, Callable[[], object]], device: torch.device, iters: int,
                 warmup: int = 2, statistic: Callable[[list[float]], float] = statistics.median) -> dict[str, float]:
    """Median (or `statistic`) seconds per call of each function, the functions taking turns call by call.

    Round-robin rather than one block per function: a slow patch of a shared machine then
    lands on every contender alike, which keeps ratios stable where absolute times are not.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistic(s) for name, s in samples.items()}


def matmul_peak(device: torch.device | str = "cpu", n: int | None = None, iters: int = 5) -> float:
    """Measured matmul FLOP/s (fp32 on CPU, bf16 on CUDA): the roofline the others are read against.
    The fastest of `iters` calls: a peak is what the machine can do, and one quiet call shows it
    where a neighbour slows the others."""
    dev = torch.device(device)
    n = n or (8192 if dev.type == "cuda" else 2048)  # large enough to reach the peak on each
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    generator = torch.Generator(dev).manual_seed(0)  # leaves the global RNG (training's) alone
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=generator)
    seconds = median_times({"mm": lambda: a @ b}, dev, iters, statistic=min)["mm"]
    return 2 * n**3 / seconds


def memory_bandwidth(device: torch.device | str = "cpu", mib: int = 256, iters: int = 5) -> float:
    """Measured memory bytes/s: a copy of `mib` MiB, far larger than any cache, reads and writes each
    byte (the fastest of `iters` copies, as for the matmul peak)."""
    dev = torch.device(device)
    src = torch.ones(mib * 2**20 // 4, device=dev)
    dst = torch.empty_like(src)
    seconds = median_times({"copy": lambda: dst.copy_(src)}, dev, iters, statistic=min)["copy"]
    return 2 * src.nbytes / seconds


def machine(device: torch.device | str = "cpu") -> dict:
    """The roofline of this machine: peak matmul FLOP/s and memory bandwidth, and their ratio."""
    dev = torch.device(device)
    flops, bandwidth = matmul_peak(dev), memory_bandwidth(dev)
    return {"benchmark": "machine", "device": str(dev), "threads": torch.get_num_threads(),
            "dtype": "bfloat16" if dev.type == "cuda" else "float32",
            "matmul_flops": flops, "bandwidth": bandwidth, "ridge_flops_per_byte": flops / bandwidth}

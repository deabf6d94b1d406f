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


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype the matmuls of this project run in on a device today: bf16 (autocast) on CUDA,
    fp32 on a CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


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


def matmul_peak(device: torch.device | str = "cpu", n: int | None = None, iters: int = 5,
                dtype: torch.dtype | None = None) -> float:
    """Measured matmul FLOP/s in `dtype` (default: the device's compute dtype): the roofline the
    others are read against. The fastest of `iters` calls: a peak is what the machine can do, and
    one quiet call shows it where a neighbour slows the others."""
    dev = torch.device(device)
    n = n or (8192 if dev.type == "cuda" else 2048)  # large enough to reach the peak on each
    dtype = dtype or compute_dtype(dev)
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


def machine(device: torch.device | str = "cpu", dtypes: tuple[torch.dtype, ...] = ()) -> dict:
    """The roofline of this machine: peak matmul FLOP/s in the compute dtype and memory bandwidth,
    and their ratio; with `dtypes`, the matmul peak in each of them too (`matmul_flops_by_dtype`)."""
    dev = torch.device(device)
    compute = compute_dtype(dev)
    by_dtype = {dtype_name(d): matmul_peak(dev, dtype=d) for d in dict.fromkeys((compute, *dtypes))}
    flops, bandwidth = by_dtype[dtype_name(compute)], memory_bandwidth(dev)
    return {"benchmark": "machine", "device": str(dev), "threads": torch.get_num_threads(),
            "dtype": dtype_name(compute), "matmul_flops": flops, "matmul_flops_by_dtype": by_dtype,
            "bandwidth": bandwidth, "ridge_flops_per_byte": flops / bandwidth}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

"""The machine's roofline, measured: peak matmul FLOP/s and memory bandwidth, the precision the
matmuls run in, and the timer every benchmark uses.

Timings are medians over many iterations, and the things compared take turns call by call,
so that a slow patch of the machine (frequency, a neighbour) hits all of them alike instead
of skewing one.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Inference also stores weights in int8 (one scale per output channel; activations stay fp32).
INFERENCE_DTYPES = {**PRECISIONS, "int8": torch.int8}
FAST_BF16 = 1.3  # `auto` takes bf16 where its matmuls are at least this many times faster than fp32's


def resolve_precision(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype the matmuls run in: `fp32`, `bf16`, or `auto`, which is bf16 where the device
    multiplies bf16 faster than fp32 (CUDA sm80+; a CPU with avx512_bf16 or AMX, as a probe
    finds) and fp32 elsewhere. The weights, the optimizer and the norms stay fp32 either way."""
    dev = torch.device(device)
    if precision == "auto":
        return torch.bfloat16 if fast_bf16(dev) else torch.float32
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected auto, {' or '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype == torch.bfloat16 and not has_bf16(dev):
        raise ValueError(f"precision bf16: {describe(dev)} has no bf16 matmuls (CUDA needs sm80+); use fp32")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """How a precision runs: bf16 autocast over fp32 weights (the router, the norms and the loss say
    for themselves that they stay fp32; autocast keeps softmaxes and reductions in fp32), or
    nothing at all for fp32. The trainer and the benchmarks both enter it."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def has_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run at all: on every CPU (emulated where the hardware lacks them), on
    CUDA from sm80 (Ampere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu"


@functools.cache
def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls beat fp32's here. CUDA: sm80+. A CPU: a probe (~0.1 s), as its name
    says nothing reliable and PyTorch emulates bf16 (slowly) on CPUs without the instructions."""
    if device.type != "cpu":
        return has_bf16(device)
    peaks = {dtype: matmul_peak(device, n=768, iters=4, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
    return peaks[torch.bfloat16] >= FAST_BF16 * peaks[torch.float32]


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (sm{''.join(map(str, torch.cuda.get_device_capability(device)))})"
    return str(device)


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype training's matmuls run in by default (`auto`) on a device."""
    return resolve_precision("auto", device)


def inference_dtype(precision: str | None, device: torch.device | str) -> torch.dtype:
    """The dtype inference stores its weights in: `fp32`, `bf16`, `int8` (weight-only: activations
    and the KV cache in fp32), or by default bf16 on CUDA sm80+ and fp32 on a CPU, where eager
    decoding measured no faster in bf16 (docs/benchmarks.md)."""
    dev = torch.device(device)
    if precision is None:
        return torch.bfloat16 if dev.type == "cuda" and has_bf16(dev) else torch.float32
    if precision == "int8":
        return torch.int8
    return resolve_precision(precision, dev)


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
    one quiet call shows it where a neighbour slows the others.

    The default size reaches the peak (8192 on CUDA, 2048 on a CPU), unless on a CPU a first small
    product (512) says one call would take over PROBE_CALL_S: a dtype the CPU emulates (bf16 without
    avx512_bf16 ran at ~1.4 GFLOP/s on an AVX2 EPYC, 12 s a 2048 call) is timed at the size that
    fits, as slow at every size (the same 1.4 at 256 and at 512)."""
    dev = torch.device(device)
    dtype = dtype or compute_dtype(dev)
    if n is None and dev.type == "cuda":
        n = 8192
    elif n is None:
        n = max(256, min(2048, int((PROBE_CALL_S * _matmul_rate(dev, 512, 1, dtype) / 2) ** (1 / 3))))
    return _matmul_rate(dev, n, iters, dtype)


PROBE_CALL_S = 1.0  # the longest one call of matmul_peak's default-sized product should take


def _matmul_rate(dev: torch.device, n: int, iters: int, dtype: torch.dtype) -> float:
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


def machine(device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
            dtypes: tuple[torch.dtype, ...] = ()) -> dict:
    """The roofline of this machine in `dtype` (default: the device's `auto` precision): peak
    matmul FLOP/s and memory bandwidth, and their ratio; with `dtypes`, the matmul peak in each of
    them too (`matmul_flops_by_dtype`)."""
    dev = torch.device(device)
    compute = dtype or compute_dtype(dev)
    by_dtype = {dtype_name(d): matmul_peak(dev, dtype=d) for d in dict.fromkeys((compute, *dtypes))}
    flops, bandwidth = by_dtype[dtype_name(compute)], memory_bandwidth(dev)
    return {"benchmark": "machine", "device": str(dev), "threads": torch.get_num_threads(),
            "dtype": dtype_name(compute), "matmul_flops": flops, "matmul_flops_by_dtype": by_dtype,
            "bandwidth": bandwidth, "ridge_flops_per_byte": flops / bandwidth}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

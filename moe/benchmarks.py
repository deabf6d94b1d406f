"""Micro-benchmarks behind `bench.py`: each returns a dict of plain numbers (JSON-ready).

Timings are medians over many iterations, and the things compared take turns call by call,
so that a slow patch of the machine (frequency, a neighbour) hits all of them alike instead
of skewing one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from .config import ModelConfig
from .experts import MoE, SwiGLU
from .model import MoETransformer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_times(fns: dict[str, Callable[[], object]], device: torch.device, iters: int,
                 warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, the functions taking turns call by call.

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
    return {name: statistics.median(s) for name, s in samples.items()}


def moe_layer(cfg: ModelConfig, n_tokens: int = 2048, iters: int = 30, device: torch.device | str = "cpu",
              impls: tuple[str, ...] = ("auto", "grouped_mm", "loop"), seed: int = 0) -> dict:
    """One MoE layer, forward + backward, against its compute floor.

    The floor is the same matmul work at dense efficiency: top-k routing sends k * T token
    rows through experts of hidden size F, exactly the FLOPs of k * T tokens through one dense
    SwiGLU FFN of hidden size F. The ratio is what routing, sorting, gathering, scattering and
    the smaller per-expert matmuls cost on top.
    """
    dev = torch.device(device)
    torch.manual_seed(seed)
    layer = MoE(cfg).to(dev)
    dense = SwiGLU(cfg.d_model, cfg.d_ff).to(dev)
    for p in [*layer.parameters(), *dense.parameters()]:
        torch.nn.init.normal_(p, 0.0, cfg.init_std)
    x = torch.randn(n_tokens, cfg.d_model, device=dev, requires_grad=True)
    grad_y = torch.randn_like(x)
    x_dense = torch.randn(cfg.top_k * n_tokens, cfg.d_model, device=dev, requires_grad=True)
    grad_dense = torch.randn_like(x_dense)

    def clear_grads() -> None:  # as training does each step: no accumulation into old grads
        for t in [x, x_dense, *layer.parameters(), *dense.parameters()]:
            t.grad = None

    def run_moe(impl: str) -> Callable[[], None]:
        def step() -> None:
            layer.experts.impl = impl
            layer(x).y.backward(grad_y)
            clear_grads()
        return step

    def run_floor() -> None:
        dense(x_dense).backward(grad_dense)
        clear_grads()

    fns = {f"moe[{impl}]": run_moe(impl) for impl in impls}
    fns["floor"] = run_floor
    times = median_times(fns, dev, iters)
    layer.experts.impl = impls[0]
    resolved = layer.experts.resolved_impl(x)
    expert_flops = 3 * 2 * cfg.top_k * n_tokens * 3 * cfg.d_model * cfg.d_ff  # (fwd + 2 bwd) x 3 matmuls
    rows = [
        {"name": name, "ms": t * 1e3, "gflops": expert_flops / t / 1e9, "ratio_to_floor": t / times["floor"]}
        for name, t in times.items()
    ]
    return {
        "benchmark": "moe-layer",
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "shape": {"tokens": n_tokens, "d_model": cfg.d_model, "d_ff": cfg.d_ff,
                  "n_experts": cfg.n_experts, "top_k": cfg.top_k, "dispatch": cfg.dispatch},
        "impl": resolved,
        "expert_gflop_per_step": expert_flops / 1e9,
        "ratio_to_floor": times[f"moe[{impls[0]}]"] / times["floor"],
        "rows": rows,
    }


def train_step(cfg: ModelConfig, batch_size: int = 8, seq_len: int | None = None, iters: int = 10,
               device: torch.device | str = "cpu", seed: int = 0) -> dict:
    """Forward + backward + AdamW step of the whole model on random tokens: tokens/s and FLOP/s."""
    dev = torch.device(device)
    seq_len = seq_len or cfg.max_seq_len
    torch.manual_seed(seed)
    model = MoETransformer(cfg).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), device=dev)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        loss = model(inputs, targets).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = median_times({"step": step}, dev, iters, warmup=3)["step"]
    n_tokens = batch_size * seq_len
    flops = model.flops_per_token(seq_len, training=True) * n_tokens
    return {
        "benchmark": "train-step",
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "params_total": model.param_counts().total,
        "params_active": model.param_counts().active,
        "step_ms": seconds * 1e3,
        "tokens_per_s": n_tokens / seconds,
        "achieved_gflops": flops / seconds / 1e9,
    }


def matmul_peak(device: torch.device | str = "cpu", n: int = 2048, iters: int = 5) -> float:
    """Measured matmul FLOP/s (fp32 on CPU, bf16 on CUDA): the roofline the others are read against."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    generator = torch.Generator(dev).manual_seed(0)  # leaves the global RNG (training's) alone
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=generator)
    seconds = median_times({"mm": lambda: a @ b}, dev, iters)["mm"]
    return 2 * n**3 / seconds

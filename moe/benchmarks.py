"""Micro-benchmarks behind `bench.py`: each returns a dict of plain numbers (JSON-ready).

Timings are medians over many iterations, and the things compared take turns call by call,
so that a slow patch of the machine (frequency, a neighbour) hits all of them alike instead
of skewing one.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import numpy as np
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


# ---- inference ------------------------------------------------------------------------------

def _percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    pick = lambda q: ordered[min(int(q * len(ordered)), len(ordered) - 1)]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


@torch.no_grad()
def decode(model, prompt_len: int = 16, new_tokens: int = 128, uncached_tokens: int = 32, seed: int = 0,
           decode_step=None) -> dict:
    """Batch-1 greedy decoding with the KV cache and without it, and token-to-token latency.

    `decode_step`: a compiled step (`sampling.compile_decode_step`) for the cached run.
    """
    from .kv_cache import KVCache
    from .sampling import SamplingParams, generate, generate_uncached

    cfg = model.cfg
    prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(seed)).tolist()
    greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    list(generate(model, prompt, SamplingParams(max_new_tokens=8, temperature=0), decode_step))  # warm up
    gaps, last = [], time.perf_counter()
    start = last
    for _ in generate(model, prompt, greedy, decode_step):
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    cached_s = last - start
    start = time.perf_counter()
    generate_uncached(model, prompt, SamplingParams(max_new_tokens=uncached_tokens, temperature=0))
    uncached_s = time.perf_counter() - start
    kv_bytes = {name: KVCache(dataclasses.replace(cfg, n_kv_heads=g), slots=1, device="meta").nbytes
                for name, g in (("mqa", 1), ("gqa", max(cfg.n_heads // 4, 1)), ("mha", cfg.n_heads))}
    return {
        "benchmark": "decode", "batch_size": 1, "prompt_len": prompt_len, "compiled": decode_step is not None,
        "cached_tokens_per_s": new_tokens / cached_s,
        "uncached_tokens_per_s": uncached_tokens / uncached_s,
        "first_token_ms": gaps[0] * 1e3,  # prefill + first sample
        "token_to_token_ms": {k: v * 1e3 for k, v in _percentiles(gaps[1:]).items()},
        "kv_cache_bytes_full_context": kv_bytes,
    }


def long_tailed_requests(n: int, vocab_size: int, seed: int = 0, prompt_len: int = 16,
                         min_new: int = 4, max_new: int = 160) -> list:
    """n greedy requests whose output lengths follow a Pareto tail: most short, a few long."""
    from .engine import Request
    from .sampling import SamplingParams

    rng = np.random.default_rng(seed)
    lengths = np.clip((min_new * (1 + rng.pareto(1.2, n))).astype(int), min_new, max_new)
    return [Request(rng.integers(0, vocab_size, prompt_len).tolist(),
                    SamplingParams(max_new_tokens=int(length), temperature=0), id=i)
            for i, length in enumerate(lengths)]


@torch.no_grad()
def batching(model, n_requests: int = 64, slots: int = 8, seed: int = 0) -> dict:
    """Static vs continuous batching on the same long-tailed workload."""
    from .engine import Engine

    rows = []
    for static in (True, False):
        requests = long_tailed_requests(n_requests, model.cfg.vocab_size, seed)
        engine = Engine(model, slots, static=static)
        start = time.perf_counter()
        results = engine.run(requests)
        seconds = time.perf_counter() - start
        latencies = [r.latency_s for r in results]
        rows.append({
            "mode": "static" if static else "continuous",
            "tokens_per_s": sum(len(r.tokens) for r in results) / seconds,
            "seconds": seconds, "decode_steps": len(engine.steps),
            "mean_latency_s": statistics.mean(latencies), "p99_latency_s": _percentiles(latencies)["p99"],
            "slot_utilisation": statistics.mean(s.batch_size for s in engine.steps) / slots,
        })
    lengths = [r.params.max_new_tokens for r in long_tailed_requests(n_requests, model.cfg.vocab_size, seed)]
    return {"benchmark": "batching", "requests": n_requests, "slots": slots,
            "output_lengths": {"min": min(lengths), "median": int(np.median(lengths)), "max": max(lengths)},
            "rows": rows, "speedup": rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]}


@torch.no_grad()
def speculative(target, draft, prompts: list[list[int]], new_tokens: int = 128, ks: tuple[int, ...] = (2, 4)) -> dict:
    """Batch-1 greedy decoding, plain vs speculative with a draft, on the same prompts."""
    from .sampling import SamplingParams, generate
    from .speculative import SpeculativeStats, speculative_generate

    greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    list(generate(target, prompts[0], SamplingParams(max_new_tokens=8, temperature=0)))  # warm up

    def timed(run) -> tuple[float, int]:
        start, n = time.perf_counter(), 0
        for prompt in prompts:
            n += sum(1 for _ in run(prompt))
        return time.perf_counter() - start, n

    plain_s, plain_n = timed(lambda p: generate(target, p, greedy))
    rows = [{"k": 0, "tokens_per_s": plain_n / plain_s, "acceptance": None, "tokens_per_target_forward": 1.0,
             "speedup": 1.0}]
    for k in ks:
        stats = SpeculativeStats()
        seconds, n = timed(lambda p: speculative_generate(target, draft, p, greedy, k, stats))
        rows.append({"k": k, "tokens_per_s": n / seconds, "acceptance": stats.acceptance_rate,
                     "tokens_per_target_forward": stats.tokens_per_target_forward,
                     "speedup": (n / seconds) / rows[0]["tokens_per_s"]})
    return {"benchmark": "speculative", "prompts": len(prompts), "new_tokens": new_tokens,
            "target_params": target.param_counts().total, "draft_params": draft.param_counts().total,
            "target_active": target.param_counts().active, "draft_active": draft.param_counts().active,
            "rows": rows}

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


def matmul_peak(device: torch.device | str = "cpu", n: int | None = None, iters: int = 5) -> float:
    """Measured matmul FLOP/s (fp32 on CPU, bf16 on CUDA): the roofline the others are read against."""
    dev = torch.device(device)
    n = n or (8192 if dev.type == "cuda" else 2048)  # large enough to reach the peak on each
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    generator = torch.Generator(dev).manual_seed(0)  # leaves the global RNG (training's) alone
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=generator)
    seconds = median_times({"mm": lambda: a @ b}, dev, iters)["mm"]
    return 2 * n**3 / seconds


def memory_bandwidth(device: torch.device | str = "cpu", mib: int = 256, iters: int = 5) -> float:
    """Measured memory bytes/s: a copy of `mib` MiB, far larger than any cache, reads and writes each byte."""
    dev = torch.device(device)
    src = torch.ones(mib * 2**20 // 4, device=dev)
    dst = torch.empty_like(src)
    seconds = median_times({"copy": lambda: dst.copy_(src)}, dev, iters)["copy"]
    return 2 * src.nbytes / seconds


def machine(device: torch.device | str = "cpu") -> dict:
    """The roofline of this machine: peak matmul FLOP/s and memory bandwidth, and their ratio."""
    dev = torch.device(device)
    flops, bandwidth = matmul_peak(dev), memory_bandwidth(dev)
    return {"benchmark": "machine", "device": str(dev), "threads": torch.get_num_threads(),
            "dtype": "bfloat16" if dev.type == "cuda" else "float32",
            "matmul_flops": flops, "bandwidth": bandwidth, "ridge_flops_per_byte": flops / bandwidth}


# ---- inference ------------------------------------------------------------------------------

def _percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    pick = lambda q: ordered[min(int(q * len(ordered)), len(ordered) - 1)]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


@torch.no_grad()
def batch1_decode(model, prompt_len: int = 16, new_tokens: int = 128, uncached_tokens: int = 32, seed: int = 0,
                  decode_step=None) -> dict:
    """Batch-1 greedy decoding through `generate`, with the KV cache and without it, and
    token-to-token latency (`decode_sweep` covers the batch sizes; this is the compiled step's check).

    `decode_step`: a compiled step (`sampling.compile_decode_step`) for the cached run.
    """
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
    return {
        "benchmark": "decode", "batch_size": 1, "prompt_len": prompt_len, "compiled": decode_step is not None,
        "cached_tokens_per_s": new_tokens / cached_s,
        "uncached_tokens_per_s": uncached_tokens / uncached_s,
        "first_token_ms": gaps[0] * 1e3,  # prefill + first sample
        "token_to_token_ms": {k: v * 1e3 for k, v in _percentiles(gaps[1:]).items()},
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


# ---- decode across batch sizes, and the experts each step touches ----------------------------

@torch.no_grad()
def greedy_decode(model, prompts_BP: torch.Tensor, new_tokens: int, capacity: int | None = None) -> dict:
    """Prefill a batch of prompts, then greedy-decode `new_tokens` steps, timing each: the prefill
    and step seconds, the tokens per expert per MoE layer at every step, and the tokens."""
    from .kv_cache import KVCache

    device = next(model.parameters()).device
    B, P = prompts_BP.shape
    cache = KVCache(model.cfg, B, capacity=capacity or P + new_tokens, device=device,
                    dtype=next(model.parameters()).dtype)
    sync(device)
    start = time.perf_counter()
    logits = model(prompts_BP.to(device), cache=cache).logits[:, -1]
    sync(device)
    prefill_s, step_s, counts, tokens = time.perf_counter() - start, [], [], []
    for _ in range(new_tokens):
        start = time.perf_counter()
        tokens.append(logits.argmax(-1, keepdim=True))
        out = model(tokens[-1], cache=cache)
        logits = out.logits[:, -1]
        sync(device)
        step_s.append(time.perf_counter() - start)
        counts.append(torch.stack([s.tokens_per_expert for s in out.router_stats]).cpu() if out.router_stats else None)
    return {"prefill_s": prefill_s, "step_s": step_s, "counts": counts, "tokens": torch.cat(tokens, dim=1).tolist()}


@torch.no_grad()
def decode_sweep(model, peaks: dict | None, batch_sizes=(1, 2, 4, 8, 16, 32, 64), prompt_lens=(16, 128),
                 new_tokens: int = 32, seed: int = 0) -> tuple[dict, dict]:
    """Prefill and decode tokens/s at each batch size and prompt length, token-to-token latency,
    and the FLOP/s and bytes/s achieved, against the machine's peaks (`machine()`) when given.

    Bytes per decode step count what a step must read: every weight but the experts, the experts
    some token actually routed to (measured per layer), and the batch's whole KV cache.
    Returns the figures and, per batch size at the first prompt length, the tokens each expert
    got at each step, (steps, MoE layers, E), for `expert_load`.
    """
    from . import costmodel

    cfg = model.cfg
    longest = max(prompt_lens) + new_tokens
    if longest > cfg.max_seq_len:  # before measuring anything
        raise ValueError(f"prompt {max(prompt_lens)} + {new_tokens} new tokens exceed model.max_seq_len={cfg.max_seq_len}")
    element = next(model.parameters()).element_size()
    kv_token = costmodel.kv_bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, element)
    generator = torch.Generator().manual_seed(seed)
    random_prompts = lambda B, P: torch.randint(0, cfg.vocab_size, (B, P), generator=generator)  # noqa: E731
    greedy_decode(model, random_prompts(1, 8), 4)  # warm up
    rows, routing = [], {}
    for prompt_len in prompt_lens:
        for batch in batch_sizes:
            run = greedy_decode(model, random_prompts(batch, prompt_len), new_tokens)
            flops = bytes_ = 0.0
            for i, counts in enumerate(run["counts"]):
                context = prompt_len + i + 1
                flops += batch * costmodel.flops_per_token(cfg, context)
                read = 0 if counts is None else int((counts > 0).sum())
                bytes_ += costmodel.weight_bytes(cfg, read, element) + batch * context * kv_token
            seconds = sum(run["step_s"])
            latency = _percentiles([s * 1e3 for s in run["step_s"]])
            rows.append({
                "prompt_len": prompt_len, "batch": batch,
                "prefill_tokens_per_s": batch * prompt_len / run["prefill_s"],
                "decode_tokens_per_s": batch * new_tokens / seconds,
                "p50_ms": latency["p50"], "p90_ms": latency["p90"], "p99_ms": latency["p99"],
                "gflops": flops / seconds / 1e9, "gbytes_per_s": bytes_ / seconds / 1e9,
            })
            if peaks:
                rows[-1].update(mfu=flops / seconds / peaks["matmul_flops"], mbu=bytes_ / seconds / peaks["bandwidth"])
            if prompt_len == prompt_lens[0] and run["counts"][0] is not None:
                routing[batch] = torch.stack(run["counts"])  # (steps, layers, E)
    kv_full = {name: costmodel.kv_cache_bytes(dataclasses.replace(cfg, n_kv_heads=g), 1, cfg.max_seq_len, element)
               for name, g in (("mqa", 1), ("gqa", max(cfg.n_heads // 4, 1)), ("mha", cfg.n_heads))}
    result = {"benchmark": "decode", "new_tokens": new_tokens, "rows": rows, "kv_cache_bytes_full_context": kv_full}
    if peaks:
        result.update(matmul_flops=peaks["matmul_flops"], bandwidth=peaks["bandwidth"])
    return result, routing


def expert_load(cfg, routing: dict) -> dict:
    """Per decode step and MoE layer, tokens per expert at each batch size: min / mean / max, the
    share of experts idle, distinct experts touched against E * (1 - (1 - k/E)^B)."""
    from . import costmodel

    rows = []
    for batch, counts in routing.items():  # counts (steps, layers, E)
        touched = (counts > 0).sum(-1).double()
        rows.append({
            "batch": batch, "min": int(counts.min()), "mean": counts.double().mean().item(), "max": int(counts.max()),
            "idle_share": (counts == 0).double().mean().item(),
            "distinct": touched.mean().item(), "distinct_min": int(touched.min()), "distinct_max": int(touched.max()),
            "distinct_uniform": costmodel.expected_experts(cfg.n_experts, cfg.top_k, batch),
        })
    return {"benchmark": "experts", "n_experts": cfg.n_experts, "top_k": cfg.top_k, "rows": rows}


# ---- speculative decoding at batch 1..8 -------------------------------------------------------

@torch.no_grad()
def speculative_batch(target, draft, prompts_BP: torch.Tensor, new_tokens: int, k: int) -> dict:
    """Greedy speculative decoding of a batch in lock step, against plain greedy decoding of it.

    Every round, the draft proposes k tokens for each row (k forwards of (B, 1), plus one that
    only feeds x_k, so every row's draft cache ends where its target cache does and the next
    round starts from one pending token per row), the target checks all of them in one (B, k + 1)
    forward, and each row keeps its agreeing prefix plus the target's own next token, its caches
    cut back to that by its own length. A row that has its `new_tokens` stops growing but, in
    lock step, still rides along. The tokens equal plain greedy decoding's, row by row.

    `acceptance` is the per-token rate a of the closed forms: of the drafted tokens the target
    examined (up to and including a row's first rejection), the share it accepted.
    """
    from .kv_cache import KVCache

    device = next(target.parameters()).device
    B, P = prompts_BP.shape
    capacity = P + new_tokens + 2 * (k + 1)
    for model in (target, draft):
        if capacity > model.cfg.max_seq_len:
            raise ValueError(f"prompt {P} + {new_tokens} new tokens + 2(k + 1) exceed model.max_seq_len="
                             f"{model.cfg.max_seq_len}")
    prompts_BP = prompts_BP.to(device)
    plain = greedy_decode(target, prompts_BP, new_tokens, capacity)  # the baseline
    plain_s = sum(plain["step_s"])

    t_cache, d_cache = (KVCache(m.cfg, B, capacity=capacity, device=device) for m in (target, draft))
    target(prompts_BP[:, :-1], cache=t_cache)
    draft(prompts_BP[:, :-1], cache=d_cache)
    last_B1 = prompts_BP[:, -1:]
    out = [[] for _ in range(B)]
    rounds = row_rounds = examined = accepted = emitted = 0
    draft_s = verify_s = 0.0
    while min(map(len, out)) < new_tokens:
        done_B = torch.tensor([len(o) >= new_tokens for o in out], device=device)
        start = time.perf_counter()
        x_B1, drafted = last_B1, []
        for i in range(k + 1):
            logits = draft(x_B1, cache=d_cache).logits[:, -1]
            if i < k:
                x_B1 = logits.argmax(-1, keepdim=True)
                drafted.append(x_B1)
        drafted_BK = torch.cat(drafted, dim=1)
        sync(device)
        middle = time.perf_counter()
        choice_BK1 = target(torch.cat((last_B1, drafted_BK), dim=1), cache=t_cache).logits.argmax(-1)
        sync(device)
        draft_s, verify_s = draft_s + middle - start, verify_s + time.perf_counter() - middle
        agree_BK = (choice_BK1[:, :k] == drafted_BK).long().cumprod(dim=1)
        n_B = agree_BK.sum(dim=1)
        extra_B1 = choice_BK1.gather(1, n_B[:, None])  # the target's token at the first disagreement, or a bonus
        drop_B = torch.where(done_B, k + 1, k - n_B)  # a finished row keeps nothing of this round
        t_cache.lengths -= drop_B
        d_cache.lengths -= drop_B
        last_B1 = torch.where(done_B[:, None], last_B1, extra_B1)
        for b in range(B):
            if not done_B[b]:
                out[b] += [*drafted_BK[b, :n_B[b]].tolist(), int(extra_B1[b])]
        live_n = n_B[~done_B]
        rounds += 1
        row_rounds += len(live_n)
        accepted += int(live_n.sum())
        examined += int(live_n.sum() + (live_n < k).sum())  # each accepted token, and the one rejected
        emitted += int(live_n.sum()) + len(live_n)
    spec_s = draft_s + verify_s
    return {
        "batch": B, "k": k, "plain_s": plain_s, "speculative_s": spec_s, "speedup": plain_s / spec_s,
        "acceptance": accepted / examined, "rounds": rounds,
        "tokens_per_target_forward": emitted / row_rounds,  # per row, while it runs
        "draft_cost_ratio": draft_s / (k + 1) / rounds / (plain_s / new_tokens),  # c: one draft step / one target step
        "verify_cost_ratio": verify_s / rounds / (plain_s / new_tokens),  # checking k + 1 tokens / one step
        "matches_greedy": all(o[:new_tokens] == p for o, p in zip(out, plain["tokens"])),
    }


def speculative_sweep(target, draft, prompts: list[list[int]], batch_sizes=(1, 2, 4, 8), new_tokens: int = 64,
                      k: int = 4) -> dict:
    """`speculative_batch` at each batch size, beside the closed form (1 - a^(k+1)) / ((1 - a)(k c + 1))."""
    from .costmodel import speculative_speedup, tokens_per_target_forward

    P = min(map(len, prompts))
    rows = []
    speculative_batch(target, draft, torch.tensor([prompts[0][:P]]), 8, k)  # warm up
    for batch in batch_sizes:
        rows_BP = torch.tensor([prompts[i % len(prompts)][:P] for i in range(batch)])
        r = speculative_batch(target, draft, rows_BP, new_tokens, k)
        a = min(r["acceptance"], 1 - 1e-9)
        r["closed_form_tokens_per_forward"] = tokens_per_target_forward(a, k)
        r["closed_form_speedup"] = speculative_speedup(a, k, r["draft_cost_ratio"])
        # the same with the costs as they were: k + 1 draft forwards, and a verification of
        # k + 1 tokens that costs what it cost rather than one step
        r["costed_speedup"] = r["tokens_per_target_forward"] / ((k + 1) * r["draft_cost_ratio"] + r["verify_cost_ratio"])
        rows.append(r)
    return {"benchmark": "speculative", "k": k, "new_tokens": new_tokens, "prompt_len": P, "rows": rows}

"""The measurements behind `bench.py`: each returns a dict of plain numbers (JSON-ready).

Timings use `hardware.median_times` (contenders take turns call by call); FLOPs and bytes come
from the cost model, so a measurement is read against the same arithmetic that prices `gpt4`.

Shape letters (moe/shapes.py): B batch, T time.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from .. import costmodel
from ..config import ModelConfig
from ..hardware import (
    autocast,
    dtype_name,
    matmul_peak,
    median_times,
    resolve_precision,
    sync,
)
from ..hf import to_hf_config, transformers_module
from ..infer.engine import Engine, Request
from ..infer.sampling import (
    SamplingParams,
    batch1_decode_step,
    generate,
    generate_uncached,
)
from ..infer.speculative import (
    LockstepStats,
    lockstep_capacity,
    speculative_greedy_batch,
)
from ..model import MoE, MoETransformer, SwiGLU
from ..model.kv_cache import KVCache


def moe_layer(cfg: ModelConfig, n_tokens: int = 2048, iters: int = 30, device: torch.device | str = "cpu",
              impls: tuple[str, ...] = ("auto", "grouped_mm", "loop"), seed: int = 0,
              precisions: tuple[str, ...] = ("auto",)) -> dict:
    """One MoE layer, forward + backward, against its compute floor, in each precision.

    The floor is the same matmul work at dense efficiency: top-k routing sends k * T token
    rows through experts of hidden size F, exactly the FLOPs of k * T tokens through one dense
    SwiGLU FFN of hidden size F, in the same precision. The ratio is what routing, sorting,
    gathering, scattering and the smaller per-expert matmuls cost on top.
    """
    dev = torch.device(device)
    dtypes = {p: resolve_precision(p, dev) for p in precisions}  # bad input fails before any work
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

    def run_moe(impl: str, dtype: torch.dtype) -> Callable[[], None]:
        def step() -> None:
            layer.experts.impl = impl
            with autocast(dev, dtype):
                y = layer(x).y
            y.backward(grad_y)
            clear_grads()
        return step

    def run_floor(dtype: torch.dtype) -> Callable[[], None]:
        def step() -> None:
            with autocast(dev, dtype):
                y = dense(x_dense)
            y.backward(grad_dense)
            clear_grads()
        return step

    fns = {}
    for precision, dtype in dtypes.items():
        fns.update({(precision, impl): run_moe(impl, dtype) for impl in impls})
        fns[(precision, "floor")] = run_floor(dtype)
    times = median_times(fns, dev, iters)
    expert_flops = costmodel.expert_flops(cfg, n_tokens, training=True)
    rows, ratios = [], {}
    for (precision, name), t in times.items():
        floor = times[(precision, "floor")]
        rows.append({"precision": precision, "dtype": dtype_name(dtypes[precision]),
                     "name": name if name == "floor" else f"moe[{name}]", "ms": t * 1e3,
                     "gflops": expert_flops / t / 1e9, "ratio_to_floor": t / floor})
        if name == impls[0]:
            ratios[precision] = t / floor
    layer.experts.impl = impls[0]
    return {
        "benchmark": "moe-layer",
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "shape": {"tokens": n_tokens, "d_model": cfg.d_model, "d_ff": cfg.d_ff,
                  "n_experts": cfg.n_experts, "top_k": cfg.top_k, "dispatch": cfg.dispatch},
        "impl": {p: layer.experts.resolved_impl(x.to(dtype)) for p, dtype in dtypes.items()},
        "expert_gflop_per_step": expert_flops / 1e9,
        "ratio_to_floor": ratios,
        "rows": rows,
    }


def train_step(cfg: ModelConfig, batch_size: int = 8, seq_len: int | None = None, iters: int = 10,
               device: torch.device | str = "cpu", seed: int = 0, precisions: tuple[str, ...] = ("auto",),
               hf: bool = False) -> dict:
    """Forward + backward + AdamW step of the whole model on random tokens, in each precision
    (the steps take turns): tokens/s, FLOP/s and MFU against that precision's matmul peak.

    `hf`: transformers' MixtralForCausalLM of the same shape takes its turns too, under the same
    autocast (its own fp32 loss, no auxiliary losses: it does a little less work than ours).
    """
    dev = torch.device(device)
    dtypes = {p: resolve_precision(p, dev) for p in precisions}
    seq_len = seq_len or cfg.max_seq_len
    torch.manual_seed(seed)
    models = {"moe": MoETransformer(cfg).to(dev)}
    if hf:
        models["hf"] = hf_model(cfg).to(dev)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for name, m in models.items()}
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), device=dev)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step(name: str, dtype: torch.dtype) -> Callable[[], None]:
        model, optimizer = models[name], optimizers[name]

        def run() -> None:
            with autocast(dev, dtype):
                loss = model(inputs, targets).loss if name == "moe" else model(inputs, labels=inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    fns = {(name, p): step(name, dtype) for name in models for p, dtype in dtypes.items()}
    seconds = median_times(fns, dev, iters, warmup=3)
    n_tokens = batch_size * seq_len
    flops = models["moe"].flops_per_token(seq_len, training=True) * n_tokens
    peaks = {dtype: matmul_peak(dev, dtype=dtype) for dtype in set(dtypes.values())}
    rows = []
    for (name, precision), t in seconds.items():
        dtype = dtypes[precision]
        rows.append({"model": name, "precision": precision, "dtype": dtype_name(dtype), "step_ms": t * 1e3,
                     "tokens_per_s": n_tokens / t, "achieved_gflops": flops / t / 1e9,
                     "peak_gflops": peaks[dtype] / 1e9, "mfu": flops / t / peaks[dtype]})
    first = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / first
    return {
        "benchmark": "train-step",
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "params_total": models["moe"].param_counts().total,
        "params_active": models["moe"].param_counts().active,
        "rows": rows,
        **{k: rows[0][k] for k in ("step_ms", "tokens_per_s", "achieved_gflops", "mfu")},  # the first contender
    }


def hf_model(cfg: ModelConfig):
    """transformers' MixtralForCausalLM of our shape (randomly initialised), for comparisons."""
    hf_config = to_hf_config(cfg, eot=0, pad=0)
    return transformers_module().MixtralForCausalLM(hf_config)


# ---- inference ------------------------------------------------------------------------------

def _percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    pick = lambda q: ordered[min(int(q * len(ordered)), len(ordered) - 1)]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


def bytes_per_weight(model) -> float:
    """Bytes decoding reads per weight of the model's matrices: the dtype's size; for int8, plus
    each row's fp32 scale spread over its K = d_model weights (w2's rows are longer: within 1 %)."""
    weight = model.lm_head.weight
    return 1 + 4 / weight.shape[-1] if weight.dtype == torch.int8 else weight.element_size()


def kv_bytes_per_value(model, kv_int8: bool) -> float:
    """Bytes per cached key or value: the activations' dtype, or int8 with a head's fp32 scale spread over it."""
    return 1 + 4 / model.cfg.head_dim if kv_int8 else next(model.parameters()).element_size()


@torch.no_grad()
def batch1_decode(model, prompt_len: int = 16, new_tokens: int = 128, uncached_tokens: int = 32, seed: int = 0,
                  decode_step=None, kv_int8: bool = False, peaks: dict | None = None) -> dict:
    """Batch-1 greedy decoding through `generate`, with the KV cache and without it, and
    token-to-token latency (`decode_sweep` covers the batch sizes; this is the compiled step's check).

    `decode_step`: a compiled step (`sampling.compile_decode_step`) for the cached run. Decode
    tokens/s counts token to token, past the prefill, as llama.cpp's `llama-bench` does; a step
    reads the weights but the embedding table, exactly k experts per MoE layer, and the cache.
    """
    cfg = model.cfg
    prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(seed)).tolist()
    greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    warm = SamplingParams(max_new_tokens=8, temperature=0)
    list(generate(model, prompt, warm, decode_step, kv_int8=kv_int8))
    gaps, last = [], time.perf_counter()
    start = last
    tokens = []
    for token in generate(model, prompt, greedy, decode_step, kv_int8=kv_int8):
        now = time.perf_counter()
        gaps.append(now - last)
        tokens.append(token)
        last = now
    cached_s = last - start
    start = time.perf_counter()
    generate_uncached(model, prompt, SamplingParams(max_new_tokens=uncached_tokens, temperature=0))
    uncached_s = time.perf_counter() - start
    decode_s = sum(gaps[1:])
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    kv_token = costmodel.kv_bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim,
                                            kv_bytes_per_value(model, kv_int8))
    step_bytes = (costmodel.weight_bytes(cfg, moe_layers * min(cfg.top_k, cfg.n_experts), bytes_per_weight(model))
                  + (prompt_len + new_tokens / 2) * kv_token)  # the mean context
    result = {
        "benchmark": "decode", "batch_size": 1, "prompt_len": prompt_len, "compiled": decode_step is not None,
        "weights": dtype_name(model.lm_head.weight.dtype), "kv_int8": kv_int8, "tokens": tokens,
        "cached_tokens_per_s": new_tokens / cached_s,  # the prefill included
        "decode_tokens_per_s": (new_tokens - 1) / decode_s,
        "uncached_tokens_per_s": uncached_tokens / uncached_s,
        "first_token_ms": gaps[0] * 1e3,  # prefill + first sample
        "token_to_token_ms": {k: v * 1e3 for k, v in _percentiles(gaps[1:]).items()},
        "bytes_per_step": step_bytes, "gbytes_per_s": step_bytes * (new_tokens - 1) / decode_s / 1e9,
    }
    if peaks:
        result["mbu"] = result["gbytes_per_s"] * 1e9 / peaks["bandwidth"]
    return result


def pareto_lengths(rng: np.random.Generator, n: int, min_new: int = 4, max_new: int = 160) -> np.ndarray:
    """n output lengths min_new * (1 + Pareto(1.2)), capped at max_new: most short, a few long."""
    return np.clip((min_new * (1 + rng.pareto(1.2, n))).astype(int), min_new, max_new)


def long_tailed_requests(n: int, vocab_size: int, seed: int = 0, prompt_len: int = 16,
                         min_new: int = 4, max_new: int = 160) -> list:
    """n greedy requests whose output lengths follow a Pareto tail: most short, a few long."""
    rng = np.random.default_rng(seed)
    lengths = pareto_lengths(rng, n, min_new, max_new)
    return [Request(rng.integers(0, vocab_size, prompt_len).tolist(),
                    SamplingParams(max_new_tokens=int(length), temperature=0), id=i)
            for i, length in enumerate(lengths)]


@torch.no_grad()
def batching(model, n_requests: int = 64, slots: int = 8, seed: int = 0, kv_int8: bool = False,
             decode_step=None) -> dict:
    """Static vs continuous batching on the same long-tailed workload, and with `decode_step`
    (`compile_decode_step(model)`) continuous batching through it as well, after a warm-up that
    builds its graphs."""
    modes = [("static", True, None), ("continuous", False, None)]
    if decode_step is not None:
        build_s = Engine(model, slots, kv_int8=kv_int8, decode_step=decode_step).warm_up()
        modes.append(("continuous, compiled", False, decode_step))
    rows, outputs = [], {}
    for mode, static, step in modes:
        requests = long_tailed_requests(n_requests, model.cfg.vocab_size, seed)
        engine = Engine(model, slots, static=static, kv_int8=kv_int8, decode_step=step)
        start = time.perf_counter()
        results = engine.run(requests)
        seconds = time.perf_counter() - start
        latencies = [r.latency_s for r in results]
        rows.append({
            "mode": mode,
            "tokens_per_s": sum(len(r.tokens) for r in results) / seconds,
            "seconds": seconds, "decode_steps": len(engine.steps),
            "mean_latency_s": statistics.mean(latencies), "p99_latency_s": _percentiles(latencies)["p99"],
            "slot_utilisation": statistics.mean(s.batch_size for s in engine.steps) / slots,
        })
        outputs[mode] = {r.id: r.tokens for r in results}
    lengths = [r.params.max_new_tokens for r in long_tailed_requests(n_requests, model.cfg.vocab_size, seed)]
    result = {"benchmark": "batching", "requests": n_requests, "slots": slots,
              "output_lengths": {"min": min(lengths), "median": int(np.median(lengths)), "max": max(lengths)},
              "rows": rows, "speedup": rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]}
    if decode_step is not None:
        result |= {"compiled_speedup": rows[2]["tokens_per_s"] / rows[1]["tokens_per_s"], "build_s": build_s,
                   "same_tokens": outputs["continuous, compiled"] == outputs["continuous"]}
    return result


@torch.no_grad()
def quality(models: dict, variants: list[tuple[str, bool]], prompts: list[list[int]], new_tokens: int,
            batches: list, compiled: bool = False) -> dict:
    """Each (weights, int8 KV cache) variant against fp32 weights and cache: the share of fp32's
    greedy tokens that are its own top-1 choice, and its validation loss.

    Agreement is teacher-forced: fp32 writes `new_tokens` greedy tokens after each prompt, and each
    variant, fed the prompt and those tokens in one cached forward (so an int8 cache is read as it
    is written), is asked at every position whether its argmax is fp32's next token. One early
    disagreement then costs one position, not the rest of the sequence. With `compiled`, also the
    agreement of the compiled batch-1 step `generate --compile` decodes with (`batch1_decode_step`),
    fed the same tokens one step at a time: it computes differently (fused loops; on AVX2 int8
    weights meet int16 activations, `packed._int16_int8_product`).
    """
    greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    sequences = [prompt + list(generate(models["fp32"], prompt, greedy)) for prompt in prompts]
    rows = []
    for dtype, kv_int8 in variants:
        model = models[dtype]
        device, act = next(model.parameters()).device, next(model.parameters()).dtype
        agree = total = 0
        for prompt, seq in zip(prompts, sequences):
            cache = KVCache(model.cfg, 1, capacity=len(seq), device=device, dtype=act, int8=kv_int8)
            logits = model(torch.tensor([seq[:-1]], device=device), cache=cache, decode=True).logits[0]
            predicted = logits[len(prompt) - 1:].argmax(-1).cpu()
            agree += int((predicted == torch.tensor(seq[len(prompt):])).sum())
            total += len(seq) - len(prompt)
        loss = weight = 0.0
        for batch in batches:
            B, T = batch.inputs.shape
            cache = KVCache(model.cfg, B, capacity=T, device=device, dtype=act, int8=kv_int8)
            images = None if batch.images is None else batch.images.to(device)  # a vision run's captions
            out = model(batch.inputs.to(device), batch.targets.to(device), cache=cache, images=images)
            counted = int((batch.targets != -100).sum())
            loss, weight = loss + out.ce_loss.item() * counted, weight + counted
        rows.append({"weights": dtype, "kv_cache": "int8" if kv_int8 else dtype_name(act),
                     "top1_agreement": agree / total, "tokens": total, "val_loss": loss / weight})
        if compiled:
            step = batch1_decode_step(model, kv_int8)
            rows[-1]["top1_compiled"] = _stepwise_agreement(model, step, kv_int8, prompts, sequences)
    reference = rows[0]["val_loss"]
    for row in rows:
        row["val_loss_change"] = row["val_loss"] / reference - 1
    return {"benchmark": "quality", "rows": rows}


@torch.no_grad()
def _stepwise_agreement(model, step, kv_int8: bool, prompts: list[list[int]], sequences: list[list[int]]) -> float:
    """The share of each sequence's continuation that `step` (model's compiled batch-1 step) predicts,
    fed the sequence one token at a time after an eager prefill of its prompt (which predicts the first)."""
    device, act = next(model.parameters()).device, next(model.parameters()).dtype
    agree = total = 0
    for prompt, seq in zip(prompts, sequences):
        cache = KVCache(model.cfg, 1, device=device, dtype=act, int8=kv_int8)  # the step's: the whole context
        predicted = [int(model(torch.tensor([prompt], device=device), cache=cache, decode=True).logits[0, -1].argmax())]
        for token in seq[len(prompt):-1]:
            logits = step(torch.tensor([[token]], device=device), cache=cache, decode=True).logits
            predicted.append(int(logits[0, -1].argmax()))
        agree += sum(p == t for p, t in zip(predicted, seq[len(prompt):]))
        total += len(seq) - len(prompt)
    return agree / total


# ---- decode across batch sizes, and the experts each step touches ----------------------------

@torch.no_grad()
def greedy_decode(model, prompts_BT: torch.Tensor, new_tokens: int, capacity: int | None = None,
                  kv_int8: bool = False) -> dict:
    """Prefill a batch of prompts, then greedy-decode `new_tokens` steps, timing each: the prefill
    and step seconds, the tokens per expert per MoE layer at every step, and the tokens."""
    device = next(model.parameters()).device
    B, T = prompts_BT.shape
    cache = KVCache(model.cfg, B, capacity=capacity or T + new_tokens, device=device,
                    dtype=next(model.parameters()).dtype, int8=kv_int8)
    sync(device)
    start = time.perf_counter()
    logits = model(prompts_BT.to(device), cache=cache, decode=True).logits[:, -1]
    sync(device)
    prefill_s, step_s, counts, tokens = time.perf_counter() - start, [], [], []
    for _ in range(new_tokens):
        start = time.perf_counter()
        tokens.append(logits.argmax(-1, keepdim=True))
        out = model(tokens[-1], cache=cache, decode=True)
        logits = out.logits[:, -1]
        sync(device)
        step_s.append(time.perf_counter() - start)
        counts.append(torch.stack([s.tokens_per_expert for s in out.router_stats]).cpu() if out.router_stats else None)
    return {"prefill_s": prefill_s, "step_s": step_s, "counts": counts, "tokens": torch.cat(tokens, dim=1).tolist()}


@torch.no_grad()
def decode_sweep(model, peaks: dict | None, batch_sizes=(1, 2, 4, 8, 16, 32, 64), prompt_lens=(16, 128),
                 new_tokens: int = 32, seed: int = 0, kv_int8: bool = False) -> tuple[dict, dict]:
    """Prefill and decode tokens/s at each batch size and prompt length, token-to-token latency,
    and the FLOP/s and bytes/s achieved, against the machine's peaks (`machine()`) when given.

    Bytes per decode step count what a step must read: every weight but the experts, the experts
    some token actually routed to (measured per layer), and the batch's whole KV cache.
    Returns the figures and, per batch size at the first prompt length, the tokens each expert
    got at each step, (steps, MoE layers, E), for `expert_load`.
    """
    cfg = model.cfg
    longest = max(prompt_lens) + new_tokens
    if longest > cfg.max_seq_len:  # before measuring anything
        raise ValueError(f"prompt {max(prompt_lens)} + {new_tokens} new tokens exceed model.max_seq_len={cfg.max_seq_len}")
    element, kv_value = bytes_per_weight(model), kv_bytes_per_value(model, kv_int8)
    kv_token = costmodel.kv_bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, kv_value)
    generator = torch.Generator().manual_seed(seed)
    random_prompts = lambda B, P: torch.randint(0, cfg.vocab_size, (B, P), generator=generator)  # noqa: E731
    greedy_decode(model, random_prompts(1, 8), 4)  # warm up
    rows, routing = [], {}
    for prompt_len in prompt_lens:
        for batch in batch_sizes:
            run = greedy_decode(model, random_prompts(batch, prompt_len), new_tokens, kv_int8=kv_int8)
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
    kv_full = {name: costmodel.kv_cache_bytes(dataclasses.replace(cfg, n_kv_heads=g), 1, cfg.max_seq_len, kv_value)
               for name, g in (("mqa", 1), ("gqa", max(cfg.n_heads // 4, 1)), ("mha", cfg.n_heads))}
    result = {"benchmark": "decode", "new_tokens": new_tokens, "rows": rows, "kv_cache_bytes_full_context": kv_full}
    if peaks:
        result.update(matmul_flops=peaks["matmul_flops"], bandwidth=peaks["bandwidth"])
    return result, routing


def expert_load(cfg, routing: dict) -> dict:
    """Per decode step and MoE layer, tokens per expert at each batch size: min / mean / max, the
    share of experts idle, distinct experts touched against E * (1 - (1 - k/E)^B)."""
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
def speculative_batch(target, draft, prompts_BT: torch.Tensor, new_tokens: int, k: int) -> dict:
    """Greedy speculative decoding of a batch in lock step (`speculative_greedy_batch`) against plain
    greedy decoding of it: the time of each, and the acceptance and costs the closed forms use.

    `acceptance` is the per-token rate a of the closed forms: of the drafted tokens the target
    examined (up to and including a row's first rejection), the share it accepted.
    """
    device = next(target.parameters()).device
    capacity = lockstep_capacity(prompts_BT.shape[1], new_tokens, k)
    stats = LockstepStats()
    tokens = speculative_greedy_batch(target, draft, prompts_BT, new_tokens, k, stats)  # checks the context
    plain = greedy_decode(target, prompts_BT.to(device), new_tokens, capacity)  # the baseline
    plain_s, spec_s, step_s = sum(plain["step_s"]), stats.draft_s + stats.verify_s, sum(plain["step_s"]) / new_tokens
    return {
        "batch": prompts_BT.shape[0], "k": k, "plain_s": plain_s, "speculative_s": spec_s, "speedup": plain_s / spec_s,
        "acceptance": stats.acceptance, "rounds": stats.rounds,
        "tokens_per_target_forward": stats.emitted / stats.row_rounds,  # per row, while it runs
        "draft_cost_ratio": stats.draft_s / (k + 1) / stats.rounds / step_s,  # c: one draft step / one target step
        "verify_cost_ratio": stats.verify_s / stats.rounds / step_s,  # checking k + 1 tokens / one step
        "matches_greedy": tokens == plain["tokens"],
    }


def speculative_sweep(target, draft, prompts: list[list[int]], batch_sizes=(1, 2, 4, 8), new_tokens: int = 64,
                      k: int = 4) -> dict:
    """`speculative_batch` at each batch size, beside the closed form (1 - a^(k+1)) / ((1 - a)(k c + 1))."""
    P = min(map(len, prompts))
    rows = []
    speculative_batch(target, draft, torch.tensor([prompts[0][:P]]), 8, k)  # warm up
    for batch in batch_sizes:
        rows_BT = torch.tensor([prompts[i % len(prompts)][:P] for i in range(batch)])
        r = speculative_batch(target, draft, rows_BT, new_tokens, k)
        a = min(r["acceptance"], 1 - 1e-9)
        r["closed_form_tokens_per_forward"] = costmodel.tokens_per_target_forward(a, k)
        r["closed_form_speedup"] = costmodel.speculative_speedup(a, k, r["draft_cost_ratio"])
        # the same with the costs as they were: k + 1 draft forwards, and a verification of
        # k + 1 tokens that costs what it cost rather than one step
        r["costed_speedup"] = r["tokens_per_target_forward"] / ((k + 1) * r["draft_cost_ratio"] + r["verify_cost_ratio"])
        rows.append(r)
    return {"benchmark": "speculative", "k": k, "new_tokens": new_tokens, "prompt_len": P, "rows": rows}

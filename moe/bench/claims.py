"""The reference design's arithmetic, checked: each claim of SPEC.md's "inference arithmetic"
and training-cost rows, our figure from the cost model, and a verdict (`bench.py costmodel
--claims`, and the table in docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import replace

from ..config import ModelConfig
from ..costmodel import (
    HARDWARE,
    decode_step,
    expected_experts,
    flops_per_token,
    kv_bytes_per_token,
    kv_cache_bytes,
    param_counts,
    speculative_speedup,
    tokens_per_target_forward,
    training_cost,
)

READING_WORDS_PER_MIN = (250, 1000)  # the article's reading speeds


def claims(gpt4: ModelConfig) -> list[dict]:
    """Each claim of SPEC.md's "inference arithmetic" and training-cost rows: our figure, a verdict."""
    h100, a100 = HARDWARE["h100-sxm"], HARDWARE["a100-40gb"]
    p = param_counts(gpt4)
    rows = []

    def claim(text: str, figure: str, verdict: str) -> None:
        rows.append({"claim": text, "figure": figure, "verdict": verdict})

    claim("~1.8 T parameters, 120 layers; ~55 B shared attention; ~111 B MLP parameters per expert",
          f"{p.total / 1e12:.3f} T total; attention {p.attention / 1e9:.1f} B; one expert {p.per_expert / 1e9:.1f} B "
          f"over {gpt4.n_layers} layers", "holds (the `gpt4` config's dimensions were chosen to match)")
    dense = 2 * (p.total - p.norm - p.embedding + gpt4.vocab_size * gpt4.d_model)
    claim("~280 B active parameters, ~560 GFLOP per forward token vs ~3,700 GFLOP if dense",
          f"{p.active / 1e9:.0f} B active; {flops_per_token(gpt4, 0) / 1e9:.0f} GFLOP (+{4 * gpt4.n_layers * gpt4.d_model * 8192 / 1e9:.0f} "
          f"for attention at 8k context); all experts: {dense / 1e9:,.0f} GFLOP", "holds")

    one = decode_step(gpt4, h100, batch=1, context=8192, tp=8)
    claim("decode at batch 1 is memory-bandwidth bound: every active parameter byte is read per token",
          f"gpt4, batch 1, 8k context, 8x H100 (bf16): {one['flops'] / 1e9:.0f} GFLOP over "
          f"{(one['weight_bytes'] + one['kv_bytes']) / 1e9:.0f} GB = {one['intensity']:.2f} FLOP/byte, against a "
          f"ridge of {h100.ridge:.0f}; memory {one['memory_s'] * 1e3:.1f} ms vs compute {one['compute_s'] * 1e3:.2f} ms "
          f"per token", f"holds: bandwidth-bound by {one['memory_s'] / one['compute_s']:.0f}x")

    lo, hi = (w / 60 * 2 for w in READING_WORDS_PER_MIN)
    usual = [w / 60 / 0.75 for w in READING_WORDS_PER_MIN]
    claim("reading speed 250-1,000 words/min means 8.33-33.33 tokens/s per user",
          f"{lo:.2f}-{hi:.2f} tokens/s at 2 tokens per word; {usual[0]:.2f}-{usual[1]:.2f} at the usual 0.75 "
          f"words per token", "arithmetic holds, but it assumes 2 tokens per word: about 1.5x generous")

    bandwidth8 = 8 * h100.bandwidth
    dense_1t = [2 * 2e12 / bandwidth8, 2 * 1e12 / bandwidth8]  # bf16, fp8: params + equal overheads
    claim("8x H100 cannot serve a 1 T dense model at 33.33 tokens/s (overheads equal to parameter reads)",
          f"2 x 2 TB (bf16) per token over {bandwidth8 / 1e12:.1f} TB/s: {1 / dense_1t[0]:.1f} tokens/s "
          f"({1 / dense_1t[1]:.1f} at fp8); and 2 TB of weights do not fit in 8 x 80 GB",
          f"holds, by {33.33 * dense_1t[0]:.0f}x (bf16)")

    per_token = bandwidth8 / 33.33 / 2  # parameter bytes readable per token, overheads equal
    claim("~300 B feed-forward parameters is the practical limit for an 8-way tensor-parallel H100 system",
          f"at 33.33 tokens/s: {per_token / 2 / 1e9:.0f} B parameters read per token at bf16, "
          f"{per_token / 1e9:.0f} B at fp8; 8 x 80 GB holds {8 * h100.memory / 2 / 1e9:.0f} B at bf16",
          "roughly: ~300 B lies between the bf16 and fp8 bandwidth limits, at the bf16 memory limit")

    mha = replace(gpt4, n_kv_heads=gpt4.n_heads)
    kv_mha = kv_cache_bytes(mha, 512, 2048)
    palm = 512 * 2048 * kv_bytes_per_token(118, 48, 256)  # PaLM 540B's attention, with multi-head K/V
    claim("batch 512, context 2048, a 500 B+ model with multi-head attention: the KV cache totals ~3 TB, "
          "3x the parameters",
          f"PaLM 540B's shape (118 layers, 48 heads of 256) with MHA: {palm / 1e12:.1f} TB in bf16 "
          f"({palm / (540e9 * 2):.1f}x its bf16 weights), {palm / 2 / 1e12:.1f} TB in int8 ({palm / 2 / (540e9 * 2):.1f}x); "
          f"with MQA {palm / 48 / 1e9:.0f} GB. The gpt4 shape with MHA: {kv_mha / 1e12:.1f} TB "
          f"({kv_mha / (p.total * 2):.1f}x its bf16 weights); with its MQA {kv_mha / gpt4.n_heads / 1e9:.0f} GB",
          "holds if the cache is stored in 8 bits beside 16-bit weights; with a bf16 cache it is twice "
          "that, 5.6x the weights")

    idle = (1 - gpt4.top_k / gpt4.n_experts) ** 8
    claim("16 experts top-2, batch 8: an expert sees anything from 0 to 8 tokens; per-expert batch varies",
          f"mean 8 x 2 / 16 = 1 token per expert; P(idle) = (7/8)^8 = {idle:.1%}; distinct experts "
          f"{expected_experts(16, 2, 8):.1f} of 16 (E(1 - (1 - k/E)^B)); max 8",
          "holds (and `bench.py experts` measures it)")

    a, k, c = 0.8, 4, 0.05
    speedups = []
    for batch in (1, 64, 512, 1024, 2048):
        # the target's verification of k + 1 tokens per sequence, in units of one plain step
        verify = decode_step(gpt4, h100, batch * (k + 1), 2048, tp=8)["step_s"] / decode_step(gpt4, h100, batch, 2048, tp=8)["step_s"]
        speedups.append(f"{tokens_per_target_forward(a, k) / (verify + k * c):.2f}x at batch {batch} (verify = {verify:.1f} steps)")
    claim("speculative decoding only pays at small batch, where bandwidth binds; acceptance of k drafted "
          "tokens falls off exponentially",
          f"P(all k accepted) = a^k. a = {a}, k = {k}, a draft at {c:.0%} of the target's cost: the closed form "
          f"gives {speculative_speedup(a, k, c):.2f}x, assuming checking k + 1 tokens costs one step. gpt4 on "
          f"8x H100, 2k context, from the roofline: " + "; ".join(speedups) + f". At batch 1, {k + 1} tokens "
          f"route to {expected_experts(16, 2, k + 1):.1f} experts per layer instead of 2",
          "holds at large batch (no gain once decode is compute-bound, ~2k sequences here), but for a top-2 MoE "
          "it does not pay at batch 1 either: verifying k + 1 tokens reads ~4x the experts; it pays at moderate batch")

    inference = decode_step(gpt4, a100, batch=4096 // 16, context=8192, tp=8, pp=16)
    claim("inference on 128 GPUs (8-way tensor x 16-way pipeline), batch 4k+: ~500 tokens per expert",
          f"4,096 x 2 / 16 = {4096 * 2 / 16:.0f} tokens per expert per layer; weights "
          f"{p.total * 2 / 128 / 1e9:.1f} GB per GPU (bf16) plus the KV cache of 4,096 sequences at 8k, "
          f"{kv_cache_bytes(gpt4, 4096, 8192) / 128 / 1e9:.1f} GB per GPU (MQA): fits 80 GB parts, not 40 GB ones; "
          f"128 A100 at batch 256 per stage x 16, 8k context: "
          f"{inference['tokens_per_s']:,.0f} tokens/s, MFU {inference['mfu']:.0%}, "
          f"${inference['dollars_per_1k_tokens']:.4f} per 1k tokens", "holds")
    claim("batch ramped to 60 M tokens: ~7.5 M tokens per expert", f"60 M x 2 / 16 = {60e6 * 2 / 16 / 1e6:.1f} M",
          "holds")

    cost = training_cost(gpt4, 13e12, a100, 25_000, 0.34, context=8192)
    span = [25_000 * a100.flops * mfu * days * 86400 for mfu, days in ((0.32, 90), (0.36, 100))]
    claim("training: ~2.15e25 FLOP, ~25,000 A100 for 90-100 days at 32-36 % MFU",
          f"6 x {p.active / 1e9:.0f} B active x 13 T tokens, with attention at 8k: {cost['flops']:.3g} FLOP; "
          f"25,000 A100 at 32-36 % for 90-100 days deliver {span[0]:.3g}-{span[1]:.3g}; at 34 %: "
          f"{cost['days']:.0f} days, ${cost['dollars'] / 1e6:.0f} M at $1 per A100-hour",
          f"holds: 6ND alone gives {6 * p.active * 13e12:.3g}; counting attention at 8k adds "
          f"{cost['flops'] / (6 * p.active * 13e12) - 1:.0%}")
    return rows

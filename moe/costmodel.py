"""An analytic cost model: parameters, FLOPs, bytes moved, KV cache, roofline time, cost.

Pure arithmetic on a `ModelConfig` and a `Hardware` spec (no torch: `import moe.costmodel` works
without it), so it can price the full-size `gpt4` config as easily as `small`, and check the
reference design's arithmetic (`claims()`, the README's table).

Conventions (those of the PaLM appendix, nanoGPT and gpt-fast):
- FLOPs: 2 per matmul weight a token uses (experts count k of E; the output head always, the
  embedding lookup never), plus 4 * n_layers * n_heads * head_dim * context for attention scores
  and values; training is 3x the forward (backward = 2 forwards).
- Bytes of a decode step: every weight the step's tokens touch is read once (the output head and
  attention always; of each MoE layer's experts, the ones some token of the batch routes to:
  E * (1 - (1 - k/E)^B) of them under uniform routing), plus the whole KV cache of the batch.
- Roofline: a step takes max(FLOPs / peak FLOP/s, bytes / bandwidth), spread evenly over the
  tensor-parallel devices (the ideal: communication is not modelled). Pipeline stages run one
  after another for a given token, so they add memory and concurrent batches, not speed per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .config import ModelConfig

READING_WORDS_PER_MIN = (250, 1000)  # the article's reading speeds


@dataclass(frozen=True)
class Hardware:
    name: str
    flops: float  # peak dense matmul FLOP/s at the compute dtype (bf16 on GPUs)
    bandwidth: float  # memory bytes/s
    memory: float  # bytes per device
    dollars_per_hour: float  # per device; an assumption to override, not a quote

    @property
    def ridge(self) -> float:
        """FLOPs per byte above which a kernel is compute-bound rather than bandwidth-bound."""
        return self.flops / self.bandwidth


# Datasheet peaks (dense, no sparsity). Prices are round on-demand cloud figures for comparisons;
# the A100's $1/hour is the reference article's own assumption.
HARDWARE = {
    "a100-40gb": Hardware("A100 40GB SXM", 312e12, 1.555e12, 40e9, 1.0),
    "a100-80gb": Hardware("A100 80GB SXM", 312e12, 2.039e12, 80e9, 1.5),
    "h100-sxm": Hardware("H100 SXM", 989e12, 3.35e12, 80e9, 2.5),
    "h200": Hardware("H200 SXM", 989e12, 4.8e12, 141e9, 3.5),
}
H100_FP8_FLOPS = 1979e12


@dataclass(frozen=True)
class Params:
    """Parameter counts by kind, as `MoETransformer.param_counts()` reports them (text model only)."""

    embedding: int
    attention: int
    experts: int  # all experts of all MoE layers
    dense_ffn: int
    router: int
    norm: int
    total: int
    active: int  # used by one token: k of E experts
    n_experts: int

    @property
    def per_expert(self) -> int:
        """One expert's parameters summed over the MoE layers (the article's "~111 B per expert")."""
        return self.experts // self.n_experts


def param_counts(cfg: ModelConfig) -> Params:
    D, F, E, L = cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.n_layers
    n_moe = moe_layers(cfg)
    embedding = cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2)
    attention = L * (2 * D * cfg.n_heads * cfg.head_dim + 2 * D * cfg.n_kv_heads * cfg.head_dim)
    experts = n_moe * E * 3 * D * F
    dense_ffn = (L - n_moe) * 3 * D * F
    router = n_moe * D * E
    norm = (2 * L + 1) * D
    total = embedding + attention + experts + dense_ffn + router + norm
    active = total - experts * (E - cfg.top_k) // E
    return Params(embedding, attention, experts, dense_ffn, router, norm, total, active, E)


def flops_per_token(cfg: ModelConfig, context: int, training: bool = False) -> int:
    """Matmul FLOPs for one token attending to `context` positions (the same count as the model's)."""
    p = param_counts(cfg)
    head = cfg.vocab_size * cfg.d_model
    forward = 2 * (p.active - p.norm - p.embedding + head) + 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * context
    return 3 * forward if training else forward


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, bytes_per_value: float = 2) -> float:
    return 2 * n_layers * n_kv_heads * head_dim * bytes_per_value  # K and V


def kv_cache_bytes(cfg: ModelConfig, batch: int, context: int, bytes_per_value: float = 2) -> float:
    return batch * context * kv_bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, bytes_per_value)


def expected_experts(n_experts: int, top_k: int, batch: int) -> float:
    """Distinct experts a batch of tokens touches in one layer when each picks k of E uniformly."""
    return n_experts * (1 - (1 - top_k / n_experts) ** batch)


def moe_layers(cfg: ModelConfig) -> int:
    return sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))


def expected_experts_read(cfg: ModelConfig, batch: int) -> float:
    """(expert, layer) weight sets one decode step of `batch` tokens reads, under uniform routing."""
    return moe_layers(cfg) * expected_experts(cfg.n_experts, cfg.top_k, batch) if cfg.n_experts > 1 else 0.0


def weight_bytes(cfg: ModelConfig, experts_read: float, bytes_per_param: float = 2) -> float:
    """Weight bytes a forward reads when it uses `experts_read` (expert, layer) weight sets: every
    other weight once, except an untied embedding table, of which it reads only the tokens' rows."""
    p = param_counts(cfg)
    table = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    return (p.total - p.experts - table + experts_read * 3 * cfg.d_model * cfg.d_ff) * bytes_per_param


def decode_step(cfg: ModelConfig, hw: Hardware, batch: int, context: int, tp: int = 1, pp: int = 1,
                bytes_per_param: float = 2, kv_bytes_per_value: float = 2) -> dict:
    """Roofline of one decode step of `batch` sequences at `context` tokens on tp x pp devices."""
    flops = batch * flops_per_token(cfg, context)
    weights = weight_bytes(cfg, expected_experts_read(cfg, batch), bytes_per_param)
    kv = kv_cache_bytes(cfg, batch, context, kv_bytes_per_value)
    compute_s, memory_s = flops / (tp * hw.flops), (weights + kv) / (tp * hw.bandwidth)
    step_s = max(compute_s, memory_s)
    n_devices = tp * pp
    tokens_per_s = batch * pp / step_s  # pp micro-batches in flight keep every stage busy
    params_bytes = param_counts(cfg).total * bytes_per_param
    return {
        "batch": batch, "context": context, "devices": n_devices, "flops": flops,
        "weight_bytes": weights, "kv_bytes": kv, "intensity": flops / (weights + kv),
        "compute_s": compute_s, "memory_s": memory_s, "bound": "compute" if compute_s >= memory_s else "memory",
        "step_s": step_s, "tokens_per_s_per_user": 1 / step_s, "tokens_per_s": tokens_per_s,
        "mfu": flops * pp / step_s / (n_devices * hw.flops),
        "devices_for_memory": math.ceil((params_bytes + kv * pp) / hw.memory),
        "dollars_per_1k_tokens": n_devices * hw.dollars_per_hour / 3600 / tokens_per_s * 1000,
    }


def training_cost(cfg: ModelConfig, tokens: float, hw: Hardware, n_devices: int, mfu: float,
                  context: int | None = None) -> dict:
    flops = tokens * flops_per_token(cfg, context or cfg.max_seq_len, training=True)
    device_s = flops / (hw.flops * mfu)
    return {"flops": flops, "device_days": device_s / 86400, "days": device_s / n_devices / 86400,
            "dollars": device_s / 3600 * hw.dollars_per_hour}


def speculative_speedup(acceptance: float, k: int, cost_ratio: float) -> float:
    """Expected speedup of speculative decoding: (1 - a^(k+1)) / ((1 - a)(k c + 1)), with a the
    per-token acceptance rate, k drafted tokens and c the draft's cost per token over the target's
    (Leviathan et al. 2023, with the target's verification as cheap as one step)."""
    return (1 - acceptance ** (k + 1)) / ((1 - acceptance) * (k * cost_ratio + 1))


def tokens_per_target_forward(acceptance: float, k: int) -> float:
    return (1 - acceptance ** (k + 1)) / (1 - acceptance)


# ---- the reference design's arithmetic, checked --------------------------------------------------

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

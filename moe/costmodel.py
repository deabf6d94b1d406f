"""An analytic cost model: parameters, FLOPs, bytes moved, KV cache, roofline time, cost.

Pure arithmetic on a `ModelConfig` and a `Hardware` spec (no torch: `import moe.costmodel` works
without it), so it can price the full-size `gpt4` config as easily as `small`, and check the
reference design's arithmetic (`moe.bench.claims`).

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
- A training step on tp x pp devices (`training_step`): compute divided evenly, tensor
  parallelism's all-reduces at the link bandwidth, and the pipeline bubble (p - 1) / (m + p - 1).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .config import ModelConfig


@dataclass(frozen=True)
class Hardware:
    name: str
    flops: float  # peak dense matmul FLOP/s at the compute dtype (bf16 on GPUs)
    bandwidth: float  # memory bytes/s
    memory: float  # bytes per device
    dollars_per_hour: float  # per device; an assumption to override, not a quote
    link: float = 0.0  # bytes/s each way between two devices of a tensor-parallel group (0: unknown)

    @property
    def ridge(self) -> float:
        """FLOPs per byte above which a kernel is compute-bound rather than bandwidth-bound."""
        return self.flops / self.bandwidth


# Datasheet peaks (dense, no sparsity). Prices are round on-demand cloud figures for comparisons;
# the A100's $1/hour is the reference article's own assumption.
# `link`: NVLink per GPU, one direction (A100 600 GB/s, H100 and H200 900 GB/s both ways).
HARDWARE = {
    "a100-40gb": Hardware("A100 40GB SXM", 312e12, 1.555e12, 40e9, 1.0, 300e9),
    "a100-80gb": Hardware("A100 80GB SXM", 312e12, 2.039e12, 80e9, 1.5, 300e9),
    "h100-sxm": Hardware("H100 SXM", 989e12, 3.35e12, 80e9, 2.5, 450e9),
    "h200": Hardware("H200 SXM", 989e12, 4.8e12, 141e9, 3.5, 450e9),
}


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
    return Params(embedding, attention, experts, dense_ffn, router, norm, total, active_params(cfg, total, experts), E)


def active_params(cfg: ModelConfig, total: int, experts: int) -> int:
    """Parameters one token uses: all but the experts it is not routed to (k of E are)."""
    return total - experts * (cfg.n_experts - cfg.top_k) // cfg.n_experts


def flops_per_token(cfg: ModelConfig, context: int, training: bool = False, vision: bool = False) -> int:
    """Matmul FLOPs for one token attending to `context` positions (PaLM appendix B, as nanoGPT
    and torchtitan count them): 2 per active matmul weight plus attention, x3 for training.
    `vision=True` adds what the gated cross-attention costs a token that sees an image."""
    p = param_counts(cfg)
    head = cfg.vocab_size * cfg.d_model
    forward = 2 * (p.active - p.norm - p.embedding + head) + 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * context
    if vision and cfg.vision is not None:
        forward += xattn_layers(cfg) * (2 * (2 * cfg.d_model ** 2 + 3 * cfg.d_model * cfg.d_ff)
                                        + 4 * cfg.d_model * cfg.vision.n_latents)
    return 3 * forward if training else forward


def expert_flops(cfg: ModelConfig, n_tokens: int, training: bool = False) -> int:
    """Matmul FLOPs of one MoE layer's experts for n_tokens: each token's k rows through three
    D x F matmuls, exactly those of k * n_tokens tokens through one dense SwiGLU of hidden F."""
    forward = 2 * cfg.top_k * n_tokens * 3 * cfg.d_model * cfg.d_ff
    return 3 * forward if training else forward


def xattn_layers(cfg: ModelConfig) -> int:
    """Gated cross-attention blocks of the vision branch."""
    return sum(cfg.has_xattn(i) for i in range(cfg.n_layers))


def flops_per_image(cfg: ModelConfig, training: bool = False) -> int:
    """Matmul FLOPs to turn one image into visual tokens and project them to keys and values in
    every cross-attention block (2 per weight use, plus attention scores and values); 0 without
    a vision branch."""
    v, D = cfg.vision, cfg.d_model
    if v is None:
        return 0
    P, L, Dv = v.n_patches, v.n_latents, v.d_vision
    block = 2 * (4 * Dv * Dv + 8 * Dv * Dv)  # attention projections + 4x MLP, per position
    encoder = P * (2 * v.channels * v.patch_size ** 2 * Dv + block * v.vit_layers) + 4 * P * P * Dv * v.vit_layers
    # per resampler layer: keys and values for [patches; latents], everything else per latent
    resampler = (2 * (P + L) * 2 * Dv * Dv + L * (block - 4 * Dv * Dv) + 4 * L * (P + L) * Dv) * v.resampler_layers
    keys_values = xattn_layers(cfg) * 2 * L * 2 * D * D
    forward = encoder + resampler + 2 * L * Dv * D + keys_values
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


def pipeline_bubble(ranks: int, microbatches: int, stages_per_rank: int = 1) -> float:
    """The share of a pipelined step each rank sits idle under GPipe or 1F1B: (p - 1) / (m + p - 1)
    (the first stage waits out the fill, the last the drain); interleaved with v stages a rank,
    each v times shorter: (p - 1) / (v m + p - 1)."""
    return (ranks - 1) / (stages_per_rank * microbatches + ranks - 1)


def tensor_parallel_bytes(cfg: ModelConfig, tokens: int, tp: int, layers: int | None = None,
                          bytes_per_value: float = 2) -> float:
    """Bytes one device sends (and receives) for tensor parallelism in one training step of `tokens`
    tokens over `layers` layers (default all): per layer an all-reduce of the tokens' D values after
    attention and after the FFN, forward and backward, a ring moving 2 (tp - 1) / tp of it."""
    layers = cfg.n_layers if layers is None else layers
    return 4 * layers * tokens * cfg.d_model * bytes_per_value * 2 * (tp - 1) / tp


def training_step(cfg: ModelConfig, hw: Hardware, tokens: int, tp: int = 1, pp: int = 1, microbatches: int = 1,
                  mfu: float = 1.0, bytes_per_value: float = 2, context: int | None = None) -> dict:
    """One training step of one data-parallel replica over `tokens` tokens on tp x pp devices: the
    FLOPs divided evenly at `mfu` of the peak; tensor parallelism's all-reduces and the activations
    a stage passes on at `hw.link`, not overlapped with compute; the pipeline's bubble on top."""
    compute_s = tokens * flops_per_token(cfg, context or cfg.max_seq_len, training=True) / (tp * pp * hw.flops * mfu)
    layers = math.ceil(cfg.n_layers / pp)
    tp_bytes = tensor_parallel_bytes(cfg, tokens, tp, layers, bytes_per_value)
    pp_bytes = 2.0 * tokens * cfg.d_model * bytes_per_value if pp > 1 else 0.0  # activations on, gradients back
    comm_s = (tp_bytes + pp_bytes) / hw.link if hw.link else math.nan
    bubble = pipeline_bubble(pp, microbatches)
    busy_s = compute_s + (comm_s if hw.link else 0.0)
    return {"tokens": tokens, "tp": tp, "pp": pp, "microbatches": microbatches, "compute_s": compute_s,
            "tp_bytes": tp_bytes, "pp_bytes": pp_bytes, "comm_s": comm_s, "bubble": bubble,
            "step_s": busy_s / (1 - bubble)}


def report(cfg: ModelConfig, hw: Hardware, batch: int, context: int, tp: int = 1, pp: int = 1,
           bytes_per_value: float = 2) -> dict:
    """Everything `bench.py costmodel` prints: the hardware, parameter counts, FLOPs per token,
    KV-cache bytes and the roofline of one decode step (weights and cache at `bytes_per_value`)."""
    forward = flops_per_token(cfg, context)
    return {"hardware": asdict(hw), "params": asdict(param_counts(cfg)),
            "flops_per_token": {"prefill": forward, "decode": forward,
                                "training": flops_per_token(cfg, context, training=True)},
            "kv_cache_bytes": kv_cache_bytes(cfg, batch, context),
            "decode": decode_step(cfg, hw, batch, context, tp, pp, bytes_per_value, bytes_per_value)}


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

"""Rotary position embeddings and multi-query / grouped-query / multi-head attention.

Shape letters (moe/shapes.py): B batch, T time, D model width, H query heads, G key/value
heads (n_kv_heads), Dh head dim, X cache capacity.

With G = 1 (multi-query, the default) keys and values are computed for one head only; a KV
cache keeps only those, H times smaller than multi-head attention's. They are shared by all
query heads inside `scaled_dot_product_attention(enable_gqa=True)` and never copied H times.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import ModelConfig
from .kv_cache import CacheStep

# SDPA's backends but cuDNN's. cuDNN's attention builds an execution plan for each new shape, and
# over a KV cache the shape changes every decode step (the span grows by one): on an H200 that
# cost 3.6 ms a call, and eager bf16 decoding of `base` took 107 ms a token against 45 without it.
NOT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def rope_tables(positions_T: Tensor, head_dim: int, theta: float, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """cos and sin, each (T, Dh), in fp32, laid out as Mixtral/Llama's `rotate_half` expects.

    `scale` > 1 is position interpolation: positions are divided by it, so a model trained at
    context L sees positions of a context L * scale inside the range it was trained on.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions_T.device).float() / head_dim)
    angles_TDh = torch.outer(positions_T.float() / scale, inv_freq).repeat(1, 2)  # (T, Dh)
    return angles_TDh.cos(), angles_TDh.sin()


def apply_rope(x_BHTDh: Tensor, cos_TDh: Tensor, sin_TDh: Tensor) -> Tensor:
    first, second = x_BHTDh.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return x_BHTDh * cos_TDh.to(x_BHTDh.dtype) + rotated * sin_TDh.to(x_BHTDh.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.layer = layer  # which of the cache's layers is this one's
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.wqkv = None  # wq, wk and wv as one matrix, once packed for inference (`packed.pack_for_inference`)

    def forward(self, x_BTD: Tensor, cos: Tensor, sin: Tensor, kv: CacheStep | None = None) -> Tensor:
        """cos, sin: (T, Dh), or (B, 1, T, Dh) when rows sit at different positions (a cache)."""
        q, k, v = self.qkv(x_BTD)
        q = rearrange(q, "b t (h d) -> b h t d", h=self.n_heads)
        k = rearrange(k, "b t (g d) -> b g t d", g=self.n_kv_heads)
        v = rearrange(v, "b t (g d) -> b g t d", g=self.n_kv_heads)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        mask = None
        if kv is not None:
            k, v = kv.write_and_read(self.layer, k, v)  # (B, G, span, Dh): the prefix so far
            mask = kv.mask_B1TX
        dtype = core_dtype(q)
        with torch.autocast(q.device.type, enabled=False):  # the dtype is chosen here, not by autocast
            if mask is not None and q.shape[2] == 1 and torch.compiler.is_compiling():
                y = one_token_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask)
            else:
                with sdpa_backends(q, mask):
                    y = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask,
                                                       is_causal=mask is None, enable_gqa=gqa)
        return self.wo(rearrange(y.to(q.dtype), "b h t d -> b t (h d)"))

    def fuse_qkv(self) -> None:
        """Replace wq, wk and wv by one `nn.Linear`, wqkv, whose rows are theirs: one matrix product
        for the three, so a compiled decode step reads (on AVX2 quantizes) its input once and runs
        one loop, not three. For inference (`packed.pack_for_inference`): checkpoints and training
        keep the three. Done once; again it does nothing."""
        if self.wqkv is not None:
            return
        weights = [m.weight.detach() for m in (self.wq, self.wk, self.wv)]
        self.wqkv = nn.Linear(weights[0].shape[1], sum(w.shape[0] for w in weights), bias=False,
                              device=weights[0].device, dtype=weights[0].dtype)
        self.wqkv.weight.data = torch.cat(weights)
        del self.wq, self.wk, self.wv

    def qkv(self, x_BTD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x's queries, keys and values, (B, T, H Dh), (B, T, G Dh) twice: one matrix product once
        packing has fused the three matrices, three before."""
        if self.wqkv is None:
            return self.wq(x_BTD), self.wk(x_BTD), self.wv(x_BTD)
        kv_width = self.n_kv_heads * self.head_dim
        return self.wqkv(x_BTD).split((self.n_heads * self.head_dim, kv_width, kv_width), dim=-1)


def sdpa_backends(q: Tensor, mask: Tensor | None) -> contextlib.AbstractContextManager:
    """The SDPA backends a call may use: all but cuDNN's over a KV cache on CUDA (`NOT_CUDNN`)."""
    over_cache = mask is not None and q.is_cuda and not torch.compiler.is_compiling()
    return sdpa_kernel(NOT_CUDNN) if over_cache else contextlib.nullcontext()


def one_token_attention(q_BH1Dh: Tensor, k_BGXDh: Tensor, v_BGXDh: Tensor, mask_B11X: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(Dh)) v for one new token a row, inside a compiled decode step: written
    as broadcast multiplies and sums, which Inductor generates as loops in the layer's kernel (each
    key/value head's H/G query heads against its keys). SDPA's CPU kernel takes each query head
    alone through a matrix-vector product, and two batched matmuls cost ~8 us each in MKL for 65 k
    multiply-adds: as loops the exported `small` step takes 0.305 against 0.334 ms in int8, 0.596
    against 0.689 in fp32 (12 rounds in turns, one process)."""
    B, H, _, Dh = q_BH1Dh.shape
    G = k_BGXDh.shape[1]
    q_BGQ1Dh = q_BH1Dh.reshape(B, G, H // G, 1, Dh)  # heads h = g * H/G + j share key/value head g
    scores_BGQX = (q_BGQ1Dh * k_BGXDh[:, :, None]).sum(-1) * Dh**-0.5
    probs_BGQX = scores_BGQX.masked_fill(~mask_B11X, float("-inf")).softmax(dim=-1)
    return (probs_BGQX[..., None] * v_BGXDh[:, :, None]).sum(-2).reshape(B, H, 1, Dh)


def core_dtype(q: Tensor) -> torch.dtype:
    """The dtype softmax(q k^T) v runs in: q's, except bf16 on a CPU, whose flash-attention kernel
    runs its backward pass slower in bf16 than in fp32 (26 vs 17 ms at the `small` shape): there
    the few attention FLOPs are not worth it, and the projections around them stay bf16."""
    return torch.float32 if q.device.type == "cpu" and q.dtype == torch.bfloat16 else q.dtype

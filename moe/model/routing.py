"""Token-choice top-k routing: the router math, its two losses, and the dispatch plan.

Everything here is a pure function of tensors returning named tuples, so routing can be
unit-tested (or reused) without building a model.

Shape letters (moe/shapes.py): T tokens (batch and time flattened), E experts, K experts
chosen per token (top-k), A assignments kept by dispatch (T * K when dropless).

Semantics are Mixtral's: fp32 softmax over all E router logits, top-k, gates renormalised over
the k chosen. With k = 1 they are Switch Transformer's instead: the gate is the chosen expert's
probability, since one renormalised gate is always exactly 1 and the router would learn from the
auxiliary losses alone (measured: 0.5 nats behind top-2 at equal compute; docs/experiments.md).
The load-balancing loss is Switch's `E * sum_i f_i * P_i` with f_i the share of
*assignments* routed to expert i, so a perfectly balanced router scores exactly 1.0 for any k
(transformers' Mixtral `load_balancing_loss_func` counts each token's k choices without the
division by k and so scores k for the same router).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class Routing(NamedTuple):
    logits_TE: Tensor  # fp32 router logits
    probs_TE: Tensor  # fp32 softmax over all E experts
    experts_TK: Tensor  # int64 chosen experts, most probable first
    gates_TK: Tensor  # fp32 weights of the chosen experts: summing to 1 over K > 1; the probability at K = 1


class Dispatch(NamedTuple):
    order_A: Tensor  # positions in the slot-major (K * T) assignment list, grouped by expert
    tokens_A: Tensor  # the token each kept assignment carries
    counts_E: Tensor  # assignments each expert computes (contiguous groups in order_A)
    routed_E: Tensor  # assignments routed to each expert before any capacity limit

    @property
    def dropped(self) -> Tensor:
        return (self.routed_E - self.counts_E).sum()


def route(logits_TE: Tensor, k: int) -> Routing:
    """Softmax over all experts in fp32, keep the top k, renormalise their gates to sum to 1
    (k > 1); a single expert's gate is its probability (k = 1)."""
    logits_TE = logits_TE.float()
    probs_TE = logits_TE.softmax(dim=-1)
    top_TK, experts_TK = probs_TE.topk(k, dim=-1)
    gates_TK = top_TK / top_TK.sum(dim=-1, keepdim=True) if k > 1 else top_TK
    return Routing(logits_TE, probs_TE, experts_TK, gates_TK)


def load_balancing_loss(probs_TE: Tensor, experts_TK: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """Switch's auxiliary loss `E * sum_i f_i * P_i`, 1.0 when balanced, at most E / K.

    f_i: share of the T * K assignments that go to expert i (no gradient: it comes from top-k).
    P_i: mean router probability of expert i over tokens (from the full softmax: the gradient).
    Tokens where `mask_T` is False (padding) count in neither.
    """
    T, E = probs_TE.shape
    K = experts_TK.shape[-1]
    weight_T = probs_TE.new_ones(T) if mask_T is None else mask_T.to(probs_TE.dtype)
    n_tokens = weight_T.sum().clamp(min=1)
    assignments_E = probs_TE.new_zeros(E).index_add_(
        0, experts_TK.reshape(-1), weight_T.repeat_interleave(K)
    )
    f_E = assignments_E / (n_tokens * K)
    P_E = (probs_TE * weight_T[:, None]).sum(dim=0) / n_tokens
    return E * (f_E * P_E).sum()


def router_z_loss(logits_TE: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """ST-MoE's z-loss `mean(logsumexp(logits)^2)` in fp32: keeps router logits small."""
    z_T = torch.logsumexp(logits_TE.float(), dim=-1).square()
    if mask_T is None:
        return z_T.mean()
    weight_T = mask_T.to(z_T.dtype)
    return (z_T * weight_T).sum() / weight_T.sum().clamp(min=1)


def expert_capacity(n_tokens: int, k: int, n_experts: int, factor: float) -> int:
    """Assignments each expert may take in capacity mode: ceil(k * T / E * factor)."""
    return math.ceil(k * n_tokens / n_experts * factor)


def plan_dispatch(experts_TK: Tensor, n_experts: int, capacity: int | None = None) -> Dispatch:
    """Group the T * K (token, slot) assignments by expert with one stable sort.

    Assignments are listed slot-major (every token's first choice, then every second choice),
    so within an expert's group first choices come before second choices and, within a slot,
    earlier tokens before later ones. That is also the priority order of capacity mode: when
    an expert has more than `capacity` assignments, the ones at the end of its group are dropped
    (they contribute zero; the token keeps its residual). `capacity=None` drops nothing.
    """
    T, K = experts_TK.shape
    experts_A = experts_TK.t().reshape(-1)  # (K*T,) slot-major
    order_A = torch.argsort(experts_A, stable=True)
    routed_E = torch.bincount(experts_A, minlength=n_experts)
    counts_E = routed_E
    if capacity is not None:
        starts_E = routed_E.cumsum(0) - routed_E
        rank_A = torch.arange(K * T, device=experts_A.device) - starts_E[experts_A[order_A]]
        order_A = order_A[rank_A < capacity]
        counts_E = routed_E.clamp(max=capacity)
    return Dispatch(order_A, order_A % T, counts_E, routed_E)

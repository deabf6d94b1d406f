"""Dispatch: taking each token to its chosen experts and their outputs back, mixed by gate.

Shape letters (moe/shapes.py): T tokens, D model width, E experts, K experts per token,
A assignments kept, Q ranks of an expert-parallel group, U experts one rank holds, R rows a rank
receives.

Three dispatchers share one interface, `dispatcher(x_TD, routing, experts) -> (y_TD, stats)`:

    LocalDispatcher     plan (one stable sort by expert), gather, experts, combine: training and
                        prefill; capacity mode drops what overflows an expert
    AllToAllDispatcher  the same, but the experts live on the ranks of an expert-parallel group
                        and rows travel to them and back by all_to_all (`shard_experts` swaps it in)
    DecodeDispatcher    a few tokens without gradients (generation): each (token, expert) pair
                        run directly, as the sort, gather and scatter would cost more than the
                        handful of matrix-vector products themselves

A caller that decodes says so (`model(..., decode=True)`); `for_decoding` then picks the
decode dispatcher where it applies.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .experts import Experts, moe_reference
from .routing import Dispatch, Routing, expert_capacity, plan_dispatch

DECODE_TOKENS = 8  # up to this many tokens, decoding runs experts pair by pair


class RouterStats(NamedTuple):
    tokens_per_expert: Tensor  # (E,) assignments routed to each expert, before any dropping
    dropped: Tensor  # () assignments dropped by capacity (always 0 when dropless)


class Dispatcher:
    def __call__(self, x_TD: Tensor, routing: Routing, experts: Experts) -> tuple[Tensor, RouterStats]:
        """`sum_k gate_k * expert_k(x)` for every token, and what routing did."""
        raise NotImplementedError

    def for_decoding(self, n_tokens: int) -> Dispatcher:
        """The dispatcher for a decode step of n_tokens (without gradients)."""
        return self


class LocalDispatcher(Dispatcher):
    holds_all_experts = True  # so the reference loop (expert_impl = "loop") can run here

    def __init__(self, capacity_factor: float | None = None):
        self.capacity_factor = capacity_factor  # None: dropless

    def __call__(self, x_TD: Tensor, routing: Routing, experts: Experts) -> tuple[Tensor, RouterStats]:
        T, n_experts = x_TD.shape[0], routing.probs_TE.shape[-1]
        capacity = None
        if self.capacity_factor is not None:
            capacity = expert_capacity(T, routing.experts_TK.shape[-1], n_experts, self.capacity_factor)
        plan = plan_dispatch(routing.experts_TK, n_experts, capacity)
        if experts.impl == "loop" and self.holds_all_experts:
            y_TD = moe_reference(x_TD, routing, experts, capacity)
        else:
            # index_select, not x_TD[tokens]: its backward is a fast index_add, where advanced
            # indexing's is an accumulating index_put that cost ~7 % of the layer on CPU.
            x_AD = x_TD.index_select(0, plan.tokens_A)
            gates_A = routing.gates_TK.t().reshape(-1).index_select(0, plan.order_A)  # slot-major
            y_AD = self.run_experts(experts, x_AD, gates_A, plan.counts_E)
            y_TD = combine(y_AD, plan, T)
        return y_TD, RouterStats(plan.routed_E.detach(), plan.dropped.detach())

    def run_experts(self, experts: Experts, x_AD: Tensor, gates_A: Tensor, counts_E: Tensor) -> Tensor:
        return experts(x_AD, gates_A, counts_E)

    def for_decoding(self, n_tokens: int) -> Dispatcher:
        # capacity mode drops by the whole batch's counts: decoding token by token would not.
        # Compiled, the decode dispatcher's gathered form is the one without a host sync.
        few = torch.compiler.is_compiling() or n_tokens <= DECODE_TOKENS  # in this order: no guard on n
        return DECODE if self.capacity_factor is None and few else self


def combine(y_AD: Tensor, plan: Dispatch, n_tokens: int) -> Tensor:
    """Sum each token's gated expert outputs back into token order (dropped ones add nothing)."""
    return y_AD.new_zeros(n_tokens, y_AD.shape[-1]).index_add_(0, plan.tokens_A, y_AD)


class DecodeDispatcher(Dispatcher):
    def __call__(self, x_TD: Tensor, routing: Routing, experts: Experts) -> tuple[Tensor, RouterStats]:
        if torch.is_grad_enabled():
            raise ValueError("decode=True runs the experts without gradients: call it under torch.no_grad()")
        experts_TK, gates_TK = routing.experts_TK, routing.gates_TK
        routed_E = torch.zeros(routing.probs_TE.shape[-1], dtype=torch.long, device=x_TD.device)
        routed_E.scatter_add_(0, experts_TK.flatten(), torch.ones_like(experts_TK.flatten()))
        if torch.compiler.is_compiling():  # static shapes, no host sync
            y_TD = self.gathered(x_TD, experts_TK, gates_TK, experts)
        else:
            y_TD = self.pairs(x_TD, experts_TK, gates_TK, experts)
        return y_TD, RouterStats(routed_E, routed_E.new_zeros(()))

    @staticmethod
    def pairs(x_TD: Tensor, experts_TK: Tensor, gates_TK: Tensor, experts: Experts) -> Tensor:
        """Each (token, expert) pair as a matrix-vector chain, the expert ids read on the host."""
        y_TD = torch.zeros_like(x_TD)
        for t, (chosen, gates) in enumerate(zip(experts_TK.tolist(), gates_TK.tolist())):
            x = x_TD[t : t + 1]
            for e, gate in zip(chosen, gates):
                y_TD[t] += gate * experts.expert(e, x)[0]
        return y_TD

    @staticmethod
    def gathered(x_TD: Tensor, experts_TK: Tensor, gates_TK: Tensor, experts: Experts) -> Tensor:
        """The same for torch.compile: the chosen experts found on the device, no host sync."""
        out_TKD = experts.chosen(x_TD, experts_TK)
        return (out_TKD * gates_TK[..., None].to(out_TKD.dtype)).sum(dim=1)


DECODE = DecodeDispatcher()


class AllToAllDispatcher(LocalDispatcher):
    """Expert parallelism: this rank holds experts j*U .. (j+1)*U - 1 of the Q ranks in `group`
    (j its rank there, U = E / Q). Each rank sends every row to the rank holding its expert, runs
    its own experts on what it receives from all ranks, and sends the results back (two
    all_to_alls, differentiable)."""

    holds_all_experts = False

    def __init__(self, group, capacity_factor: float | None = None):
        super().__init__(capacity_factor)
        self.group = group

    def run_experts(self, experts: Experts, x_AD: Tensor, gates_A: Tensor, counts_E: Tensor) -> Tensor:
        group = self.group
        Q, U = dist.get_world_size(group), experts.w1.shape[0]
        counts_QU = counts_E.view(Q, U)  # my rows for each rank's experts
        arriving_QU = torch.empty_like(counts_QU)  # each rank's rows for my experts
        dist.all_to_all_single(arriving_QU, counts_QU.contiguous(), group=group)
        send, recv = counts_QU.sum(1).tolist(), arriving_QU.sum(1).tolist()
        x_RD = _AllToAll.apply(x_AD, send, recv, group)  # by source rank, then by my expert
        expert_R = torch.arange(U, device=x_AD.device).repeat(Q).repeat_interleave(arriving_QU.flatten())
        order_R = torch.argsort(expert_R, stable=True)  # by my expert, then by source rank
        y_sorted = experts(x_RD.index_select(0, order_R), x_RD.new_ones(x_RD.shape[0]), arriving_QU.sum(0))
        y_RD = torch.zeros_like(y_sorted).index_copy(0, order_R, y_sorted)
        return _AllToAll.apply(y_RD, recv, send, group) * gates_A[:, None].to(y_RD.dtype)

    def for_decoding(self, n_tokens: int) -> Dispatcher:
        return self  # the experts are spread over the ranks: only all_to_all reaches them


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` with uneven splits; the gradient travels back the way the rows came."""

    @staticmethod
    def forward(ctx, x_AD: Tensor, send: list[int], recv: list[int], group) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x_AD.new_empty(sum(recv), *x_AD.shape[1:])
        dist.all_to_all_single(out, x_AD.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        back = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return back, None, None, None

"""Feed-forward layers: a dense SwiGLU FFN and the mixture-of-experts layer built from E of them.

Shape legend:
    B batch, T tokens (in MoE code: batch and time flattened), D model dim,
    E experts, K experts per token, F expert hidden dim, A assignments kept by dispatch

The fast path sorts the T * K (token, slot) assignments by expert (`plan_dispatch`), gathers
the tokens once, runs each expert as one matmul chain over its contiguous rows (`grouped_mm`
over the stacked `[E, D, F]` weights on GPUs, a fused per-expert loop on CPUs), scales each row
by its gate and adds the rows back into token order. `moe_reference` is the slow,
obviously-correct loop over experts that the tests hold the fast path equal to.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .routing import (
    Dispatch,
    Routing,
    expert_capacity,
    load_balancing_loss,
    plan_dispatch,
    route,
    router_z_loss,
)

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
DECODE_TOKENS = 8  # up to this many tokens, inference runs experts pair by pair (Experts.decode)


class SwiGLU(nn.Module):
    """Dense FFN `w2(silu(w1 x) * w3 x)`, named as in Mixtral and Llama."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RouterStats(NamedTuple):
    tokens_per_expert: Tensor  # (E,) assignments routed to each expert, before any dropping
    dropped: Tensor  # () assignments dropped by capacity (always 0 when dropless)


class MoEOutput(NamedTuple):
    y: Tensor
    balance_loss: Tensor | None
    z_loss: Tensor | None
    stats: RouterStats


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights: w1, w3 `[E, D, F]`, w2 `[E, F, D]`.

    Expert e's weights are Mixtral's `experts.e.w1.weight` etc., transposed (`w1[e] = W1.T`).
    """

    def __init__(self, n_experts: int, d_model: int, d_ff: int, impl: str = "auto", init_std: float = 0.02):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.w3 = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.impl = impl
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w, std=init_std)

    def forward(self, x_AD: Tensor, gates_A: Tensor, counts_E: Tensor) -> Tensor:
        """`gate * expert(x)` for each row; rows are grouped by expert, `counts_E[e]` for expert e."""
        w1, w3, w2 = self.w1, self.w3, self.w2
        dtype = x_AD.dtype
        if torch.is_autocast_enabled(x_AD.device.type):
            dtype = torch.get_autocast_dtype(x_AD.device.type)
            x_AD, w1, w3, w2 = (t.to(dtype) for t in (x_AD, w1, w3, w2))
        gates_A = gates_A.to(dtype)
        if self.resolved_impl(x_AD) == "grouped_mm":
            offs_E = counts_E.cumsum(0).to(torch.int32)
            h_AF = F.silu(_grouped_mm(x_AD, w1, offs=offs_E)) * _grouped_mm(x_AD, w3, offs=offs_E)
            return _grouped_mm(h_AF, w2, offs=offs_E) * gates_A[:, None]
        return _SplitSwiGLU.apply(x_AD, gates_A, w1, w3, w2, counts_E.tolist())

    def expert(self, e: int, x_ND: Tensor) -> Tensor:
        """Expert e alone on a few rows: `w2(silu(w1 x) * w3 x)` (the reference and decode use it)."""
        return (F.silu(x_ND @ self.w1[e]) * (x_ND @ self.w3[e])) @ self.w2[e]

    @torch.no_grad()
    def decode(self, x_TD: Tensor, experts_TK: Tensor, gates_TK: Tensor) -> Tensor:
        """A few tokens without gradients (generation): each (token, expert) pair run directly.

        At decode time the sort, gather and scatter of the batched path cost more than the
        handful of matrix-vector products themselves.
        """
        y_TD = torch.zeros_like(x_TD)
        for t, (experts, gates) in enumerate(zip(experts_TK.tolist(), gates_TK.tolist())):
            x = x_TD[t : t + 1]
            for e, gate in zip(experts, gates):
                y_TD[t] += gate * self.expert(e, x)[0]
        return y_TD

    def decode_gathered(self, x_TD: Tensor, experts_TK: Tensor, gates_TK: Tensor) -> Tensor:
        """`decode` for torch.compile: gathers the chosen experts' weights (static shapes, no sync)."""
        w1, w3, w2 = self.w1[experts_TK], self.w3[experts_TK], self.w2[experts_TK]  # (T, K, D|F, F|D)
        h_TKF = F.silu(torch.einsum("td,tkdf->tkf", x_TD, w1)) * torch.einsum("td,tkdf->tkf", x_TD, w3)
        out_TKD = torch.einsum("tkf,tkfd->tkd", h_TKF, w2)
        return (out_TKD * gates_TK[..., None].to(out_TKD.dtype)).sum(dim=1)

    def resolved_impl(self, x: Tensor) -> str:
        """`auto`: grouped_mm for bf16 on CUDA sm80+ (one kernel, no host sync), else split.

        On a CPU `grouped_mm` is a loop of matmuls too, and the fused split loop beats it.
        """
        if self.impl == "grouped_mm" and _grouped_mm is None:
            raise ValueError(f"expert_impl='grouped_mm': this PyTorch ({torch.__version__}) has no grouped_mm")
        if self.impl != "auto":
            return self.impl
        on_ampere = x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] >= 8
        bf16_kernel = on_ampere and x.dtype == torch.bfloat16 and _grouped_mm is not None
        return "grouped_mm" if bf16_kernel else "split"


class _SplitSwiGLU(torch.autograd.Function):
    """Gated SwiGLU experts over contiguous row groups, forward and backward one expert at a time.

    Each expert's whole chain (three matmuls, the activation, the router gate) runs while its
    rows are hot in cache, and every result lands in a preallocated output: no `cat`, no
    per-expert zero gradients of the stacked weights, no extra passes over all rows for the
    gates. On a CPU this is 5-10 % faster than plain autograd over `split` slices.
    """

    @staticmethod
    def forward(ctx, x_AD: Tensor, gates_A: Tensor, w1: Tensor, w3: Tensor, w2: Tensor,
                counts: list[int]) -> Tensor:
        h1_AF = x_AD.new_empty(x_AD.shape[0], w1.shape[-1])
        h3_AF = torch.empty_like(h1_AF)
        out_AD = torch.empty_like(x_AD)  # expert outputs before gating, kept for the gate gradient
        y_AD = torch.empty_like(x_AD)
        for e, rows in _expert_rows(counts):
            x = x_AD[rows]
            torch.mm(x, w1[e], out=h1_AF[rows])
            torch.mm(x, w3[e], out=h3_AF[rows])
            torch.mm(F.silu(h1_AF[rows]) * h3_AF[rows], w2[e], out=out_AD[rows])
            torch.mul(out_AD[rows], gates_A[rows, None], out=y_AD[rows])
        ctx.save_for_backward(x_AD, gates_A, w1, w3, w2, h1_AF, h3_AF, out_AD)
        ctx.counts = counts
        return y_AD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_AD: Tensor) -> tuple[Tensor | None, ...]:
        x_AD, gates_A, w1, w3, w2, h1_AF, h3_AF, out_AD = ctx.saved_tensors
        dx_AD, d_gates_A = torch.empty_like(x_AD), torch.empty_like(gates_A)
        dw1, dw3, dw2 = torch.empty_like(w1), torch.empty_like(w3), torch.empty_like(w2)
        idle = [e for e, n in enumerate(ctx.counts) if n == 0]
        for dw in (dw1, dw3, dw2):  # zero only what no row writes: E x D x F zeros cost ~6 %
            dw[idle] = 0
        for e, rows in _expert_rows(ctx.counts):
            x, h1, h3 = x_AD[rows], h1_AF[rows], h3_AF[rows]
            torch.linalg.vecdot(dy_AD[rows], out_AD[rows], out=d_gates_A[rows])
            d_out = dy_AD[rows] * gates_A[rows, None]
            act1 = F.silu(h1)  # recomputed: cheaper than keeping another A x F tensor
            torch.mm((act1 * h3).t(), d_out, out=dw2[e])
            d_hidden = d_out @ w2[e].t()
            dh3 = d_hidden * act1
            dh1 = torch.ops.aten.silu_backward(d_hidden * h3, h1)
            torch.mm(x.t(), dh1, out=dw1[e])
            torch.mm(x.t(), dh3, out=dw3[e])
            torch.mm(dh1, w1[e].t(), out=dx_AD[rows])
            dx_AD[rows].addmm_(dh3, w3[e].t())
        return dx_AD, d_gates_A, dw1, dw3, dw2, None


def _expert_rows(counts: list[int]):
    """(expert, row slice) for every expert that received rows."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


def combine(y_AD: Tensor, plan: Dispatch, n_tokens: int) -> Tensor:
    """Sum each token's gated expert outputs back into token order (dropped ones add nothing)."""
    return y_AD.new_zeros(n_tokens, y_AD.shape[-1]).index_add_(0, plan.tokens_A, y_AD)


def moe_reference(x_TD: Tensor, routing: Routing, experts: Experts, capacity: int | None = None) -> Tensor:
    """The obviously-correct MoE: for each expert, find its tokens, run it, add gate * output.

    Capacity priority matches `plan_dispatch`: first choices before second, earlier tokens first.
    """
    y_TD = torch.zeros_like(x_TD)
    for e in range(experts.w1.shape[0]):
        slot, token = torch.nonzero(routing.experts_TK.t() == e, as_tuple=True)  # slot-major
        if capacity is not None:
            slot, token = slot[:capacity], token[:capacity]
        out = experts.expert(e, x_TD[token])
        y_TD = y_TD.index_add(0, token, (out * routing.gates_TK[token, slot, None]).to(y_TD.dtype))
    return y_TD


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


def experts_elsewhere(experts: Experts, group, x_AD: Tensor, gates_A: Tensor, counts_E: Tensor) -> Tensor:
    """Expert parallelism: `gate * expert(x)` for rows grouped by expert, where this rank holds only
    experts j*E/N .. (j+1)*E/N - 1 of the N ranks in `group` (j its rank there).

    Each rank sends every row to the rank holding its expert, runs its own experts on what it
    receives from all ranks, and sends the results back (two all_to_alls, differentiable).
    """
    N, local = dist.get_world_size(group), experts.w1.shape[0]
    counts_NL = counts_E.view(N, local)  # my rows for each rank's experts
    arriving_NL = torch.empty_like(counts_NL)  # each rank's rows for my experts
    dist.all_to_all_single(arriving_NL, counts_NL.contiguous(), group=group)
    send, recv = counts_NL.sum(1).tolist(), arriving_NL.sum(1).tolist()
    x_RD = _AllToAll.apply(x_AD, send, recv, group)  # by source rank, then by my expert
    expert_R = torch.arange(local, device=x_AD.device).repeat(N).repeat_interleave(arriving_NL.flatten())
    order_R = torch.argsort(expert_R, stable=True)  # by my expert, then by source rank
    y_sorted = experts(x_RD.index_select(0, order_R), x_RD.new_ones(x_RD.shape[0]), arriving_NL.sum(0))
    y_RD = torch.zeros_like(y_sorted).index_copy(0, order_R, y_sorted)
    return _AllToAll.apply(y_RD, recv, send, group) * gates_A[:, None].to(y_RD.dtype)


class MoE(nn.Module):
    """Router + experts: `y = sum_k gate_k * expert_k(x)` over each token's top-k experts.

    Under expert parallelism (`ep_group` set by `distributed.shard_experts`) the layer holds
    only its rank's share of the experts, and rows travel to and from them by all_to_all.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = Experts(cfg.n_experts, cfg.d_model, cfg.d_ff, cfg.expert_impl, cfg.init_std)
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.capacity_factor = cfg.capacity_factor if cfg.dispatch == "capacity" else None
        self.jitter = cfg.router_jitter
        self.ep_group = None

    def router_logits(self, x_TD: Tensor) -> Tensor:
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.jitter, 1 + self.jitter)
        # Routing decisions are brittle in low precision: the router always runs in fp32.
        with torch.autocast(x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), self.router.weight.float())

    def forward(self, x: Tensor, with_losses: bool = True) -> MoEOutput:
        """Mix each token's top-k experts; the auxiliary losses only when asked (training)."""
        x_TD = x.reshape(-1, x.shape[-1])
        routing = route(self.router_logits(x_TD), self.top_k)
        decoding = (not with_losses and not torch.is_grad_enabled() and x_TD.shape[0] <= DECODE_TOKENS
                    and self.ep_group is None)
        if decoding and self.capacity_factor is None:
            experts_TK = routing.experts_TK
            routed_E = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).scatter_add_(
                0, experts_TK.flatten(), torch.ones_like(experts_TK.flatten()))
            if torch.compiler.is_compiling():  # static shapes, no host sync
                y_TD = self.experts.decode_gathered(x_TD, experts_TK, routing.gates_TK)
            else:
                y_TD = self.experts.decode(x_TD, experts_TK, routing.gates_TK)
            return MoEOutput(y_TD.view_as(x).to(x.dtype), None, None, RouterStats(routed_E, routed_E.new_zeros(())))
        capacity = None
        if self.capacity_factor is not None:
            capacity = expert_capacity(x_TD.shape[0], self.top_k, self.n_experts, self.capacity_factor)
        plan = plan_dispatch(routing.experts_TK, self.n_experts, capacity)
        if self.experts.impl == "loop" and self.ep_group is None:
            y_TD = moe_reference(x_TD, routing, self.experts, capacity)
        else:
            # index_select, not x_TD[tokens]: its backward is a fast index_add, where advanced
            # indexing's is an accumulating index_put that cost ~7 % of the layer on CPU.
            x_AD = x_TD.index_select(0, plan.tokens_A)
            gates_A = routing.gates_TK.t().reshape(-1).index_select(0, plan.order_A)  # slot-major
            if self.ep_group is None:
                y_AD = self.experts(x_AD, gates_A, plan.counts_E)
            else:
                y_AD = experts_elsewhere(self.experts, self.ep_group, x_AD, gates_A, plan.counts_E)
            y_TD = combine(y_AD, plan, x_TD.shape[0])
        return MoEOutput(
            y=y_TD.view_as(x).to(x.dtype),
            balance_loss=load_balancing_loss(routing.probs_TE, routing.experts_TK) if with_losses else None,
            z_loss=router_z_loss(routing.logits_TE) if with_losses else None,
            stats=RouterStats(plan.routed_E.detach(), plan.dropped.detach()),
        )

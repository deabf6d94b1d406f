"""The experts: a dense SwiGLU FFN, E of them stacked, and the kernels that run them.

Shape letters (moe/shapes.py): T tokens, D model width, E experts, F expert hidden,
A assignments (rows grouped by expert, as `dispatch` lays them out).

`Experts.forward` runs each expert as one matmul chain over its contiguous rows (`grouped_mm`
over the stacked `[E, D, F]` weights on GPUs, the fused per-expert loop `_SplitSwiGLU` on CPUs)
and scales each row by its gate. `moe_reference` is the slow, obviously-correct loop over
experts that the tests hold every dispatcher equal to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .routing import Routing

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class SwiGLU(nn.Module):
    """Dense FFN `w2(silu(w1 x) * w3 x)`, named as in Mixtral and Llama."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


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
        """`gate * expert(x)` for each row; rows are grouped by expert, `counts_E[e]` for expert e.
        Under autocast the matmuls run in its dtype, over the fp32 weights."""
        dtype = x_AD.dtype
        if torch.is_autocast_enabled(x_AD.device.type):
            dtype = torch.get_autocast_dtype(x_AD.device.type)
        x_AD, gates_A = x_AD.to(dtype), gates_A.to(dtype)
        w1, w3, w2 = self.local_weights()
        if self.resolved_impl(x_AD) == "grouped_mm":
            w1, w3, w2 = (w.to(dtype) for w in (w1, w3, w2))  # one kernel takes them all
            offs_E = counts_E.cumsum(0).to(torch.int32)
            h_AF = F.silu(_grouped_mm(x_AD, w1, offs=offs_E)) * _grouped_mm(x_AD, w3, offs=offs_E)
            return _grouped_mm(h_AF, w2, offs=offs_E) * gates_A[:, None]
        return _SplitSwiGLU.apply(x_AD, gates_A, w1, w3, w2, counts_E.tolist())

    def expert(self, e: int, x_TD: Tensor) -> Tensor:
        """Expert e alone on a few rows: `w2(silu(w1 x) * w3 x)` (the reference and decode use it)."""
        return (F.silu(x_TD @ self.w1[e]) * (x_TD @ self.w3[e])) @ self.w2[e]

    def chosen(self, x_TD: Tensor, experts_TK: Tensor) -> Tensor:
        """(T, K, D): each token through each of its chosen experts, found on the device (no host
        sync, for torch.compile); their weights are gathered first."""
        w1, w3, w2 = self.w1[experts_TK], self.w3[experts_TK], self.w2[experts_TK]  # (T, K, D|F, F|D)
        h_TKF = F.silu(torch.einsum("td,tkdf->tkf", x_TD, w1)) * torch.einsum("td,tkdf->tkf", x_TD, w3)
        return torch.einsum("tkf,tkfd->tkd", h_TKF, w2)

    def local_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """w1, w3, w2 as this process holds them: its share of the experts under tensor parallelism
        (`tensor_parallel.parallelize` makes them DTensors sharded along E), else all of them."""
        return tuple(w.to_local() if isinstance(w, DTensor) else w for w in (self.w1, self.w3, self.w2))

    @property
    def n_experts(self) -> int:
        return self.w1.shape[0]

    @property
    def n_local_experts(self) -> int:
        return self.local_weights()[0].shape[0]

    def resolved_impl(self, x: Tensor) -> str:
        """`auto`: grouped_mm for bf16 (CUDA sm80+: one kernel, no host sync; a CPU: measured 8 %
        faster than split at the `small` shape), else split (fp32 on a CPU: the two are level, and
        split needs no grouped_mm in PyTorch).
        """
        if self.impl == "grouped_mm" and _grouped_mm is None:
            raise ValueError(f"expert_impl='grouped_mm': this PyTorch ({torch.__version__}) has no grouped_mm")
        if self.impl != "auto":
            return self.impl
        return "grouped_mm" if x.dtype == torch.bfloat16 and _grouped_mm is not None else "split"


class _SplitSwiGLU(torch.autograd.Function):
    """Gated SwiGLU experts over contiguous row groups, forward and backward one expert at a time.

    Each expert's whole chain (three matmuls, the activation, the router gate) runs while its
    rows are hot in cache, and every result lands in a preallocated output: no `cat`, no
    per-expert zero gradients of the stacked weights, no extra passes over all rows for the
    gates. On a CPU this is 5-10 % faster than plain autograd over `split` slices.

    The matmuls run in the rows' dtype. With bf16 rows and fp32 weights, each expert's weights
    are cast as it comes up (while they are hot, not all E up front in one more pass over the
    stack) and kept for the backward pass, and its weight gradients, made in bf16, land in fp32
    ones (no pass over the whole stack to cast them either).
    """

    @staticmethod
    def forward(ctx, x_AD: Tensor, gates_A: Tensor, w1: Tensor, w3: Tensor, w2: Tensor,
                counts: list[int]) -> Tensor:
        h1_AF = x_AD.new_empty(x_AD.shape[0], w1.shape[-1])
        h3_AF = torch.empty_like(h1_AF)
        out_AD = torch.empty_like(x_AD)  # expert outputs before gating, kept for the gate gradient
        y_AD = torch.empty_like(x_AD)
        cast = {}  # expert -> its weights in the rows' dtype (views of them in fp32), for the backward pass
        for e, rows in _expert_rows(counts):
            x, (w1e, w3e, w2e) = x_AD[rows], _cast(x_AD.dtype, w1[e], w3[e], w2[e])
            cast[e] = w1e, w3e, w2e
            torch.mm(x, w1e, out=h1_AF[rows])
            torch.mm(x, w3e, out=h3_AF[rows])
            torch.mm(F.silu(h1_AF[rows]) * h3_AF[rows], w2e, out=out_AD[rows])
            torch.mul(out_AD[rows], gates_A[rows, None], out=y_AD[rows])
        ctx.save_for_backward(x_AD, gates_A, w1, w3, w2, h1_AF, h3_AF, out_AD)
        ctx.counts, ctx.cast = counts, cast
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
        dy_AD = dy_AD.to(x_AD.dtype)
        for e, rows in _expert_rows(ctx.counts):
            x, h1, h3 = x_AD[rows], h1_AF[rows], h3_AF[rows]
            w1e, w3e, w2e = ctx.cast[e]
            torch.linalg.vecdot(dy_AD[rows], out_AD[rows], out=d_gates_A[rows])
            d_out = dy_AD[rows] * gates_A[rows, None]
            act1 = F.silu(h1)  # recomputed: cheaper than keeping another A x F tensor
            _mm_into(dw2[e], (act1 * h3).t(), d_out)
            d_hidden = d_out @ w2e.t()
            dh3 = d_hidden * act1
            dh1 = torch.ops.aten.silu_backward(d_hidden * h3, h1)
            _mm_into(dw1[e], x.t(), dh1)
            _mm_into(dw3[e], x.t(), dh3)
            torch.mm(dh1, w1e.t(), out=dx_AD[rows])
            dx_AD[rows].addmm_(dh3, w3e.t())
        return dx_AD, d_gates_A, dw1, dw3, dw2, None


def _cast(dtype: torch.dtype, *weights: Tensor) -> tuple[Tensor, ...]:
    return tuple(w.to(dtype) for w in weights)


def _mm_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """`out = a @ b`, written in place even where `out` is fp32 and the matmul bf16."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


def _expert_rows(counts: list[int]):
    """(expert, row slice) for every expert that received rows."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


def moe_reference(x_TD: Tensor, routing: Routing, experts: Experts, capacity: int | None = None) -> Tensor:
    """The obviously-correct MoE: for each expert, find its tokens, run it, add gate * output.

    Capacity priority matches `plan_dispatch`: first choices before second, earlier tokens first.
    """
    y_TD = torch.zeros_like(x_TD)
    for e in range(experts.n_experts):
        slot, token = torch.nonzero(routing.experts_TK.t() == e, as_tuple=True)  # slot-major
        if capacity is not None:
            slot, token = slot[:capacity], token[:capacity]
        out = experts.expert(e, x_TD[token])
        y_TD = y_TD.index_add(0, token, (out * routing.gates_TK[token, slot, None]).to(y_TD.dtype))
    return y_TD



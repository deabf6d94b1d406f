"""Tensor parallelism, Megatron-style, on DTensor: every layer's work divided among the tp ranks
of a DeviceMesh, the activations between layers whole on every rank.

Shape letters (moe/shapes.py): T tokens, D model width, E experts, U experts one rank holds,
K experts per token, A assignments.

    attention   wq column-parallel (H/tp query heads a rank), wo row-parallel. Multi-query
                attention's one key/value head cannot be divided: wk and wv stay whole on every
                rank (`ReplicatedKV`), each rank computes the same keys and values, and the
                gradients its own query heads send back to them are summed over the ranks.
                Several key/value heads (grouped-query) are divided like the query heads.
    dense FFN   w1, w3 column-parallel, w2 row-parallel
    MoE         the experts divided among the ranks, E/tp whole experts each (`TensorParallelExperts`):
                every rank routes all tokens alike, runs its own experts on their rows, and the
                partial outputs are summed. Splitting each expert's hidden units instead would
                halve every expert matmul's width at the same communication (docs/distributed.md).
    replicated  the embedding, norms, routers and the head: every rank computes them whole

Forward, one all-reduce of the (T, D) activations per attention, FFN and MoE layer; backward,
as many. The cost of replicating the key/value head: its weights, its compute and the KV cache
are not divided (the cache is 1/H of multi-head attention's, so this is small).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Replicate,
    Shard,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from .attention import Attention
from .dispatch import Dispatcher, RouterStats, combine
from .experts import Experts, SwiGLU
from .moe_layer import MoE
from .routing import Dispatch, Routing, expert_capacity, plan_dispatch


def parallelize(module: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Divide every attention, FFN and MoE layer inside `module` (a model, or the part of one a
    pipeline stage holds) among the ranks of the 1-D `mesh`, in place."""
    tp = mesh.size()
    for sub in list(module.modules()):
        if isinstance(sub, Attention):
            kv = ColwiseParallel() if sub.n_kv_heads > 1 else ReplicatedKV()
            parallelize_module(sub, mesh, {"wq": ColwiseParallel(), "wk": kv, "wv": kv, "wo": RowwiseParallel()})
            sub.n_heads //= tp
            sub.n_kv_heads = max(sub.n_kv_heads // tp, 1)
        elif isinstance(sub, SwiGLU):
            parallelize_module(sub, mesh, {"w1": ColwiseParallel(), "w3": ColwiseParallel(), "w2": RowwiseParallel()})
        elif isinstance(sub, MoE):
            capacity_factor = sub.dispatcher.capacity_factor
            for name in ("w1", "w3", "w2"):  # E along dim 0: whole experts, E/tp a rank
                whole = getattr(sub.experts, name)
                shard = distribute_tensor(whole.detach(), mesh, [Shard(0)])
                setattr(sub.experts, name, nn.Parameter(shard, whole.requires_grad))
            sub.dispatcher = TensorParallelExperts(mesh, capacity_factor)
    return module


def join_process_group(device: torch.device) -> torch.device:
    """Under torchrun: this process's device (its own GPU), the process group joined (nccl on
    CUDA, gloo on a CPU)."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def grad_summed(x: Tensor, mesh: DeviceMesh) -> Tensor:
    """x as it is; in the backward pass its gradient summed over the ranks (Megatron's f): for a
    tensor every rank holds whole that feeds work each rank does only a share of."""
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def summed(x: Tensor, mesh: DeviceMesh) -> Tensor:
    """The sum over the ranks of their partial x (Megatron's g: an all-reduce; the gradient
    comes back whole to every rank)."""
    return DTensor.from_local(x, mesh, [Partial()], run_check=False).full_tensor()


class ReplicatedKV(ParallelStyle):
    """A linear layer kept whole on every rank whose output each rank uses only part of (the
    key/value head that all query heads share): its output's gradient is summed over the ranks."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module.register_forward_hook(lambda _module, _inputs, out: grad_summed(out, device_mesh))
        return module


class TensorParallelExperts(Dispatcher):
    """The MoE layer's experts divided among the ranks of `mesh`: rank j holds experts j*U ..
    (j+1)*U - 1 (U = E / tp). Every rank holds every token and routes them alike; each runs the
    assignments to its own experts and the outputs are summed over the ranks. Capacity mode drops
    exactly what one process would (the same plan, restricted to a rank's experts)."""

    def __init__(self, mesh: DeviceMesh, capacity_factor: float | None = None):
        self.mesh, self.capacity_factor = mesh, capacity_factor

    def __call__(self, x_TD: Tensor, routing: Routing, experts: Experts) -> tuple[Tensor, RouterStats]:
        T, E = x_TD.shape[0], routing.probs_TE.shape[-1]
        U = experts.n_local_experts
        capacity = None
        if self.capacity_factor is not None:
            capacity = expert_capacity(T, routing.experts_TK.shape[-1], E, self.capacity_factor)
        # Another rank's expert becomes U, one bucket past this rank's: sorted last, then cut off.
        mine_TK = routing.experts_TK - self.mesh.get_local_rank() * U
        mine_TK = torch.where((mine_TK >= 0) & (mine_TK < U), mine_TK, U)
        plan = plan_dispatch(mine_TK, U + 1, capacity)
        kept = int(plan.counts_E[:U].sum())
        plan = Dispatch(plan.order_A[:kept], plan.tokens_A[:kept], plan.counts_E[:U], plan.routed_E[:U])
        x_TD, gates_TK = grad_summed(x_TD, self.mesh), grad_summed(routing.gates_TK, self.mesh)
        x_AD = x_TD.index_select(0, plan.tokens_A)
        gates_A = gates_TK.t().reshape(-1).index_select(0, plan.order_A)  # slot-major, as plan_dispatch lists them
        y_TD = summed(combine(experts(x_AD, gates_A, plan.counts_E), plan, T), self.mesh)
        routed_E = torch.bincount(routing.experts_TK.flatten(), minlength=E)  # every rank sees all of routing
        dropped = routed_E.new_zeros(()) if capacity is None else (routed_E - routed_E.clamp(max=capacity)).sum()
        return y_TD, RouterStats(routed_E, dropped)

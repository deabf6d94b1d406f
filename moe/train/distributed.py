"""Training beyond one process: torchrun with DDP, ZeRO-1, FSDP2 and expert parallelism.

    torchrun --nproc_per_node 2 train.py --config small --train.parallel=zero1

Every rank runs the same loop on its own slice of each global batch (rank r takes sequences
r * B/W .. (r + 1) * B/W - 1 of the batch the single process would draw), so W ranks at global
batch B take the same steps as one process at batch B. `train.parallel` picks how the model and
optimizer are laid out over the ranks:

    ddp    the model on every rank; gradients averaged by DistributedDataParallel
    zero1  DDP, and the AdamW state sharded by ZeroRedundancyOptimizer (ZeRO stage 1)
    fsdp   parameters, gradients and optimizer state sharded by FSDP2 (`fully_shard` per block)

`train.expert_parallel = N` (with ddp-style data parallelism) splits each MoE layer's experts
over groups of N consecutive ranks: rank j of a group holds experts j*E/N .. (j+1)*E/N - 1, and
tokens travel to their experts and back by all_to_all (`dispatch.AllToAllDispatcher`). Every other parameter is
replicated; gradients are summed by hand (experts over the ranks that hold the same experts).

`train.tp = T` and `train.pp = P` lay the processes out on one DeviceMesh of dp x pp x tp
(tp fastest: a tensor-parallel group sits on one machine): the model's layers divided among
the tp ranks (`model.tensor_parallel`), its blocks cut into P pipeline stages (`pipeline`), and
dp = W / (P * T) data-parallel replicas of that, laid out by `train.parallel` on the dp mesh
dimension: `ddp` as FSDP2's replicate (DDP that understands DTensor weights), `zero1` as that
with the AdamW state sharded over the dp ranks (`MeshZero1`), `fsdp` as FSDP2 over the dp group.

Checkpoints are always whole: the full model and the full optimizer state keyed by parameter
name, written once by rank 0, so a checkpoint from any layout and any number of ranks resumes
in any other (and in a single process).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from ..config import Config, ConfigError, TrainConfig
from ..model import MoE, MoETransformer
from ..model.dispatch import AllToAllDispatcher
from ..model.params import Kind, param_kind
from ..model.tensor_parallel import join_process_group, parallelize
from .pipeline import Pipeline


@dataclass
class World:
    """This process's place among the ranks (a single process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    expert_parallel: int = 1
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (CUDA under nccl)
    ep_group: dist.ProcessGroup | None = None  # the ranks that split the experts between them
    replica_group: dist.ProcessGroup | None = None  # the ranks that hold the same experts
    mesh: DeviceMesh | None = None  # ("dp", "pp", "tp") under tensor or pipeline parallelism

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def degree(self, dim: str) -> int:
        return self.mesh[dim].size() if self.mesh is not None else (self.size if dim == "dp" else 1)

    def coordinate(self, dim: str) -> int:
        return self.mesh[dim].get_local_rank() if self.mesh is not None else (self.rank if dim == "dp" else 0)

    def group(self, dim: str) -> dist.ProcessGroup | None:
        """The process group along one mesh dimension (None: all ranks, when there is no mesh)."""
        return self.mesh[dim].get_group() if self.mesh is not None else None

    @property
    def whole_model(self) -> bool:
        """Whether rank 0 holds the whole model, as one process would (it can sample from it)."""
        return self.mesh is None and self.expert_parallel == 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init(device: torch.device, cfg: TrainConfig | None = None) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (nccl on CUDA, gloo on CPU) and lay the ranks out
    as `cfg` asks; a plain run stays alone."""
    cfg = cfg or TrainConfig()
    expert_parallel, size = cfg.expert_parallel, int(os.environ.get("WORLD_SIZE", "1"))
    needs = {"train.expert_parallel": expert_parallel, "train.tp": cfg.tp, "train.pp": cfg.pp}
    if size == 1:
        for key, n in needs.items():
            if n != 1:
                raise ConfigError(f"{key}={n} needs that many processes: run under torchrun --nproc_per_node "
                                  f"{cfg.tp * cfg.pp * expert_parallel} (or pass --{key}=1)")
        return World(), device
    if size % (cfg.tp * cfg.pp):  # before joining: every process says so and stops
        raise ConfigError(f"train.tp={cfg.tp} x train.pp={cfg.pp} = {cfg.tp * cfg.pp} does not divide "
                          f"the {size} processes")
    device = join_process_group(device)
    rank, size = dist.get_rank(), dist.get_world_size()
    world = World(rank, size, expert_parallel, device)
    if cfg.tp > 1 or cfg.pp > 1:
        world.mesh = init_device_mesh(device.type, (size // (cfg.tp * cfg.pp), cfg.pp, cfg.tp),
                                      mesh_dim_names=("dp", "pp", "tp"))
    if expert_parallel > 1:
        if size % expert_parallel:
            raise ConfigError(f"train.expert_parallel={expert_parallel} does not divide the {size} processes")
        # every rank creates every group, in the same order (a collective)
        for start in range(0, size, expert_parallel):
            group = dist.new_group(list(range(start, start + expert_parallel)))
            if start <= rank < start + expert_parallel:
                world.ep_group = group
        for j in range(expert_parallel):
            group = dist.new_group(list(range(j, size, expert_parallel)))
            if rank % expert_parallel == j:
                world.replica_group = group
    return world, device


def close() -> None:
    """The end of a run under torchrun. NCCL's process group is destroyed, as NCCL asks; gloo's (on a
    CPU) is left to the process's exit, which leaves without finalizing Python (`cli.leave` says
    why: destroying it does not stop its threads while DDP, FSDP or a mesh still hold it)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        dist.destroy_process_group()


def is_expert(name: str) -> bool:
    return param_kind(name) == Kind.EXPERTS


def expert_slice(world: World, n_experts: int) -> slice:
    local = n_experts // world.expert_parallel
    start = (world.rank % world.expert_parallel) * local
    return slice(start, start + local)


def shard_experts(model: nn.Module, world: World) -> None:
    """Keep only this rank's experts in every MoE layer and route through all_to_all."""
    for module in model.modules():
        if isinstance(module, MoE):
            if module.n_experts % world.expert_parallel:
                raise ConfigError(f"train.expert_parallel={world.expert_parallel} does not divide "
                                  f"model.n_experts={module.n_experts}")
            mine = expert_slice(world, module.n_experts)
            for name in ("w1", "w3", "w2"):
                full = getattr(module.experts, name)
                setattr(module.experts, name, nn.Parameter(full.detach()[mine].clone(), full.requires_grad))
            module.dispatcher = AllToAllDispatcher(world.ep_group, module.dispatcher.capacity_factor)


def wrap(model: nn.Module, world: World, parallel: str, device: torch.device) -> nn.Module:
    """The module the training step calls; `model` itself stays reachable for everything else."""
    if not world.distributed:
        return model
    if world.expert_parallel > 1:
        shard_experts(model, world)
        return model  # gradients are summed by `sync_gradients`
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    # The vision encoder sits out its first steps (Trainer.train_step): those params get no grads.
    # The only buffers are the rotary tables, the same on every rank: nothing to broadcast each step.
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=getattr(model, "vision", None) is not None,
                                   broadcast_buffers=False)


def lay_out(model: MoETransformer, world: World, config: Config, device: torch.device,
            dtype: torch.dtype = torch.float32) -> tuple[nn.Module | None, Pipeline | None]:
    """Tensor and pipeline parallelism, then data parallelism over the dp ranks, in place:
    (the module a training step calls, None under pp; the pipeline, None without pp). `dtype`:
    what the matmuls compute in (the logits' dtype)."""
    cfg, mesh = config.train, world.mesh

    def wrap(module: nn.Module) -> nn.Module:
        if cfg.tp > 1:
            parallelize(module, mesh["tp"])
        return data_parallel(module, world, cfg.parallel)

    if cfg.pp > 1:
        return None, Pipeline(model, config, world.group("pp"), device, wrap, dtype)
    return wrap(model), None


def data_parallel(module: nn.Module, world: World, parallel: str) -> nn.Module:
    """`module` replicated (ddp, zero1: FSDP2's replicate) or sharded (fsdp) over the dp ranks of
    the mesh; gradients averaged over them in the backward pass."""
    dp = world.mesh["dp"]
    if dp.size() == 1:
        return module
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        blocks = module.blocks.values() if isinstance(module.blocks, nn.ModuleDict) else module.blocks
        for block in blocks:
            fully_shard(block, mesh=dp)
        return fully_shard(module, mesh=dp)
    try:
        from torch.distributed._composable.replicate_with_fsdp import replicate
    except ImportError:  # an older PyTorch
        raise ConfigError(f"train.parallel='ddp' with train.tp or train.pp needs FSDP2's replicate, which PyTorch "
                          f"{torch.__version__} lacks: use train.parallel='fsdp'") from None
    return replicate(module, mesh=dp)


def clip_grad_norm(model: nn.Module, max_norm: float, world: World) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over weights laid out over the ranks: the norm of the whole
    model's gradient, the same on every rank. A piece a rank holds is counted once however many
    ranks hold a copy of it: each stage's weights live on W / pp ranks, in as many distinct
    shards as its placements (or expert parallelism) make."""
    if world.mesh is None and world.expert_parallel == 1:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    holders = world.size // world.degree("pp")
    square, grads = torch.zeros((), dtype=torch.float64, device=world.device), []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        grad, shards = p.grad, 1
        if isinstance(grad, DTensor):
            shards = math.prod(grad.device_mesh.size(i) for i, pl in enumerate(grad.placements) if pl.is_shard())
            grad = grad.to_local()
        elif is_expert(name):
            shards = world.expert_parallel
        square += grad.double().square().sum() * shards / holders
        grads.append(grad)
    dist.all_reduce(square)
    norm = square.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(coef.to(grad.dtype))
    return norm


def sync_gradients(model: nn.Module, world: World) -> None:
    """Expert parallelism's gradient average over all W ranks: the all_to_all backward already
    summed each expert's gradient over its group; the replicas of the same experts add theirs."""
    if not world.distributed or world.expert_parallel == 1:
        return
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if not is_expert(name):
            dist.all_reduce(p.grad)
        elif world.size > world.expert_parallel:
            dist.all_reduce(p.grad, group=world.replica_group)
        p.grad /= world.size


class MeshZero1:
    """ZeRO stage 1 over the dp dimension of a mesh whose weights are DTensors (under tp or pp):
    each dp rank keeps AdamW's state for 1/dp of every weight (its Replicate placement on dp made
    Shard(0)), updates that shard, and the weight is gathered whole again. DTensor's redistribute
    slices (no communication: the gradients arrive averaged) and all-gathers;
    ZeroRedundancyOptimizer cannot stand in, as it broadcasts plain tensors only."""

    def __init__(self, groups: list[dict], **kwargs):
        self.weights = [p for group in groups for p in group["params"]]
        self.shards = [nn.Parameter(_sharded_over_dp(p.detach())) for p in self.weights]
        shards = iter(self.shards)
        self.inner = torch.optim.AdamW([{**group, "params": [next(shards) for _ in group["params"]]} for group in groups],
                                       foreach=False, **kwargs)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups  # a new list after load_state_dict

    @torch.no_grad()
    def step(self) -> None:
        for weight, shard in zip(self.weights, self.shards):
            shard.grad = None if weight.grad is None else weight.grad.redistribute(shard.device_mesh, shard.placements)
        self.inner.step()
        for weight, shard in zip(self.weights, self.shards):
            weight.copy_(shard.redistribute(weight.device_mesh, weight.placements))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.weights + self.shards:
            p.grad = None

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def _sharded_over_dp(weight: DTensor) -> DTensor:
    """The weight cut along the dp ranks too, along a dimension tp has not cut (so each rank's
    shard is one block of it, not strided pieces)."""
    mesh, placements = weight.device_mesh, list(weight.placements)
    cut = {pl.dim for pl in placements if pl.is_shard()}
    placements[mesh.mesh_dim_names.index("dp")] = Shard(next(d for d in range(weight.dim()) if d not in cut))
    return weight.redistribute(mesh, placements)


def make_optimizer(groups: list[dict], world: World, parallel: str, **kwargs):
    if parallel == "zero1" and world.degree("dp") > 1 and world.mesh is not None:
        return MeshZero1(groups, **kwargs)
    if world.distributed and parallel == "zero1" and world.mesh is None:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, process_group=world.group("dp"),
                                       **kwargs)
    meshes = {p.device_mesh if isinstance(p, DTensor) else None for group in groups for p in group["params"]}
    if len(meshes) > 1:  # the multi-tensor kernels take plain tensors, or DTensors on one mesh, not a mix
        return torch.optim.AdamW(groups, foreach=False, **kwargs)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except RuntimeError:  # no fused kernel for this device or PyTorch
        return torch.optim.AdamW(groups, **kwargs)


def mean(values: list[float], world: World) -> list[float]:
    """The average over ranks of a few numbers (one collective)."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return (t / world.size).tolist()


def any_rank(flag: bool, world: World) -> bool:
    """Whether the flag is set on any rank (one collective)."""
    if not world.distributed:
        return flag
    t = torch.tensor([float(flag)], device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def total(tensors: list[torch.Tensor], world: World) -> list[torch.Tensor]:
    """Each tensor summed over the data-parallel ranks (counts: tokens per expert, drops; the tp
    and pp ranks of one replica hold the same counts)."""
    if not world.distributed or not tensors:
        return tensors
    stacked = torch.stack([torch.as_tensor(t).to(world.device, torch.float64) for t in tensors])
    dist.all_reduce(stacked, group=world.group("dp"))
    return [t.to(torch.long) for t in stacked]


# ---- whole state dicts ----------------------------------------------------------------------

def _gather_experts(name: str, t: torch.Tensor, world: World) -> torch.Tensor:
    """An expert tensor (or its optimizer moment), held E/N per rank, joined whole."""
    if world.expert_parallel == 1 or not is_expert(name) or t.dim() == 0:
        return t
    parts = [torch.empty_like(t) for _ in range(world.expert_parallel)]
    dist.all_gather(parts, t.contiguous(), group=world.ep_group)
    return torch.cat(parts)


def _slice_experts(name: str, t, world: World):
    """This rank's share of a whole expert tensor (or of its optimizer moment): E along dim 0."""
    if world.expert_parallel == 1 or not is_expert(name) or not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    return t[expert_slice(world, t.shape[0])].clone()


def whole(t):
    """A tensor as a whole on CPU: FSDP2's DTensor shards gathered (a collective), others as they are."""
    if isinstance(t, torch.Tensor) and hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu() if isinstance(t, torch.Tensor) else t


def _like(t, param: torch.Tensor):
    """A whole tensor laid out as `param` is: sharded the same way under FSDP2, on its device."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(t.to(param.dtype), param.device_mesh, param.placements)
    return t


def full_model_state(model: nn.Module, world: World) -> dict:
    """Every weight, whole, on CPU (every rank takes part)."""
    state = {name: whole(_gather_experts(name, t, world)) for name, t in model.state_dict().items()}
    return {name: t for part in _stages(state, world) for name, t in part.items()}


def _stages(part, world: World) -> list:
    """Each pipeline stage's part of a state, from every rank of this rank's pipeline group (one
    all_gather; just [part] without pipeline parallelism)."""
    if world.degree("pp") == 1:
        return [part]
    parts = [None] * world.degree("pp")
    dist.all_gather_object(parts, part, group=world.group("pp"))
    return parts


def full_optimizer_state(optimizer, names: list[str], world: World, parallel: str) -> dict | None:
    """The optimizer state keyed by parameter name, whole; None on ranks other than 0 under zero1
    (where rank 0 alone gathers it)."""
    if hasattr(optimizer, "consolidate_state_dict"):  # ZeroRedundancyOptimizer
        optimizer.consolidate_state_dict(to=0)
        if not world.is_main:
            return None
    state = _by_name(optimizer.state_dict(), names)
    state["state"] = {name: {k: whole(_gather_experts(name, v, world)) for k, v in s.items()}
                      for name, s in state["state"].items()}
    parts = _stages(state, world)  # under pp: the stages' states, one parameter group at a time
    return {"state": {name: s for part in parts for name, s in part["state"].items()},
            "param_groups": [{**group, "params": [n for part in parts for n in part["param_groups"][i]["params"]]}
                             for i, group in enumerate(parts[0]["param_groups"])]}


def load_optimizer_state(model: nn.Module, optimizer, names: list[str], state: dict, world: World) -> None:
    if state["state"] and isinstance(next(iter(state["state"])), int):  # an index-keyed checkpoint (older)
        optimizer.load_state_dict(state)
        return
    params = dict(zip(names, (p for group in optimizer.param_groups for p in group["params"])))  # laid out as it keeps them
    # The kernels (fused, foreach) are this layout's choice, not the saving one's.
    kernels = {key: optimizer.param_groups[0][key] for key in ("fused", "foreach") if key in optimizer.param_groups[0]}
    state = {"state": {name: {k: _like(_slice_experts(name, v, world), params[name]) for k, v in s.items()}
                       for name, s in state["state"].items() if name in params},
             "param_groups": [{**group, **kernels} for group in state["param_groups"]]}
    optimizer.load_state_dict(_by_index(state, names))


def _by_name(state: dict, names: list[str]) -> dict:
    """A `state_dict()` keyed by parameter index (optimizer order) -> keyed by parameter name."""
    return {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def _by_index(state: dict, names: list[str]) -> dict:
    index = {name: i for i, name in enumerate(names)}
    missing = sorted(set(names) - {n for g in state["param_groups"] for n in g["params"]})
    if missing:
        raise ConfigError(f"the checkpoint's optimizer state lacks {missing[0]} ({len(missing)} in all): "
                          f"was it saved by another model or another train.freeze_lm?")
    return {"state": {index[n]: s for n, s in state["state"].items() if n in index},
            "param_groups": [{**g, "params": [index[n] for n in g["params"] if n in index]}  # this rank's (a stage's)
                             for g in state["param_groups"]]}

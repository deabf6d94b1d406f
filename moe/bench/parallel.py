"""Where a training step's time goes under tensor and pipeline parallelism, measured under torchrun.

    torchrun --nproc_per_node 2 bench.py parallel --config small --train.tp=2
    torchrun --nproc_per_node 2 bench.py parallel --config small --train.pp=2 --microbatches 1,2,4,8

Each layout runs forward + backward steps on random tokens (no optimizer) under the profiler:

    step      wall time of a step, the slowest rank's
    comm      time the ranks spent in collectives, waiting for them included (c10d ops), the mean
              rank's; what is left of the step is compute (and, under pp, idleness)
    busy      under pp: the time a rank's stages spend in their forward and backward work for
              the step's micro-batches, timed inside the schedule (the rest is waiting and sending)
    bubble    1 - busy / step of the busiest rank (the others wait on it too): the share of the
              step the critical path waits, against (p - 1) / (m + p - 1) (v m with v stages a rank)
    imbalance the busiest rank's busy time over the idlest's (1: stages of equal cost)
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from .. import costmodel
from ..config import Config, ModelConfig
from ..hardware import median_times
from ..model import MoETransformer
from ..model.experts import Experts
from ..train import distributed


def collective_seconds(prof) -> float:
    """Time this process spent inside collective ops (launching them and waiting for them)."""
    return sum(e.self_cpu_time_total for e in prof.key_averages()
               if e.key.startswith(("c10d::", "_c10d_functional::"))) / 1e6


def layout_step(config: Config, world: distributed.World, device: torch.device, iters: int = 5) -> dict:
    """One layout's step, timed on this rank (every rank calls it, with the same config)."""
    cfg, mcfg = config.train, config.model
    torch.manual_seed(cfg.seed)
    model = MoETransformer(mcfg).to(device)
    forward, pipeline = distributed.lay_out(model, world, config, device)
    tokens = torch.randint(0, mcfg.vocab_size, (cfg.micro_batch_size, mcfg.max_seq_len), device=device)

    def step():
        if pipeline is not None:
            pipeline.train(tokens, tokens, weight=1.0)
        else:
            forward(tokens, tokens).loss.backward()
        model.zero_grad(set_to_none=True)

    busy = [0.0]
    if pipeline is not None:  # time the stages' own forward and backward work inside the schedule
        for stage in pipeline.pipeline_stages:
            for name in ("forward_one_chunk", "backward_one_chunk"):
                setattr(stage, name, timed(getattr(stage, name), busy))
    for _ in range(2):
        step()
    dist.barrier()
    busy[0] = 0.0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for _ in range(iters):
            step()
        step_s = (time.perf_counter() - started) / iters
    result = {"step_s": step_s, "comm_s": collective_seconds(prof) / iters}
    if pipeline is not None:
        result["busy_s"] = busy[0] / iters
    return result


def timed(method, total: list[float]):
    """`method`, adding the seconds each call takes to total[0]."""
    def run(*args, **kwargs):
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - started
    return run


def sweep(config: Config, device: torch.device, microbatches: tuple[int, ...], schedules: tuple[str, ...],
          seqs_per_microbatch: int = 2, iters: int = 5) -> list[dict]:
    """Every (schedule, micro-batch count) of the config's layout, measured on every rank; the
    rows, the ranks' figures combined, on every rank."""
    world, device = distributed.init(device, config.train)
    if world.mesh is None:
        raise ValueError("bench.py parallel measures train.tp or train.pp > 1: run it under torchrun "
                         "with --train.tp=N or --train.pp=N")
    rows = []
    pp = config.train.pp
    variants = [(s, m) for s in schedules for m in microbatches if s == "gpipe" or m >= pp] if pp > 1 else [("-", 1)]
    for schedule, m in variants:
        train = config.train
        if train.pp > 1:
            train = dataclasses.replace(train, pp_schedule=schedule, pp_microbatches=m,
                                        micro_batch_size=m * seqs_per_microbatch)
        variant = dataclasses.replace(config, train=train)
        mine = layout_step(variant, world, device, iters)
        ranks = [None] * world.size
        dist.all_gather_object(ranks, mine)
        step_s = max(r["step_s"] for r in ranks)
        row = {"schedule": schedule, "microbatches": m, "tokens": train.micro_batch_size * config.model.max_seq_len,
               "step_s": step_s, "comm_s": sum(r["comm_s"] for r in ranks) / len(ranks)}
        layers = math.ceil(config.model.n_layers / train.pp)
        row["tp_bytes"] = costmodel.tensor_parallel_bytes(config.model, row["tokens"], train.tp, layers, 4)  # fp32
        row["bubble_model"] = costmodel.pipeline_bubble(train.pp, m, train.pp_stages // train.pp)
        if train.pp > 1:  # the busiest rank is the critical path: its idleness is the schedule's bubble
            busy = [r["busy_s"] for r in ranks]
            row["bubble"], row["imbalance"] = 1 - max(busy) / step_s, max(busy) / min(busy)
        rows.append(row)
    distributed.close()
    return rows


def expert_split(cfg: ModelConfig, tokens: int, tp: int, iters: int = 20, device: torch.device | str = "cpu") -> dict:
    """One tensor-parallel rank's expert work in an MoE layer, forward + backward, both ways tp
    ranks can share it (one process, the two taking turns): E/tp whole experts on the assignments
    routed to them (`TensorParallelExperts`), or every expert with F/tp of its hidden units on all
    assignments (Megatron's column/row split of each expert). Uniform routing."""
    generator = torch.Generator().manual_seed(0)
    experts_A = torch.randint(0, cfg.n_experts, (tokens * cfg.top_k,), generator=generator)
    counts_E = torch.bincount(experts_A, minlength=cfg.n_experts)
    local = cfg.n_experts // tp

    def contender(n_experts: int, d_ff: int, counts: torch.Tensor):
        experts = Experts(n_experts, cfg.d_model, d_ff, cfg.expert_impl).to(device)
        x = torch.randn(int(counts.sum()), cfg.d_model, device=device, requires_grad=True)
        gates = torch.rand(x.shape[0], device=device)

        def run():
            experts(x, gates, counts.to(device)).sum().backward()
        return run

    times = median_times({"divided": contender(local, cfg.d_ff, counts_E[:local]),
                          "split": contender(cfg.n_experts, cfg.d_ff // tp, counts_E)}, torch.device(device), iters)
    return {"tokens": tokens, "tp": tp, "rows_divided": int(counts_E[:local].sum()), "rows_split": int(counts_E.sum()),
            "divided_ms": times["divided"] * 1e3, "split_ms": times["split"] * 1e3,
            "split_over_divided": times["split"] / times["divided"]}

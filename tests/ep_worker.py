"""Run by tests/test_distributed.py under torchrun (2 processes, gloo): one expert-parallel MoE layer
against the same layer whole in one process. Writes what it measured to argv[1].RANK.json."""

import json
import sys

import torch
import torch.distributed as dist

from moe import MoE, load_config
from moe.cli import leave
from moe.config import TrainConfig
from moe.train.distributed import expert_slice, init, shard_experts

world, _ = init(torch.device("cpu"), TrainConfig(expert_parallel=2))
cfg = load_config("tiny").model
torch.manual_seed(0)
layer, whole = MoE(cfg), MoE(cfg)
with torch.no_grad():  # weights large enough that outputs and gradients are of order 1
    for p in layer.parameters():
        p.normal_(0.0, 0.1)
whole.load_state_dict(layer.state_dict())
x_RTD = torch.randn(world.size, 24, cfg.d_model)  # each rank's tokens
g_RTD = torch.randn(world.size, 24, cfg.d_model)  # the loss's weights: sum(y * g) over all ranks
shard_experts(layer, world)

x = x_RTD[world.rank].clone().requires_grad_()
y = layer(x, with_losses=False).y
(y * g_RTD[world.rank]).sum().backward()
dist.all_reduce(layer.router.weight.grad)  # the router is replicated: its gradient sums over the ranks

x_all = x_RTD.reshape(-1, cfg.d_model).clone().requires_grad_()
y_all = whole(x_all, with_losses=False).y
(y_all * g_RTD.reshape(-1, cfg.d_model)).sum().backward()

mine, rows = expert_slice(world, cfg.n_experts), slice(world.rank * 24, (world.rank + 1) * 24)
diff = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731  (relative)
result = {
    "experts_held": layer.experts.w1.shape[0],
    "y": diff(y, y_all[rows]),
    "x_grad": diff(x.grad, x_all.grad[rows]),
    "router_grad": diff(layer.router.weight.grad, whole.router.weight.grad),
    **{f"{w}_grad": diff(getattr(layer.experts, w).grad, getattr(whole.experts, w).grad[mine]) for w in ("w1", "w2", "w3")},
    "y_scale": y_all.abs().max().item(),
}
with open(f"{sys.argv[1]}.{world.rank}.json", "w") as f:
    json.dump(result, f)
leave(0)  # as every entry point under torchrun leaves (moe.cli.leave says why)

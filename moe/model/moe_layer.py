"""The mixture-of-experts layer: route -> dispatch (plan, gather, experts, combine) -> losses.

Shape letters (moe/shapes.py): T tokens (batch and time flattened), D model width.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .dispatch import Dispatcher, LocalDispatcher, RouterStats
from .experts import Experts
from .packed import packed_linear
from .routing import load_balancing_loss, route, router_z_loss


class MoEOutput(NamedTuple):
    y: Tensor
    balance_loss: Tensor | None
    z_loss: Tensor | None
    stats: RouterStats


class MoE(nn.Module):
    """Router + experts: `y = sum_k gate_k * expert_k(x)` over each token's top-k experts.

    `dispatcher` decides where the experts run: here (`LocalDispatcher`), or spread over the
    ranks of an expert-parallel group (`AllToAllDispatcher`, swapped in by `shard_experts`).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = Experts(cfg.n_experts, cfg.d_model, cfg.d_ff, cfg.expert_impl, cfg.init_std)
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.jitter = cfg.router_jitter
        self.dispatcher: Dispatcher = LocalDispatcher(cfg.capacity_factor if cfg.dispatch == "capacity" else None)

    def router_logits(self, x_TD: Tensor) -> Tensor:
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.jitter, 1 + self.jitter)
        # Routing decisions are brittle in low precision: the router always runs in fp32.
        with torch.autocast(x_TD.device.type, enabled=False):
            return packed_linear(x_TD.float(), self.router.weight.float())

    def forward(self, x: Tensor, with_losses: bool = True, decode: bool = False) -> MoEOutput:
        """Mix each token's top-k experts; the auxiliary losses only when asked (training).
        `decode=True`: a generation step, without gradients."""
        x_TD = x.reshape(-1, x.shape[-1])
        routing = route(self.router_logits(x_TD), self.top_k)
        dispatcher = self.dispatcher.for_decoding(x_TD.shape[0]) if decode else self.dispatcher
        y_TD, stats = dispatcher(x_TD, routing, self.experts)
        return MoEOutput(
            y=y_TD.view_as(x).to(x.dtype),
            balance_loss=load_balancing_loss(routing.probs_TE, routing.experts_TK) if with_losses else None,
            z_loss=router_z_loss(routing.logits_TE) if with_losses else None,
            stats=stats,
        )

"""Pipeline parallelism on `torch.distributed.pipelining`: the model cut into stages of whole
blocks, one per rank of the pipeline group (two with the interleaved schedule), micro-batches
flowing through them on a schedule (GPipe, 1F1B, interleaved 1F1B).

Shape letters (moe/shapes.py): B batch, T time, D model width, V vocabulary.

    stage 0        token embedding, blocks 0 .. n0 - 1    (n0 = train.pp_first_stage_layers, or
    stage 1        blocks n0 .. n1 - 1                     an even split; the reference design
    ...                                                    puts fewer layers on the first stage,
    last stage     blocks .., final norm, head             which also embeds and loads data)

Each stage passes on (x_BTD, aux), aux the running sum over the MoE layers so far of
(balance loss, z-loss): the last stage adds them to the loss, so the auxiliary losses of every
stage's routers get their gradients through the pipeline's own backward pass. Each rank keeps
only its stages' weights, under the same names as in the whole model, so checkpoints stay whole
(`distributed.full_model_state`) and resume in any layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from ..config import Config
from ..model import MoETransformer

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B}


def split_layers(n_layers: int, n_stages: int, first: int = 0) -> list[range]:
    """Blocks of each stage: `first` on stage 0 (0: an even split), the rest as even as can be,
    the later stages taking one more where they do not divide."""
    if first == 0:
        first = n_layers // n_stages
    rest, others = n_layers - first, n_stages - 1
    sizes = [first] + [rest // others + (i >= others - rest % others) for i in range(others)] if others else [n_layers]
    starts = [sum(sizes[:i]) for i in range(n_stages)]
    return [range(start, start + size) for start, size in zip(starts, sizes)]


class Stage(nn.Module):
    """Some consecutive blocks of the model, with the embedding on the first stage and the final
    norm and head on the last. Holds the model's own modules (no copies); its forward is
    `MoETransformer.forward`'s for training (no cache, no images), a stage's share of it."""

    def __init__(self, model: MoETransformer, layers: range, first: bool, last: bool):
        super().__init__()
        self.tok_emb = model.tok_emb if first else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        self.norm, self.lm_head = (model.norm, model.lm_head) if last else (None, None)
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)  # the model's rotary tables, shared
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        self.router_stats: list[tuple[int, object]] = []  # (layer, RouterStats) of each forward since cleared

    def forward(self, x: Tensor, aux: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """tokens (B, T) on the first stage, else (x_BTD, aux); returns (x_BTD or logits_BTV, aux)."""
        if self.tok_emb is not None:
            x, aux = self.tok_emb(x), torch.zeros(2, device=x.device)
        cos, sin = self.rope_cos[: x.shape[1]], self.rope_sin[: x.shape[1]]
        for layer, block in self.blocks.items():
            x, moe = block(x, cos, sin)
            if moe is not None:
                aux = aux + torch.stack([moe.balance_loss, moe.z_loss])
                self.router_stats.append((int(layer), moe.stats))
        if self.lm_head is not None:
            x = self.lm_head(self.norm(x))
        return x, aux


def keep_only(model: MoETransformer, stages: list[Stage]) -> None:
    """Drop from `model` what this rank's stages do not hold: the rest of the model lives on other
    ranks. Blocks keep their indices, so every weight keeps its whole-model name."""
    held = {id(m) for stage in stages for m in stage.modules()}
    for i, block in enumerate(model.blocks):
        if id(block) not in held:
            model.blocks[i] = nn.Module()
    for name in ("tok_emb", "norm", "lm_head"):
        if id(getattr(model, name)) not in held:
            setattr(model, name, None)


class Pipeline:
    """This rank's stages and the schedule that runs them; `train` and `evaluate` take a
    micro-batch whole and cut it into train.pp_microbatches pipeline micro-batches."""

    def __init__(self, model: MoETransformer, config: Config, group: dist.ProcessGroup, device: torch.device,
                 wrap=lambda stage: stage, logits_dtype: torch.dtype = torch.float32):
        cfg, mcfg = config.train, config.model
        n_stages, rank, pp = cfg.pp_stages, dist.get_rank(group), cfg.pp
        layers = split_layers(mcfg.n_layers, n_stages, cfg.pp_first_stage_layers)
        indices = list(range(rank, n_stages, pp))  # looped: rank r holds stages r, r + pp, ...
        self.stages = [Stage(model, layers[i], i == 0, i == n_stages - 1) for i in indices]
        keep_only(model, self.stages)
        self.moe_layers = [i for i in range(mcfg.n_layers) if mcfg.is_moe_layer(i)]
        self.n_experts, self.group, self.device = mcfg.n_experts, group, device
        self.aux_coefs = (mcfg.aux_loss_coef, mcfg.z_loss_coef)
        self.is_last = n_stages - 1 in indices
        self.weight = 1.0  # of this micro-batch in the step's mean loss
        self.parts: list[Tensor] = []  # (loss, ce, balance, z) of each pipeline micro-batch, last stage
        # What passes between stages, declared: inferred at the first step instead, the first
        # micro-batch's activations came through corrupted when the pipeline had evaluated before.
        B, T, D = cfg.micro_batch_size // cfg.pp_microbatches, mcfg.max_seq_len, mcfg.d_model
        x, aux = torch.empty(B, T, D, device=device, requires_grad=True), torch.empty(2, device=device, requires_grad=True)
        tokens = torch.empty(B, T, dtype=torch.long, device=device)
        logits = torch.empty(B, T, mcfg.vocab_size, device=device, dtype=logits_dtype, requires_grad=True)
        stages = [PipelineStage(wrap(stage), i, n_stages, device, group=group,
                                input_args=(tokens,) if i == 0 else (x, aux),
                                output_args=(logits if i == n_stages - 1 else x, aux))
                  for stage, i in zip(self.stages, indices)]
        self.pipeline_stages = stages  # torch's, around ours
        schedule = SCHEDULES[cfg.pp_schedule]
        self.schedule = schedule(stages if schedule is ScheduleInterleaved1F1B else stages[0], cfg.pp_microbatches,
                                 loss_fn=self.loss, scale_grads=False)
        self.microbatches = cfg.pp_microbatches

    def loss(self, output: tuple[Tensor, Tensor], targets_BT: Tensor) -> Tensor:
        """The last stage's loss for one pipeline micro-batch, as `MoETransformer.forward` makes it."""
        logits_BTV, aux = output
        ce = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), ignore_index=-100)
        balance, z = aux / max(len(self.moe_layers), 1)  # means over the MoE layers
        loss = ce + self.aux_coefs[0] * balance + self.aux_coefs[1] * z
        self.parts.append(torch.stack([loss, ce, balance, z]).detach())
        return loss * self.weight / self.microbatches

    def _run(self, tokens: Tensor, targets: Tensor, train: bool) -> tuple[list[float], list[Tensor], list[Tensor]]:
        for stage in self.stages:
            stage.router_stats.clear()
        self.parts.clear()
        first = self.stages[0].tok_emb is not None
        args = (tokens,) if first else ()
        if train:
            self.schedule.step(*args, target=targets)
        else:
            self.schedule.eval(*args, target=targets)
        return self._gather()

    def train(self, tokens: Tensor, targets: Tensor, weight: float) -> tuple[list[float], list[Tensor], list[Tensor]]:
        """Forward and backward of one micro-batch through the pipeline, its gradients weighted by
        `weight`; (loss, ce, balance, z) and tokens per expert and drops of every MoE layer, on
        every rank of the pipeline."""
        self.weight = weight
        return self._run(tokens, targets, train=True)

    @torch.no_grad()
    def evaluate(self, tokens: Tensor, targets: Tensor) -> float:
        self.weight = 1.0
        return self._run(tokens, targets, train=False)[0][1]

    def _gather(self) -> tuple[list[float], list[Tensor], list[Tensor]]:
        """What the stages saw, summed over the pipeline group: the losses from the last stage, each
        MoE layer's counts from the stage holding it. One collective."""
        n_moe, E = len(self.moe_layers), self.n_experts
        table = torch.zeros(4 + n_moe * (E + 1), dtype=torch.float64, device=self.device)
        if self.is_last:
            table[:4] = torch.stack(self.parts).double().mean(0)
        counts = table[4:4 + n_moe * E].view(n_moe, E)
        drops = table[4 + n_moe * E:]
        for stage in self.stages:
            for layer, stats in stage.router_stats:
                row = self.moe_layers.index(layer)
                counts[row] += stats.tokens_per_expert.double()
                drops[row] += stats.dropped.double()
        dist.all_reduce(table, group=self.group)
        return table[:4].tolist(), list(counts.long()), list(drops.long())

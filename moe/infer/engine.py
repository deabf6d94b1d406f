"""Continuous batching: a fixed number of cache slots, a queue of requests, one batched decode a step.

Every step decodes one token for every active slot in a single forward. A slot whose sequence
ends is refilled at once from the queue (the new request's prompt is prefilled into that slot,
then it joins the decode batch), so the batch size varies step to step, as in the reference
design's serving. `static=True` instead waits for the whole batch to finish before admitting
more: the baseline continuous batching is measured against.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..model.kv_cache import KVCache
from .sampling import SamplingParams, new_token_budget, sample_next


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    id: int = 0
    images: torch.Tensor | None = None  # (M, C, W, W) for the prompt's <|image|> tokens, in order


@dataclass
class Result:
    id: int
    tokens: list[int]
    finish: str  # "stop" (a stop token) or "length" (max_new_tokens or the context)
    submitted_s: float = 0.0
    finished_s: float = 0.0

    @property
    def latency_s(self) -> float:
        return self.finished_s - self.submitted_s


@dataclass
class _Running:
    request: Request
    generator: torch.Generator
    budget: int  # new tokens it may have: max_new_tokens, or less where the context ends
    tokens: list[int] = field(default_factory=list)
    submitted_s: float = 0.0


@dataclass
class StepRecord:
    batch_size: int  # sequences decoded together this step
    tokens_per_expert: list[list[int]]  # per MoE layer, per expert


class Engine:
    def __init__(self, model, slots: int, static: bool = False, kv_int8: bool = False):
        self.model, self.cfg, self.static = model, model.cfg, static
        param = next(model.parameters())
        self.device = param.device
        self.cache = KVCache(self.cfg, slots, device=self.device, dtype=param.dtype, int8=kv_int8)
        self.queue: deque[tuple[Request, float]] = deque()
        self.running: dict[int, _Running] = {}  # slot -> sequence
        self.results: list[Result] = []
        self.steps: list[StepRecord] = []

    def submit(self, request: Request) -> None:
        try:
            new_token_budget(request.prompt, request.params, self.cfg.max_seq_len)
        except ValueError as e:
            raise ValueError(f"request {request.id}: {e}") from None
        self.queue.append((request, time.perf_counter()))

    @torch.no_grad()
    def run(self, requests: list[Request] = ()) -> list[Result]:
        """Serve everything submitted (and `requests`); results in the order they finished."""
        for request in requests:
            self.submit(request)
        while self.queue or self.running:
            self.step()
        return self.results

    def step(self) -> None:
        if not self.static or not self.running:
            for slot in range(self.cache.lengths.numel()):
                if slot not in self.running and self.queue:
                    self._admit(slot, *self.queue.popleft())
        if not self.running:
            return
        slots = sorted(self.running)
        rows = torch.tensor(slots, device=self.device)
        last = torch.tensor([[self.running[s].tokens[-1]] for s in slots], device=self.device)
        out = self.model(last, cache=self.cache, rows=rows, decode=True)
        self.steps.append(StepRecord(len(slots), [s.tokens_per_expert.tolist() for s in out.router_stats]))
        for i, slot in enumerate(slots):
            self._append(slot, out.logits[i, -1])

    def _admit(self, slot: int, request: Request, submitted_s: float) -> None:
        """Prefill the prompt into a free slot and sample the request's first token."""
        self.cache.reset(slot)
        budget = new_token_budget(request.prompt, request.params, self.cache.capacity)
        self.running[slot] = _Running(request, request.params.generator(self.device), budget, submitted_s=submitted_s)
        rows = torch.tensor([slot], device=self.device)
        images = None if request.images is None else request.images[None].to(self.device)
        out = self.model(torch.tensor([request.prompt], device=self.device), cache=self.cache, rows=rows, images=images,
                         decode=True)
        self._append(slot, out.logits[0, -1])

    def _append(self, slot: int, logits_V: torch.Tensor) -> None:
        seq = self.running[slot]
        params = seq.request.params
        token = int(sample_next(logits_V[None], params, seq.generator))
        seq.tokens.append(token)
        if token in params.stop_tokens:
            self._finish(slot, "stop")
        elif len(seq.tokens) >= seq.budget:  # as `generate` stops: the same tokens, batched or alone
            self._finish(slot, "length")

    def _finish(self, slot: int, reason: str) -> None:
        seq = self.running.pop(slot)
        self.results.append(Result(seq.request.id, seq.tokens, reason, seq.submitted_s, time.perf_counter()))

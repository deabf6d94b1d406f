"""Continuous batching: a fixed number of cache slots, a queue of requests, one batched decode a step.

Every step decodes one token for every active slot in a single forward. A slot whose sequence
ends is refilled from the queue at the next step: the new request's prompt is prefilled into the
slot in chunks under a per-step token budget (`step_tokens`, of which each decoding row takes
one), so a long prompt delays the decoding rows by one chunk's time a step, never by its whole
prefill; short prompts waiting together are prefilled together, in one padded forward. Once its
prompt is in, the request samples its first token and joins the decode batch, so the batch size
varies step to step, as in the reference design's serving. `static=True` instead waits for the
whole batch to finish before admitting more: the baseline continuous batching is measured against.

`decode_step` (`compile_decode_step(model)`) runs every decode step of at most `FUSED_ROWS` (16)
rows compiled: one graph for batches of 2 to 16 rows (the batch dimension dynamic) and one for a
single row, both built by `warm_up()` before any request; larger batches run eagerly. With packed
weights that is 2-3x the eager engine's tokens/s on a CPU (docs/benchmarks.md). Prompts are
always prefilled eagerly.

`step()` is the unit a server drives (requests join with `submit` and leave with `cancel`
between steps; each step reports the tokens it produced); `run()` serves a list to completion.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..model.kv_cache import KVCache
from ..model.packed import FUSED_ROWS
from ..tokenizer import IMAGE_ID
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


class Emitted(NamedTuple):
    """One new token of one request; `finish` is set on its last ("stop" or "length")."""

    id: int
    token: int
    finish: str | None


@dataclass
class _Running:
    request: Request
    generator: torch.Generator
    budget: int  # new tokens it may have: max_new_tokens, or less where the context ends
    tokens: list[int] = field(default_factory=list)  # none yet: its prompt is still being prefilled
    submitted_s: float = 0.0
    prefilled: int = 0  # prompt tokens in the cache so far


@dataclass
class StepRecord:
    batch_size: int  # sequences decoded together this step
    tokens_per_expert: list[list[int]]  # per MoE layer, per expert, of the decoded tokens
    prefill_tokens: int = 0  # prompt tokens prefilled this step
    emitted: list[Emitted] = field(default_factory=list)
    finished: list[Result] = field(default_factory=list)


class Engine:
    def __init__(self, model, slots: int, static: bool = False, kv_int8: bool = False, step_tokens: int = 512,
                 decode_step=None):
        if step_tokens <= slots:
            raise ValueError(f"step_tokens={step_tokens} must exceed slots={slots}: each decoding row takes one "
                             f"token of a step's budget and prompts need the rest")
        self.model, self.cfg, self.static, self.step_tokens = model, model.cfg, static, step_tokens
        self.decode_step = decode_step
        param = next(model.parameters())
        self.device = param.device
        self.cache = KVCache(self.cfg, slots, device=self.device, dtype=param.dtype, int8=kv_int8)
        self.queue: deque[tuple[Request, float]] = deque()
        self.running: dict[int, _Running] = {}  # slot -> sequence, in the order they were admitted
        self.results: list[Result] = []  # what `run` served
        self.steps: list[StepRecord] = []

    @property
    def slots(self) -> int:
        return self.cache.lengths.numel()

    def submit(self, request: Request) -> None:
        try:
            new_token_budget(request.prompt, request.params, self.cfg.max_seq_len)
        except ValueError as e:
            raise ValueError(f"request {request.id}: {e}") from None
        self.queue.append((request, time.perf_counter()))

    def cancel(self, request_id: int) -> bool:
        """Drop a request, queued or running (its slot is free for the next step); False if unknown."""
        for i, (request, _) in enumerate(self.queue):
            if request.id == request_id:
                del self.queue[i]
                return True
        for slot, seq in self.running.items():
            if seq.request.id == request_id:
                del self.running[slot]
                return True
        return False

    @torch.no_grad()
    def run(self, requests: list[Request] = ()) -> list[Result]:
        """Serve everything submitted (and `requests`); results in the order they finished."""
        for request in requests:
            self.submit(request)
        while self.queue or self.running:
            record = self.step()
            self.steps.append(record)
            self.results += record.finished
        return self.results

    @torch.no_grad()
    def step(self) -> StepRecord:
        """Admit queued requests into free slots, prefill prompt chunks within the budget, then
        decode one token for every row whose prompt is in."""
        if not self.static or not self.running:
            for slot in range(self.slots):
                if slot not in self.running and self.queue:
                    self._admit(slot, *self.queue.popleft())
        record = StepRecord(0, [])
        budget = self.step_tokens - sum(1 for seq in self.running.values() if seq.tokens)
        waiting = [slot for slot, seq in self.running.items() if not seq.tokens]  # first come, first prefilled
        while budget > 0 and waiting:
            group, chunk = self._prefill_group(waiting, budget)
            self._prefill(group, chunk, record)
            budget -= len(group) * chunk
            waiting = waiting[len(group):]
        slots = sorted(slot for slot, seq in self.running.items() if seq.tokens)
        if slots:
            rows = torch.tensor(slots, device=self.device)
            last = torch.tensor([[self.running[s].tokens[-1]] for s in slots], device=self.device)
            out = self._decode(last, rows)
            record.batch_size = len(slots)
            record.tokens_per_expert = [s.tokens_per_expert.tolist() for s in out.router_stats]
            for i, slot in enumerate(slots):
                self._append(slot, out.logits[i, -1], record)
        return record

    @torch.no_grad()
    def warm_up(self) -> float:
        """Build the compiled step's graphs now (a single row, and several) on scratch tokens, not
        at the first requests that need them; the cache is left empty. Returns the seconds taken."""
        start = time.perf_counter()
        if self.decode_step is not None:
            for n in sorted({1, min(2, self.compiled_rows)}):
                self._decode(torch.zeros(n, 1, dtype=torch.long, device=self.device), torch.arange(n, device=self.device))
            for slot in range(self.slots):
                self.cache.reset(slot)
        return time.perf_counter() - start

    @property
    def compiled_rows(self) -> int:
        """The most decoding rows a step runs through `decode_step` (0 without one)."""
        return 0 if self.decode_step is None else min(FUSED_ROWS, self.slots)

    def _decode(self, last_B1: torch.Tensor, rows_B: torch.Tensor):
        """One token for each of the rows' slots, through the compiled step where it applies."""
        B, most = len(rows_B), self.compiled_rows
        if B > most:
            return self.model(last_B1, cache=self.cache, rows=rows_B, decode=True)
        if B > 1 and most > 2:  # one graph for every batch of 2..most rows (a single row gets its own)
            for t in (last_B1, rows_B):
                torch._dynamo.mark_dynamic(t, 0, min=2, max=most)
        return self.decode_step(last_B1, cache=self.cache, rows=rows_B, decode=True)

    def _admit(self, slot: int, request: Request, submitted_s: float) -> None:
        self.cache.reset(slot)
        budget = new_token_budget(request.prompt, request.params, self.cache.capacity)
        self.running[slot] = _Running(request, request.params.generator(self.device), budget, submitted_s=submitted_s)

    def _prefill_group(self, waiting: list[int], budget: int) -> tuple[list[int], int]:
        """The slots whose prompts go through the next prefill forward, and its chunk length: the
        first waiting prompt's next chunk alone when the rest of it exceeds the budget (or it has
        images); else as many of the waiting prompts' remainders, in order, as fit the budget
        padded to the longest of them (one forward for several short prompts costs little more
        than one: 16 prompts of 40 tokens, 5x less than one at a time at the `small` shape)."""
        def rest(slot: int) -> int:
            seq = self.running[slot]
            return len(seq.request.prompt) - seq.prefilled

        first = self.running[waiting[0]]
        group, chunk = [waiting[0]], min(rest(waiting[0]), budget)
        if rest(waiting[0]) > budget or first.request.images is not None:
            return group, chunk
        for slot in waiting[1:]:
            longest = max(chunk, rest(slot))
            fits = all(self.running[s].prefilled + longest <= self.cache.capacity for s in (*group, slot))
            if self.running[slot].request.images is not None or (len(group) + 1) * longest > budget or not fits:
                break
            group.append(slot)
            chunk = longest
        return group, chunk

    def _prefill(self, slots: list[int], chunk: int, record: StepRecord) -> None:
        """The next `chunk` tokens of each slot's prompt into the cache in one forward, shorter
        remainders padded after their end; a prompt that is then all in samples its first token.

        The padding is harmless: a causal mask never lets a real token see the positions after it,
        and the slot's length is rolled back past the padding, which the next write overwrites."""
        seqs = [self.running[slot] for slot in slots]
        pieces = [seq.request.prompt[seq.prefilled:seq.prefilled + chunk] for seq in seqs]
        tokens = torch.tensor([piece + [0] * (chunk - len(piece)) for piece in pieces], device=self.device)
        images = None
        seq, piece = seqs[0], pieces[0]
        if seq.request.images is not None and IMAGE_ID in piece:  # alone in its forward: the images of this chunk
            before = seq.request.prompt[:seq.prefilled].count(IMAGE_ID)
            images = seq.request.images[before:before + piece.count(IMAGE_ID)][None].to(self.device)
        out = self.model(tokens, cache=self.cache, rows=torch.tensor(slots, device=self.device), images=images,
                         decode=True)
        for i, (slot, seq, piece) in enumerate(zip(slots, seqs, pieces)):
            self.cache.lengths[slot] -= chunk - len(piece)
            seq.prefilled += len(piece)
            record.prefill_tokens += len(piece)
            if seq.prefilled == len(seq.request.prompt):
                self._append(slot, out.logits[i, len(piece) - 1], record)

    def _append(self, slot: int, logits_V: torch.Tensor, record: StepRecord) -> None:
        seq = self.running[slot]
        params = seq.request.params
        token = int(sample_next(logits_V[None], params, seq.generator))
        seq.tokens.append(token)
        finish = None
        if token in params.stop_tokens:
            finish = "stop"
        elif len(seq.tokens) >= seq.budget:  # as `generate` stops: the same tokens, batched or alone
            finish = "length"
        record.emitted.append(Emitted(seq.request.id, token, finish))
        if finish:
            del self.running[slot]
            record.finished.append(Result(seq.request.id, seq.tokens, finish, seq.submitted_s, time.perf_counter()))

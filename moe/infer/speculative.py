"""Speculative decoding: a small draft proposes k tokens, the target checks them in one forward.

Two decoders: `speculative_generate`, one sequence, greedy or sampled, streamed; and
`speculative_greedy_batch`, greedy for a batch in lock step (what `bench.py speculative` times).

Exact rejection sampling (Leviathan et al. 2023; Chen et al. 2023): drafted token x_i, drawn from
the draft's q_i, is accepted with probability min(1, p_i(x_i) / q_i(x_i)) under the target's p_i;
at the first rejection a token is drawn from norm(max(0, p_i - q_i)) and the round ends; if all k
are accepted the target's next distribution p_{k+1} gives a bonus token. The output is then
distributed exactly as the target's own samples (greedy: identical to the target's greedy), and
each target forward yields between 1 and k + 1 tokens.

Cache bookkeeping, per round (batch 1): both caches hold every token but the last one, `pending`
for the draft (one token, or two after a bonus: the last accepted draft token was never fed).
The target is fed [last, x_1 .. x_k] and then cut back to the accepted prefix; the draft is cut
back the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..hardware import sync
from ..model.kv_cache import KVCache
from .sampling import SamplingParams, new_token_budget, probabilities, sample


@dataclass
class SpeculativeStats:
    rounds: int = 0  # target forwards after the prefill
    proposed: int = 0
    accepted: int = 0
    emitted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return self.emitted / self.rounds if self.rounds else 0.0


def speculative_generate(target, draft, prompt: list[int], params: SamplingParams, k: int = 4,
                         stats: SpeculativeStats | None = None, kv_int8: bool = False) -> Iterator[int]:
    """New tokens one at a time, as `generate` yields them; a bad draft, k or prompt is an error
    here, before any token is asked for. `kv_int8`: both KV caches in int8."""
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise ValueError(f"draft vocabulary ({draft.cfg.vocab_size}) differs from the target's "
                         f"({target.cfg.vocab_size}): they must share a tokenizer")
    if k < 1:
        raise ValueError(f"speculate k={k}: must be >= 1")
    context = min(target.cfg.max_seq_len, draft.cfg.max_seq_len)
    budget = new_token_budget(prompt, params, context)
    return _speculate(target, draft, prompt, params, k, stats if stats is not None else SpeculativeStats(),
                      context, budget, kv_int8)


@torch.no_grad()
def _speculate(target, draft, prompt: list[int], params: SamplingParams, k: int, stats: SpeculativeStats,
               context: int, budget: int, kv_int8: bool) -> Iterator[int]:
    device = next(target.parameters()).device
    capacity = min(context, len(prompt) + budget + k + 1)
    t_cache, d_cache = (KVCache(m.cfg, 1, capacity=min(capacity, m.cfg.max_seq_len), device=device,
                                dtype=next(m.parameters()).dtype, int8=kv_int8) for m in (target, draft))
    generator = params.generator(device)

    def feed(model, cache, tokens: list[int]) -> torch.Tensor:
        return model(torch.tensor([tokens], device=device), cache=cache, decode=True).logits[0]  # (T, V)

    if len(prompt) > 1:
        feed(target, t_cache, prompt[:-1])
        feed(draft, d_cache, prompt[:-1])
    last, pending, emitted = prompt[-1], [prompt[-1]], 0
    while emitted < budget:
        n = max(0, min(k, budget - emitted - 1, capacity - int(t_cache.lengths[0]) - 2))
        drafted, q_rows = [], []
        logits = feed(draft, d_cache, pending)[-1]
        for i in range(n):
            q_V = probabilities(logits[None], params)[0]
            drafted.append(int(sample(q_V[None], generator)))
            q_rows.append(q_V)
            if i + 1 < n:
                logits = feed(draft, d_cache, drafted[-1:])[-1]
        p_rows = probabilities(feed(target, t_cache, [last, *drafted]), params)  # (n + 1, V)
        stats.rounds += 1
        stats.proposed += n
        accepted = 0
        for i, token in enumerate(drafted):
            p, q = p_rows[i, token], q_rows[i][token]
            if params.temperature == 0:  # one-hot p and q: accept iff the target agrees
                ok = bool(p > 0)
            else:
                ok = bool(torch.rand((), generator=generator, device=device) < torch.clamp(p / q, max=1.0))
            if not ok:
                break
            accepted += 1
        if accepted < n:  # rejected: resample from the part of p that q under-covers
            residual = torch.clamp(p_rows[accepted] - q_rows[accepted], min=0)
            extra = int(sample((residual / residual.sum())[None], generator)) if residual.sum() > 0 \
                else int(sample(p_rows[accepted][None], generator))
        else:  # all accepted (or nothing drafted): a bonus token from the target's next distribution
            extra = int(sample(p_rows[accepted][None], generator))
        stats.accepted += accepted
        new = [*drafted[:accepted], extra]
        # Target fed [last, x_1..x_n]: keep [last, x_1..x_accepted]. Draft fed pending + x_1..x_{n-1}.
        t_cache.lengths -= n - accepted
        kept_in_draft = min(accepted, n - 1) if n else 0
        d_cache.lengths -= max(n - 1, 0) - kept_in_draft
        pending = [*drafted[kept_in_draft:accepted], extra]
        last = extra
        for token in new:
            yield token
            emitted += 1
            stats.emitted += 1
            if token in params.stop_tokens or emitted >= budget:
                return


@dataclass
class LockstepStats:
    rounds: int = 0  # target forwards after the prefill
    row_rounds: int = 0  # rounds summed over the rows still running in them
    examined: int = 0  # drafted tokens the target examined: those accepted, and each row's first rejected
    accepted: int = 0
    emitted: int = 0
    draft_s: float = 0.0  # time in draft forwards
    verify_s: float = 0.0  # time in target forwards

    @property
    def acceptance(self) -> float:
        """The per-token rate a of the closed forms."""
        return self.accepted / self.examined if self.examined else 0.0


def lockstep_capacity(prompt_len: int, new_tokens: int, k: int) -> int:
    """Cache positions a row of `speculative_greedy_batch` may reach: its prompt, its tokens, and a
    round of k + 1 past them while slower rows finish (its own and the draft-only feed)."""
    return prompt_len + new_tokens + 2 * (k + 1)


@torch.no_grad()
def speculative_greedy_batch(target, draft, prompts_BT: torch.Tensor, new_tokens: int, k: int,
                             stats: LockstepStats | None = None) -> list[list[int]]:
    """Greedy speculative decoding of a batch in lock step: `new_tokens` for each row, identical to
    plain greedy decoding's, row by row.

    Every round, the draft proposes k tokens for each row (k forwards of (B, 1), plus one that
    only feeds x_k, so every row's draft cache ends where its target cache does and the next
    round starts from one pending token per row), the target checks all of them in one (B, k + 1)
    forward, and each row keeps its agreeing prefix plus the target's own next token, its caches
    cut back to that by its own length. A row that has its `new_tokens` stops growing but, in
    lock step, still rides along.
    """
    stats = stats if stats is not None else LockstepStats()
    device = next(target.parameters()).device
    B, P = prompts_BT.shape
    capacity = lockstep_capacity(P, new_tokens, k)
    for model in (target, draft):
        if capacity > model.cfg.max_seq_len:
            raise ValueError(f"prompt {P} + {new_tokens} new tokens + 2(k + 1) exceed model.max_seq_len="
                             f"{model.cfg.max_seq_len}")
    prompts_BT = prompts_BT.to(device)
    t_cache, d_cache = (KVCache(m.cfg, B, capacity=capacity, device=device) for m in (target, draft))
    target(prompts_BT[:, :-1], cache=t_cache, decode=True)
    draft(prompts_BT[:, :-1], cache=d_cache, decode=True)
    last_B1 = prompts_BT[:, -1:]
    out = [[] for _ in range(B)]
    while min(map(len, out)) < new_tokens:
        done_B = torch.tensor([len(o) >= new_tokens for o in out], device=device)
        start = time.perf_counter()
        x_B1, drafted = last_B1, []
        for i in range(k + 1):
            logits = draft(x_B1, cache=d_cache, decode=True).logits[:, -1]
            if i < k:
                x_B1 = logits.argmax(-1, keepdim=True)
                drafted.append(x_B1)
        drafted_BT = torch.cat(drafted, dim=1)  # T = k drafted positions
        sync(device)
        middle = time.perf_counter()
        choice_BT = target(torch.cat((last_B1, drafted_BT), dim=1), cache=t_cache, decode=True).logits.argmax(-1)
        sync(device)
        stats.draft_s += middle - start
        stats.verify_s += time.perf_counter() - middle
        agree_BT = (choice_BT[:, :k] == drafted_BT).long().cumprod(dim=1)
        n_B = agree_BT.sum(dim=1)
        extra_B1 = choice_BT.gather(1, n_B[:, None])  # the target's token at the first disagreement, or a bonus
        drop_B = torch.where(done_B, k + 1, k - n_B)  # a finished row keeps nothing of this round
        t_cache.lengths -= drop_B
        d_cache.lengths -= drop_B
        last_B1 = torch.where(done_B[:, None], last_B1, extra_B1)
        for b in range(B):
            if not done_B[b]:
                out[b] += [*drafted_BT[b, :n_B[b]].tolist(), int(extra_B1[b])]
        live_n = n_B[~done_B]
        stats.rounds += 1
        stats.row_rounds += len(live_n)
        stats.accepted += int(live_n.sum())
        stats.examined += int(live_n.sum() + (live_n < k).sum())  # each accepted token, and the one rejected
        stats.emitted += int(live_n.sum()) + len(live_n)
    return [o[:new_tokens] for o in out]

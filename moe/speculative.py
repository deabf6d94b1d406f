"""Speculative decoding: a small draft proposes k tokens, the target checks them in one forward.

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

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .kv_cache import KVCache
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


@torch.no_grad()
def speculative_generate(target, draft, prompt: list[int], params: SamplingParams, k: int = 4,
                         stats: SpeculativeStats | None = None) -> Iterator[int]:
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise ValueError(f"draft vocabulary ({draft.cfg.vocab_size}) differs from the target's "
                         f"({target.cfg.vocab_size}): they must share a tokenizer")
    if k < 1:
        raise ValueError(f"speculate k={k}: must be >= 1")
    context = min(target.cfg.max_seq_len, draft.cfg.max_seq_len)
    budget = new_token_budget(prompt, params, context)
    stats = stats if stats is not None else SpeculativeStats()
    device = next(target.parameters()).device
    capacity = min(context, len(prompt) + budget + k + 1)
    t_cache = KVCache(target.cfg, 1, capacity=min(capacity, target.cfg.max_seq_len), device=device)
    d_cache = KVCache(draft.cfg, 1, capacity=min(capacity, draft.cfg.max_seq_len), device=device)
    generator = params.generator(device)

    def feed(model, cache, tokens: list[int]) -> torch.Tensor:
        return model(torch.tensor([tokens], device=device), cache=cache).logits[0]  # (T, V)

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

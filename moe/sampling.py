"""Sampling the next token, and a plain generation loop (a full forward per token, no cache)."""

from __future__ import annotations

import torch
from torch import Tensor


def sample_next(logits_BV: Tensor, temperature: float = 1.0, top_k: int = 0,
                generator: torch.Generator | None = None) -> Tensor:
    """(B,) next tokens: greedy at temperature 0, else softmax(logits / T) over the top k."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    if top_k:
        kth = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    return torch.multinomial(logits_BV.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_simple(model, tokens_BT: Tensor, max_new_tokens: int, temperature: float = 0.8,
                    top_k: int = 50, stop_token: int | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
    """Append up to max_new_tokens to each row, re-running the (last max_seq_len) context each step."""
    context = model.cfg.max_seq_len
    for _ in range(max_new_tokens):
        logits = model(tokens_BT[:, -context:]).logits[:, -1]
        next_B = sample_next(logits, temperature, top_k, generator)
        tokens_BT = torch.cat([tokens_BT, next_B[:, None]], dim=1)
        if stop_token is not None and (next_B == stop_token).all():
            break
    return tokens_BT

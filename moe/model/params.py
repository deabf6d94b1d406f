"""Parameter kinds: what each parameter of the model is, decided in one place.

Initialisation, parameter counts, freezing, the optimizer's groups, expert sharding and the
Hugging Face mapping all ask `param_kind(name)` rather than matching names of their own, so
a renamed parameter fails loudly here (it matches no rule) instead of silently losing its
initialisation or its learning rate somewhere else.
"""

from __future__ import annotations

import functools
import re
from enum import StrEnum
from typing import NamedTuple


class Kind(StrEnum):
    EMBEDDING = "embedding"  # token embedding and output head
    ATTENTION = "attention"
    ROUTER = "router"
    EXPERTS = "experts"  # the stacked expert weights of MoE layers
    DENSE_FFN = "dense_ffn"  # the FFN of layers without experts
    NORM = "norm"
    VISION_ENCODER = "vision_encoder"  # the ViT and the Perceiver resampler
    VISION_XATTN = "vision_xattn"  # the gated cross-attention blocks, but for their gates
    VISION_GATE = "vision_gate"  # the tanh gates, 0 at the start


VISION = frozenset({Kind.VISION_ENCODER, Kind.VISION_XATTN, Kind.VISION_GATE})


class Init(StrEnum):
    NORMAL = "normal"  # N(0, init_std)
    RESIDUAL = "residual"  # N(0, init_std / sqrt(2 n_layers)): projections into the residual stream (GPT-2)
    ONES = "ones"
    ZEROS = "zeros"


class Rule(NamedTuple):
    pattern: re.Pattern
    kind: Kind
    init: Init


def _rule(pattern: str, kind: Kind, init: Init) -> Rule:
    return Rule(re.compile(pattern), kind, init)


_XATTN = r"vision\.xattn\.\d+\."
RULES = (
    _rule(r"tok_emb\.weight|lm_head\.weight", Kind.EMBEDDING, Init.NORMAL),
    _rule(r"blocks\.\d+\.attn\.w[qkv]\.weight", Kind.ATTENTION, Init.NORMAL),
    _rule(r"blocks\.\d+\.attn\.wo\.weight", Kind.ATTENTION, Init.RESIDUAL),
    _rule(r"blocks\.\d+\.(attn|ffn)_norm\.weight|norm\.weight", Kind.NORM, Init.ONES),
    _rule(r"blocks\.\d+\.ffn\.router\.weight", Kind.ROUTER, Init.NORMAL),
    _rule(r"blocks\.\d+\.ffn\.experts\.w[13]", Kind.EXPERTS, Init.NORMAL),
    _rule(r"blocks\.\d+\.ffn\.experts\.w2", Kind.EXPERTS, Init.RESIDUAL),
    _rule(r"blocks\.\d+\.ffn\.w[13]\.weight", Kind.DENSE_FFN, Init.NORMAL),
    _rule(r"blocks\.\d+\.ffn\.w2\.weight", Kind.DENSE_FFN, Init.RESIDUAL),
    # The encoder is drawn like the rest, then re-initialised as a ViT's (VisionBranch.init_encoder_weights).
    _rule(r"vision\.(encoder|resampler)\.(.+\.)?\w*norm\.weight", Kind.VISION_ENCODER, Init.ONES),
    _rule(r"vision\.(encoder|resampler)\.(?!(.+\.)?\w*norm\.weight$).+", Kind.VISION_ENCODER, Init.NORMAL),
    _rule(_XATTN + r"(attn|ffn)_gate", Kind.VISION_GATE, Init.ZEROS),
    _rule(_XATTN + r"(attn|ffn)_norm\.weight", Kind.VISION_XATTN, Init.ONES),
    _rule(_XATTN + r"(attn\.w[qkv]|ffn\.w[13])\.weight", Kind.VISION_XATTN, Init.NORMAL),
    _rule(_XATTN + r"(attn\.wo|ffn\.w2)\.weight", Kind.VISION_XATTN, Init.RESIDUAL),
)


@functools.cache  # asked per parameter per step under expert parallelism (gradient sync)
def param_rule(name: str) -> Rule:
    """The one rule a parameter name matches (a name inside DDP's or torch.compile's wrapper is
    read without the wrapper's prefix)."""
    name = re.sub(r"^(module\.|_orig_mod\.)+", "", name)
    matches = [rule for rule in RULES if rule.pattern.fullmatch(name)]
    if len(matches) != 1:
        raise KeyError(f"parameter {name!r} matches {len(matches)} rules in moe/model/params.py, expected exactly one")
    return matches[0]


def param_kind(name: str) -> Kind:
    return param_rule(name).kind


def is_vision(name: str) -> bool:
    return param_kind(name) in VISION

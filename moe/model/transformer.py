"""The decoder-only MoE transformer, readable top-down.

Shape letters (moe/shapes.py): B batch, T time, D model width, V vocabulary.

Architecture (exactly Mixtral's, so checkpoints export to transformers and match its logits):
token embedding -> n_layers x [x + attn(rmsnorm(x)); x + ffn(rmsnorm(x))] -> rmsnorm -> lm_head,
where ffn is a top-k mixture of SwiGLU experts on MoE layers and one SwiGLU elsewhere.
With a `[model.vision]` config, gated cross-attention to the images (`vision.py`) runs before
every `xattn_every`-th layer. What each parameter is (for its initialisation, counting,
freezing and learning rate) is decided in one place, `params.py`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import costmodel
from ..config import ModelConfig
from ..tokenizer import IMAGE_ID
from .attention import Attention, rope_tables
from .dispatch import RouterStats
from .experts import SwiGLU
from .kv_cache import CacheStep, KVCache
from .moe_layer import MoE, MoEOutput
from .norm import RMSNorm
from .params import VISION, Init, Kind, param_kind, param_rule
from .vision import NO_VISION, VisionBranch, media_index


class ModelOutput(NamedTuple):
    logits: Tensor  # (B, T, V)
    # The loss and its parts, computed only when targets are given (None otherwise):
    loss: Tensor | None  # ce_loss + aux_loss_coef * balance_loss + z_loss_coef * z_loss
    ce_loss: Tensor | None
    balance_loss: Tensor | None  # mean over MoE layers; 1.0 when perfectly balanced
    z_loss: Tensor | None  # mean over MoE layers
    router_stats: list[RouterStats]  # one per MoE layer, in layer order


class ParamCounts(NamedTuple):
    embedding: int  # token embedding, plus the output head when untied
    attention: int
    experts: int  # all experts of all MoE layers
    dense_ffn: int  # FFNs of non-MoE layers
    router: int
    norm: int
    vision: int  # the vision branch: encoder, resampler, gated cross-attention (0 without one)
    total: int
    active: int  # used by one token: experts count k / E


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer) else SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x_BTD: Tensor, cos: Tensor, sin: Tensor, kv: CacheStep | None = None,
                with_losses: bool = True, decode: bool = False) -> tuple[Tensor, MoEOutput | None]:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin, kv)
        h_BTD = self.ffn_norm(x_BTD)
        if isinstance(self.ffn, MoE):
            moe = self.ffn(h_BTD, with_losses, decode)
            return x_BTD + moe.y, moe
        return x_BTD + self.ffn(h_BTD), None


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.vision = VisionBranch(cfg) if cfg.vision is not None else None
        self._register_rope_tables()
        self.init_weights()

    def _register_rope_tables(self, device: torch.device | None = None) -> None:
        """cos and sin (max_seq_len, Dh) of every position, computed once and looked up by each
        forward: computed inside a compiled decode step instead, Inductor inlined sin and cos into
        the attention's scores loop, once per cache position. Not part of the state dict."""
        positions = torch.arange(self.cfg.max_seq_len, device=device)
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scale)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state: dict[str, Tensor]) -> MoETransformer:
        """A model holding exactly these tensors (built on `meta`, nothing initialised twice)."""
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(state, assign=True, strict=True)
        model._register_rope_tables(model.tok_emb.weight.device)  # built on meta, like the rest
        if cfg.tie_embeddings:
            model.lm_head.weight = model.tok_emb.weight
        return model

    @torch.no_grad()
    def init_weights(self) -> None:
        """Each parameter as its rule in `params.py` says: N(0, init_std); projections into the
        residual stream scaled by 1/sqrt(2 n_layers) (GPT-2); norms 1; the vision branch's gates 0,
        so it starts as the identity, and its encoder as a ViT's."""
        std = {Init.NORMAL: self.cfg.init_std, Init.RESIDUAL: self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)}
        for name, p in self.named_parameters():
            init = param_rule(name).init
            if init == Init.ONES:
                p.fill_(1.0)
            elif init == Init.ZEROS:
                p.zero_()
            else:
                p.normal_(0.0, std[init])
        if self.vision is not None:
            self.vision.init_encoder_weights()

    def forward(self, tokens: Tensor, targets: Tensor | None = None, cache: KVCache | None = None,
                rows: Tensor | None = None, images: Tensor | None = None, decode: bool = False) -> ModelOutput:
        """Logits for every position of `tokens` (B, T); with `targets` (B, T; -100 = ignore),
        the loss and its parts.

        With a `cache`, the tokens continue the sequences it holds (its slots `rows`, default all):
        they attend to the cached keys and values, theirs are added, and the lengths advance.

        `images` (B, M, C, W, W), values in [0, 1], go with the <|image|> tokens of `tokens`, in
        order (a row with fewer tokens than M pads the rest). With a cache their visual tokens
        are computed once, kept in the cache, and seen by every later token of the row.

        `decode=True` says this is a generation step, run without gradients: MoE layers then take
        the dispatcher that runs a few tokens' experts directly (`dispatch.DecodeDispatcher`).
        """
        B, T = tokens.shape
        kv = None
        if cache is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            kv = cache.step(T, rows)
            positions = kv.positions_BT.flatten()  # every row at its own positions
            cos, sin = self.rope_cos[positions].view(B, 1, T, -1), self.rope_sin[positions].view(B, 1, T, -1)

        # <|image|> tokens per row in this forward: what the cache stores and counts for each row
        new_images_B = None if self.vision is None else (tokens == IMAGE_ID).sum(dim=1)
        if images is not None:  # pixels in [0, 1], as the weights hold them (fp32, or bf16 for inference)
            images = images.to(self.tok_emb.weight.dtype)
        media = self._media(tokens, images, cache, rows, new_images_B)
        x_BTD = self.tok_emb(tokens)
        moe_outputs: list[MoEOutput] = []
        for i, block in enumerate(self.blocks):
            xattn = self.vision.xattn_before(i) if media is not None else None
            if xattn is not None:
                x_BTD = xattn(x_BTD, *media)
            x_BTD, moe = block(x_BTD, cos, sin, kv, with_losses=targets is not None, decode=decode)
            if moe is not None:
                moe_outputs.append(moe)
        logits_BTV = self.lm_head(self.norm(x_BTD))
        if cache is not None:
            cache.advance(T, rows, images=new_images_B)

        stats = [m.stats for m in moe_outputs]
        if targets is None:
            return ModelOutput(logits_BTV, None, None, None, None, stats)
        zero = logits_BTV.new_zeros((), dtype=torch.float32)
        balance = torch.stack([m.balance_loss for m in moe_outputs]).mean() if moe_outputs else zero
        z_loss = torch.stack([m.z_loss for m in moe_outputs]).mean() if moe_outputs else zero
        ce = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss = ce + self.cfg.aux_loss_coef * balance + self.cfg.z_loss_coef * z_loss
        return ModelOutput(logits_BTV, loss, ce, balance, z_loss, stats)

    def _media(self, tokens_BT: Tensor, images: Tensor | None, cache: KVCache | None,
               rows: Tensor | None, new_images_B: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """(visual tokens (B, M, L, D), the image each token sees (B, T)) for the gated
        cross-attention, or None when there is nothing to see."""
        if self.vision is None:
            if images is not None:
                raise ValueError(NO_VISION)
            return None
        media_BMLD = None if images is None else self.vision.media_for(tokens_BT, images)
        if cache is None:
            return None if media_BMLD is None else (media_BMLD, media_index(tokens_BT))
        # Cached: a row's visual tokens are stored once, at its prefill, and read at every step.
        before_B = cache.images_seen if rows is None else cache.images_seen[rows]
        if media_BMLD is not None:
            cache.store_media(media_BMLD, new_images_B, rows)
        return cache.media_for(rows), media_index(tokens_BT, before_B)

    # ---- accounting -------------------------------------------------------------------------

    def param_counts(self) -> ParamCounts:
        """Parameters by kind, counted from the tensors themselves (works on the `meta` device: only
        shapes are read); `costmodel.param_counts` computes the same from the config alone."""
        counts = dict.fromkeys(("embedding", "attention", "experts", "dense_ffn", "router", "norm", "vision"), 0)
        for name, p in self.named_parameters():  # tied weights are listed once
            kind = param_kind(name)
            counts["vision" if kind in VISION else kind.value] += p.numel()
        total = sum(counts.values())
        return ParamCounts(**counts, total=total, active=costmodel.active_params(self.cfg, total, counts[Kind.EXPERTS]))

    def flops_per_token(self, seq_len: int | None = None, training: bool = False, vision: bool = False) -> int:
        """Matmul FLOPs per token (`costmodel.flops_per_token`); with `vision=True` the gated
        cross-attention's share for a token that sees an image."""
        return costmodel.flops_per_token(self.cfg, seq_len or self.cfg.max_seq_len, training, vision)

    def flops_per_image(self, training: bool = False) -> int:
        """Matmul FLOPs to encode one image into the keys and values the text attends to."""
        return costmodel.flops_per_image(self.cfg, training)


def describe(cfg: ModelConfig) -> str:
    """One line: size, active size and FLOPs per token, from shapes only (built on `meta`)."""
    with torch.device("meta"):
        model = MoETransformer(cfg)
    counts = model.param_counts()
    line = (f"model: {_count(counts.total)} parameters, {_count(counts.active)} active per token "
            f"({cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads / {cfg.n_kv_heads} KV, "
            f"top-{cfg.top_k} of {cfg.n_experts} experts), "
            f"{_count(model.flops_per_token(), 'G', 'M')}FLOP per token forward at context {cfg.max_seq_len}")
    if cfg.vision is not None:
        line += (f"; vision branch {_count(counts.vision)} parameters ({len(model.vision.xattn)} gated "
                 f"cross-attention blocks, {cfg.vision.n_latents} visual tokens per image), "
                 f"{_count(model.flops_per_image(), 'G', 'M')}FLOP per image")
    return line


def _count(n: int, billion: str = "B", million: str = "M") -> str:
    return f"{n / 1e9:,.1f} {billion}" if n >= 1e9 else f"{n / 1e6:,.2f} {million}"

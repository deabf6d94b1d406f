"""The vision branch, Flamingo-style: a ViT encodes each image, a Perceiver resampler turns its
patches into a fixed number of visual tokens, and gated cross-attention blocks before the text
layers let the text attend to them.

Shape letters (moe/shapes.py): B batch, T text time, M images per sequence, I images (any set
of them), C channels, W image side in pixels, P patches per image, L latents (visual tokens per
image), J keys a cross-attention reads, Dv vision width, D text model width, H heads.

Interleaving: an <|image|> token marks where each image sits in the text. A text token sees the
visual tokens of its row's most recent image at or before it (the <|image|> token sees its own
image) and no other. Tokens before a row's first image see none, and the branch leaves them
exactly as they were. Both gates of every block start at 0 (tanh(0) = 0), so an untrained branch
is the identity: a text-only model gains vision without losing what it knew.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..config import ModelConfig, VisionConfig
from ..tokenizer import IMAGE, IMAGE_ID
from .experts import SwiGLU
from .norm import RMSNorm

COSINE_SCALE = 10.0  # initial logit scale of cosine attention
NO_VISION = "images given, but this model has no vision branch (no [model.vision] in its config)"


def media_index(tokens_BT: Tensor, images_before_B: Tensor | None = None) -> Tensor:
    """(B, T): which of its row's images each token sees; -1 before the row's first image.

    `images_before_B` counts images a row already holds (earlier tokens, in a KV cache).
    """
    index_BT = (tokens_BT == IMAGE_ID).cumsum(dim=1) - 1
    return index_BT if images_before_B is None else index_BT + images_before_B[:, None]


class CrossAttention(nn.Module):
    """Multi-head attention of queries x (B, T, D) to a context (B, J, Dc); `mask` (B, 1, T, J): True = may attend.

    `cosine=True` scores by the cosine of query and key times a learned per-head scale (Swin V2's
    cosine attention) instead of their dot product / sqrt(Dh). The scale starts at 10, so attention
    is sharp from the first step: the resampler's latents each pick out a few patches instead of
    all starting as the same average of the image, in which a small object is lost.
    """

    def __init__(self, dim: int, context_dim: int, n_heads: int, cosine: bool = False):
        super().__init__()
        self.n_heads = n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(context_dim, dim, bias=False)
        self.wv = nn.Linear(context_dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.logit_scale_H = nn.Parameter(torch.full((n_heads,), COSINE_SCALE)) if cosine else None

    def forward(self, x_BTD: Tensor, context_BJD: Tensor, mask: Tensor | None = None) -> Tensor:
        q = rearrange(self.wq(x_BTD), "b t (h d) -> b h t d", h=self.n_heads)
        k = rearrange(self.wk(context_BJD), "b j (h d) -> b h j d", h=self.n_heads)
        v = rearrange(self.wv(context_BJD), "b j (h d) -> b h j d", h=self.n_heads)
        if self.logit_scale_H is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            q, k = F.normalize(q, dim=-1) * self.logit_scale_H[:, None, None], F.normalize(k, dim=-1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return self.wo(rearrange(y, "b h t d -> b t (h d)"))


def mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.attn_norm, self.attn = nn.LayerNorm(dim), CrossAttention(dim, dim, n_heads)
        self.mlp_norm, self.mlp = nn.LayerNorm(dim), mlp(dim)

    def forward(self, x_IPDv: Tensor) -> Tensor:
        h_IPDv = self.attn_norm(x_IPDv)
        x_IPDv = x_IPDv + self.attn(h_IPDv, h_IPDv)
        return x_IPDv + self.mlp(self.mlp_norm(x_IPDv))


class VisionEncoder(nn.Module):
    """A small ViT, trained from scratch: images (I, C, W, W) in [0, 1] -> patch features (I, P, Dv)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.patch = nn.Linear(cfg.channels * cfg.patch_size ** 2, cfg.d_vision)
        self.pos_PDv = nn.Parameter(torch.zeros(cfg.n_patches, cfg.d_vision))
        self.blocks = nn.ModuleList(ViTBlock(cfg.d_vision, cfg.vit_heads) for _ in range(cfg.vit_layers))
        self.norm = nn.LayerNorm(cfg.d_vision)

    def forward(self, images_ICWW: Tensor) -> Tensor:
        pixels = images_ICWW * 2 - 1  # centred: content, not brightness, should drive the features
        patches = rearrange(pixels, "i c (h p1) (w p2) -> i (h w) (p1 p2 c)", p1=self.patch_size, p2=self.patch_size)
        x_IPDv = self.patch(patches) + self.pos_PDv
        for block in self.blocks:
            x_IPDv = block(x_IPDv)
        return self.norm(x_IPDv)


class ResamplerLayer(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.media_norm, self.latent_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, dim, n_heads, cosine=True)
        self.mlp_norm, self.mlp = nn.LayerNorm(dim), mlp(dim)

    def forward(self, latents_ILDv: Tensor, x_IPDv: Tensor) -> Tensor:
        """The latents attend to the patches and to themselves (Flamingo's keys: [patches; latents])."""
        h_ILDv = self.latent_norm(latents_ILDv)
        context_IJDv = torch.cat((self.media_norm(x_IPDv), h_ILDv), dim=1)  # J = P + L
        latents_ILDv = latents_ILDv + self.attn(h_ILDv, context_IJDv)
        return latents_ILDv + self.mlp(self.mlp_norm(latents_ILDv))


class PerceiverResampler(nn.Module):
    """Patch features (I, P, Dv) -> a fixed number of visual tokens (I, L, D), in the text model's width."""

    def __init__(self, cfg: VisionConfig, d_model: int):
        super().__init__()
        self.latents_LDv = nn.Parameter(torch.zeros(cfg.n_latents, cfg.d_vision))
        self.layers = nn.ModuleList(ResamplerLayer(cfg.d_vision, cfg.vit_heads) for _ in range(cfg.resampler_layers))
        self.norm = nn.LayerNorm(cfg.d_vision)
        self.proj = nn.Linear(cfg.d_vision, d_model)

    def forward(self, x_IPDv: Tensor) -> Tensor:
        latents_ILDv = self.latents_LDv.expand(x_IPDv.shape[0], -1, -1)
        for layer in self.layers:
            latents_ILDv = layer(latents_ILDv, x_IPDv)
        return self.proj(self.norm(latents_ILDv))


class GatedCrossAttention(nn.Module):
    """`x + tanh(attn_gate) * xattn(x, media)`, then `x + tanh(ffn_gate) * ffn(x)`, on tokens that follow an image."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CrossAttention(cfg.d_model, cfg.d_model, cfg.n_heads)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.d_ff)
        self.attn_gate = nn.Parameter(torch.zeros(()))
        self.ffn_gate = nn.Parameter(torch.zeros(()))

    def forward(self, x_BTD: Tensor, media_BMLD: Tensor, index_BT: Tensor) -> Tensor:
        """index_BT: the image each token sees (`media_index`), -1 for none."""
        B, M, L, _ = media_BMLD.shape
        image_J = torch.arange(M * L, device=x_BTD.device) // L  # the image each visual token belongs to
        # Tokens before any image are given image 0 to attend to (no row may be fully masked, or
        # attention returns NaN) and their result is multiplied by 0 below.
        mask_B1TJ = (image_J == index_BT.clamp(0, M - 1)[..., None])[:, None]
        sees_BT1 = (index_BT >= 0)[..., None].to(x_BTD.dtype)
        media_BJD = rearrange(media_BMLD, "b m l d -> b (m l) d").to(x_BTD.dtype)
        y_BTD = self.attn(self.attn_norm(x_BTD), media_BJD, mask_B1TJ)
        x_BTD = x_BTD + torch.tanh(self.attn_gate) * sees_BT1 * y_BTD
        return x_BTD + torch.tanh(self.ffn_gate) * sees_BT1 * self.ffn(self.ffn_norm(x_BTD))


class VisionBranch(nn.Module):
    """Everything the text model gains for vision; its parameters are the ones `freeze_lm` trains."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vision is not None
        self.cfg = cfg.vision
        self.encoder = VisionEncoder(cfg.vision)
        self.resampler = PerceiverResampler(cfg.vision, cfg.d_model)
        self.xattn = nn.ModuleDict({str(i): GatedCrossAttention(cfg) for i in range(cfg.n_layers) if cfg.has_xattn(i)})

    @torch.no_grad()
    def init_encoder_weights(self) -> None:
        """The encoder and resampler: PyTorch's default initialisation, scaled to each layer's
        fan-in (a narrow ViT learns far sooner from it than from the text model's N(0, 0.02));
        positions and latents N(0, 0.02). The cross-attention blocks live in the text model's
        residual stream and are initialised as its layers are, their gates at 0."""
        for module in (*self.encoder.modules(), *self.resampler.modules()):
            if isinstance(module, (nn.Linear, nn.LayerNorm)):
                module.reset_parameters()
            elif isinstance(module, CrossAttention) and module.logit_scale_H is not None:
                module.logit_scale_H.fill_(COSINE_SCALE)
        self.encoder.pos_PDv.normal_(0.0, 0.02)
        self.resampler.latents_LDv.normal_(0.0, 0.02)

    def xattn_before(self, layer: int) -> GatedCrossAttention | None:
        key = str(layer)
        return self.xattn[key] if key in self.xattn else None

    def encode(self, images_ICWW: Tensor) -> Tensor:
        """Images (I, C, W, W) in [0, 1] -> visual tokens (I, L, D)."""
        expected = (self.cfg.channels, self.cfg.image_size, self.cfg.image_size)
        if tuple(images_ICWW.shape[1:]) != expected:
            raise ValueError(f"images of shape {tuple(images_ICWW.shape[1:])}, expected (channels, side, side) = {expected}")
        return self.resampler(self.encoder(images_ICWW))

    def media_for(self, tokens_BT: Tensor, images_BMCWW: Tensor) -> Tensor:
        """Visual tokens (B, M, L, D) of each row's images; only as many per row as it has <|image|> tokens
        are encoded (the rest of the M slots, padding, stay zero and are never attended to)."""
        B, M = images_BMCWW.shape[:2]
        count_B = (tokens_BT == IMAGE_ID).sum(dim=1)
        if not torch.compiler.is_compiling() and bool((count_B > M).any()):
            row = int((count_B > M).nonzero()[0])
            raise ValueError(f"row {row} has {int(count_B[row])} {IMAGE} tokens but only {M} images were given")
        used_BM = torch.arange(M, device=tokens_BT.device) < count_B[:, None]
        media_BMLD = images_BMCWW.new_zeros(B, M, self.cfg.n_latents, self.resampler.proj.out_features)
        if torch.compiler.is_compiling() or bool(used_BM.any()):
            media_BMLD[used_BM] = self.encode(images_BMCWW[used_BM]).to(media_BMLD.dtype)
        return media_BMLD

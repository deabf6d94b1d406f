"""The vision branch, Flamingo-style: a ViT encodes each image, a Perceiver resampler turns its
patches into a fixed number of visual tokens, and gated cross-attention blocks before the text
layers let the text attend to them.

Shape legend:
    B batch, T text time, M images per sequence, N images (any set of them), C channels,
    S image side in pixels, P patches per image, L latents (visual tokens per image),
    K keys, Dv vision width, D text model width, H heads, Dh head dim

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

from .config import ModelConfig, VisionConfig
from .experts import SwiGLU
from .norm import RMSNorm
from .tokenizer import IMAGE, SPECIAL_TOKENS

IMAGE_ID = SPECIAL_TOKENS.index(IMAGE)  # special tokens have fixed ids in every vocabulary
COSINE_SCALE = 10.0  # initial logit scale of cosine attention
NO_VISION = "images given, but this model has no vision branch (no [model.vision] in its config)"


def media_index(tokens_BT: Tensor, images_before_B: Tensor | None = None) -> Tensor:
    """(B, T): which of its row's images each token sees; -1 before the row's first image.

    `images_before_B` counts images a row already holds (earlier tokens, in a KV cache).
    """
    index_BT = (tokens_BT == IMAGE_ID).cumsum(dim=1) - 1
    return index_BT if images_before_B is None else index_BT + images_before_B[:, None]


class CrossAttention(nn.Module):
    """Multi-head attention of queries x (B, T, D) to a context (B, K, Dc); `mask` (B, 1, T, K): True = may attend.

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

    def forward(self, x_BTD: Tensor, context_BKD: Tensor, mask: Tensor | None = None) -> Tensor:
        q = rearrange(self.wq(x_BTD), "b t (h d) -> b h t d", h=self.n_heads)
        k = rearrange(self.wk(context_BKD), "b k (h d) -> b h k d", h=self.n_heads)
        v = rearrange(self.wv(context_BKD), "b k (h d) -> b h k d", h=self.n_heads)
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

    def forward(self, x_NPD: Tensor) -> Tensor:
        h_NPD = self.attn_norm(x_NPD)
        x_NPD = x_NPD + self.attn(h_NPD, h_NPD)
        return x_NPD + self.mlp(self.mlp_norm(x_NPD))


class VisionEncoder(nn.Module):
    """A small ViT, trained from scratch: images (N, C, S, S) in [0, 1] -> patch features (N, P, Dv)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.patch = nn.Linear(cfg.channels * cfg.patch_size ** 2, cfg.d_vision)
        self.pos_PDv = nn.Parameter(torch.zeros(cfg.n_patches, cfg.d_vision))
        self.blocks = nn.ModuleList(ViTBlock(cfg.d_vision, cfg.vit_heads) for _ in range(cfg.vit_layers))
        self.norm = nn.LayerNorm(cfg.d_vision)

    def forward(self, images_NCSS: Tensor) -> Tensor:
        pixels = images_NCSS * 2 - 1  # centred: content, not brightness, should drive the features
        patches = rearrange(pixels, "n c (h p1) (w p2) -> n (h w) (p1 p2 c)", p1=self.patch_size, p2=self.patch_size)
        x_NPD = self.patch(patches) + self.pos_PDv
        for block in self.blocks:
            x_NPD = block(x_NPD)
        return self.norm(x_NPD)


class ResamplerLayer(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.media_norm, self.latent_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, dim, n_heads, cosine=True)
        self.mlp_norm, self.mlp = nn.LayerNorm(dim), mlp(dim)

    def forward(self, latents_NLD: Tensor, x_NPD: Tensor) -> Tensor:
        """The latents attend to the patches and to themselves (Flamingo's keys: [patches; latents])."""
        h_NLD = self.latent_norm(latents_NLD)
        context = torch.cat((self.media_norm(x_NPD), h_NLD), dim=1)  # (N, P + L, Dv)
        latents_NLD = latents_NLD + self.attn(h_NLD, context)
        return latents_NLD + self.mlp(self.mlp_norm(latents_NLD))


class PerceiverResampler(nn.Module):
    """Patch features (N, P, Dv) -> a fixed number of visual tokens (N, L, D), in the text model's width."""

    def __init__(self, cfg: VisionConfig, d_model: int):
        super().__init__()
        self.latents_LDv = nn.Parameter(torch.zeros(cfg.n_latents, cfg.d_vision))
        self.layers = nn.ModuleList(ResamplerLayer(cfg.d_vision, cfg.vit_heads) for _ in range(cfg.resampler_layers))
        self.norm = nn.LayerNorm(cfg.d_vision)
        self.proj = nn.Linear(cfg.d_vision, d_model)

    def forward(self, x_NPD: Tensor) -> Tensor:
        latents_NLD = self.latents_LDv.expand(x_NPD.shape[0], -1, -1)
        for layer in self.layers:
            latents_NLD = layer(latents_NLD, x_NPD)
        return self.proj(self.norm(latents_NLD))


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
        image_K = torch.arange(M * L, device=x_BTD.device) // L  # the image each visual token belongs to
        # Tokens before any image are given image 0 to attend to (no row may be fully masked, or
        # attention returns NaN) and their result is multiplied by 0 below.
        mask_B1TK = (image_K == index_BT.clamp(0, M - 1)[..., None])[:, None]
        sees_BT1 = (index_BT >= 0)[..., None].to(x_BTD.dtype)
        media_BKD = rearrange(media_BMLD, "b m l d -> b (m l) d").to(x_BTD.dtype)
        y_BTD = self.attn(self.attn_norm(x_BTD), media_BKD, mask_B1TK)
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

    def encode(self, images_NCSS: Tensor) -> Tensor:
        """Images (N, C, S, S) in [0, 1] -> visual tokens (N, L, D)."""
        expected = (self.cfg.channels, self.cfg.image_size, self.cfg.image_size)
        if tuple(images_NCSS.shape[1:]) != expected:
            raise ValueError(f"images of shape {tuple(images_NCSS.shape[1:])}, expected (channels, side, side) = {expected}")
        return self.resampler(self.encoder(images_NCSS))

    def media_for(self, tokens_BT: Tensor, images_BMCSS: Tensor) -> Tensor:
        """Visual tokens (B, M, L, D) of each row's images; only as many per row as it has <|image|> tokens
        are encoded (the rest of the M slots, padding, stay zero and are never attended to)."""
        B, M = images_BMCSS.shape[:2]
        count_B = (tokens_BT == IMAGE_ID).sum(dim=1)
        if not torch.compiler.is_compiling() and bool((count_B > M).any()):
            row = int((count_B > M).nonzero()[0])
            raise ValueError(f"row {row} has {int(count_B[row])} {IMAGE} tokens but only {M} images were given")
        used_BM = torch.arange(M, device=tokens_BT.device) < count_B[:, None]
        media_BMLD = images_BMCSS.new_zeros(B, M, self.cfg.n_latents, self.resampler.proj.out_features)
        if torch.compiler.is_compiling() or bool(used_BM.any()):
            media_BMLD[used_BM] = self.encode(images_BMCSS[used_BM]).to(media_BMLD.dtype)
        return media_BMLD

    def flops_per_image(self) -> int:
        """Forward matmul FLOPs to turn one image into visual tokens and project them to keys and
        values in every cross-attention block (2 per weight use, plus attention scores and values)."""
        v, D = self.cfg, self.resampler.proj.out_features
        P, L, Dv = v.n_patches, v.n_latents, v.d_vision
        block = 2 * (4 * Dv * Dv + 8 * Dv * Dv)  # attention projections + 4x MLP, per position
        encoder = P * (2 * v.channels * v.patch_size ** 2 * Dv + block * v.vit_layers) + 4 * P * P * Dv * v.vit_layers
        # per resampler layer: keys and values for [patches; latents], everything else per latent
        resampler = (2 * (P + L) * 2 * Dv * Dv + L * (block - 4 * Dv * Dv) + 4 * L * (P + L) * Dv) * v.resampler_layers
        keys_values = len(self.xattn) * 2 * L * 2 * D * D
        return encoder + resampler + 2 * L * Dv * D + keys_values

    def flops_per_token(self) -> int:
        """Forward FLOPs the cross-attention blocks add to a text token that sees an image."""
        v, D = self.cfg, self.resampler.proj.out_features
        ffn = sum(p.numel() for p in next(iter(self.xattn.values())).ffn.parameters())
        return len(self.xattn) * (2 * (2 * D * D + ffn) + 4 * D * v.n_latents)

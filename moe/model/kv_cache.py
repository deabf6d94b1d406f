"""A preallocated key/value cache: prefill a prompt in one pass, then decode a token at a time.

Shape letters (moe/shapes.py): S slots (sequences the cache holds), G key/value heads,
X capacity (positions per slot), Dh head dim, B rows of the current forward, T new tokens per row,
M images per sequence, L visual tokens per image.

Keys and values are kept per layer, one tensor each (so a compiled step writes each in place:
views of one stacked tensor would be functionalised into a copy of the whole cache every step),
with G = n_kv_heads heads only: under multi-query attention (G = 1)
the cache is n_heads times smaller than multi-head attention's. Each slot has its own length,
so sequences of different lengths share one cache (continuous batching), and shortening a
length is all it takes to roll a slot back (speculative decoding): entries past a slot's
length are never attended to and are overwritten by the next write.

With a vision branch the cache also keeps each slot's visual tokens, (S, max_images, L, D),
computed once when the slot's images arrive and read by every later step.

`int8=True` keeps keys and values in int8 with one scale per token and head (the largest |value|
of its Dh / 127, `packed.quantize_int8`): (Dh + 4) bytes a head and token where fp32 takes 4 Dh,
3.6x smaller at Dh = 32. Reads give them back in `dtype`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..config import ModelConfig
from . import packed
from .packed import dequantize, quantize_int8, realized


class KVCache:
    def __init__(self, cfg: ModelConfig, slots: int, capacity: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, int8: bool = False):
        self.capacity = capacity or cfg.max_seq_len
        if self.capacity > cfg.max_seq_len:
            raise ValueError(f"cache capacity {self.capacity} exceeds model.max_seq_len={cfg.max_seq_len}")
        shape = (slots, cfg.n_kv_heads, self.capacity, cfg.head_dim)
        self.dtype = dtype
        layers = range(cfg.n_layers)
        self.k_SGXDh = [torch.zeros(shape, device=device, dtype=torch.int8 if int8 else dtype) for _ in layers]
        self.v_SGXDh = [torch.zeros_like(k) for k in self.k_SGXDh]
        self.k_scale_SGX = [torch.zeros(shape[:-1], device=device) for _ in layers] if int8 else None  # int8 only
        self.v_scale_SGX = [torch.zeros(shape[:-1], device=device) for _ in layers] if int8 else None
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # tokens held per slot
        self.images_seen = torch.zeros(slots, dtype=torch.long, device=device)  # images held per slot
        self.media_SMLD = None
        if cfg.vision is not None:
            media_shape = (slots, cfg.vision.max_images, cfg.vision.n_latents, cfg.d_model)
            self.media_SMLD = torch.zeros(media_shape, device=device, dtype=dtype)

    PER_LAYER = ("k_SGXDh", "v_SGXDh", "k_scale_SGX", "v_scale_SGX")  # lists, one tensor per layer
    SHARED = ("lengths", "images_seen", "media_SMLD")

    def state(self) -> dict[str, Tensor]:
        """Every tensor the cache holds, by name (a graph exported over a cache takes these)."""
        state = {f"{name}.{i}": t for name in self.PER_LAYER for i, t in enumerate(getattr(self, name) or ())}
        return state | {name: getattr(self, name) for name in self.SHARED if getattr(self, name) is not None}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], dtype: torch.dtype) -> KVCache:
        """A cache over these tensors (`state()`'s), reading in `dtype`, sharing them: writes through
        it land in them."""
        cache = cls.__new__(cls)
        for name in cls.PER_LAYER:
            setattr(cache, name, [t for key, t in state.items() if key.rpartition(".")[0] == name] or None)
        for name in cls.SHARED:
            setattr(cache, name, state.get(name))
        cache.capacity, cache.dtype = cache.k_SGXDh[0].shape[2], dtype
        return cache

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for name, t in self.state().items() if name not in ("lengths", "images_seen"))

    @property
    def int8(self) -> bool:
        return self.k_scale_SGX is not None

    def reset(self, slot: int) -> None:
        """Empty a slot for a new sequence."""
        self.lengths[slot] = 0
        self.images_seen[slot] = 0

    def step(self, n_new: int, rows: Tensor | None = None) -> CacheStep:
        """Where the next forward's n_new tokens per row go; rows = the slots it runs (default: all)."""
        lengths = self.lengths if rows is None else self.lengths[rows]
        positions_BT = lengths[:, None] + torch.arange(n_new, device=lengths.device)
        if torch.compiler.is_compiling():  # static shapes, no host sync: attend over the whole capacity
            span = self.capacity
        else:  # eagerly, only as far as the longest row (one host sync per forward)
            span = int(positions_BT.max()) + 1
            if span > self.capacity:
                raise ValueError(f"sequence would reach {span} tokens, past the cache capacity {self.capacity}")
        visible_BTX = torch.arange(span, device=lengths.device) <= positions_BT[..., None]  # causal, per row
        return CacheStep(self, rows, positions_BT, visible_BTX[:, None], span)

    def advance(self, n: int | Tensor, rows: Tensor | None = None, images: Tensor | None = None) -> None:
        """n more tokens (and `images` (B,) more images) held by each row's slot."""
        if rows is None:
            self.lengths += n
            if images is not None:
                self.images_seen += images
        else:
            self.lengths[rows] += n
            if images is not None:
                self.images_seen[rows] += images

    def store_media(self, media_BMLD: Tensor, count_B: Tensor, rows: Tensor | None = None) -> None:
        """Keep the first count_B[b] visual tokens sets of row b after the images its slot holds."""
        slots = range(media_BMLD.shape[0]) if rows is None else rows.tolist()
        for b, (slot, count) in enumerate(zip(slots, count_B.tolist())):
            start = int(self.images_seen[slot])
            if start + count > self.media_SMLD.shape[1]:
                raise ValueError(f"slot {slot} would hold {start + count} images, "
                                 f"past model.vision.max_images={self.media_SMLD.shape[1]}")
            self.media_SMLD[slot, start:start + count] = media_BMLD[b, :count].to(self.media_SMLD.dtype)

    def media_for(self, rows: Tensor | None = None) -> Tensor:
        """(B, max_images, L, D): the visual tokens of the rows' slots."""
        return self.media_SMLD if rows is None else self.media_SMLD[rows]


class CacheStep(NamedTuple):
    """One forward's view of the cache: which slots, at which positions, seeing which keys."""

    cache: KVCache
    rows: Tensor | None  # (B,) slot of each row; None = every slot, in order
    positions_BT: Tensor
    mask_B1TX: Tensor  # True where a query may attend to a cached key
    span: int  # keys 0 .. span-1 are enough for every row

    def write_and_read(self, layer: int, k_BGTDh: Tensor, v_BGTDh: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new keys/values at their positions; return each row's keys/values so far."""
        B, T = self.positions_BT.shape
        rows_BT = (torch.arange(B, device=k_BGTDh.device) if self.rows is None else self.rows)[:, None].expand(B, T)
        cache = self.cache
        read = []
        for new_BGTDh, values, scales in ((k_BGTDh, cache.k_SGXDh[layer], cache.k_scale_SGX),
                                          (v_BGTDh, cache.v_SGXDh[layer], cache.v_scale_SGX)):
            new_BTGDh = new_BGTDh.transpose(1, 2)  # (S, G, X, Dh) indexed by (B, T) gives (B, T, G, Dh)
            if scales is None:
                values[rows_BT, :, self.positions_BT] = new_BTGDh.to(values.dtype)
            else:
                values[rows_BT, :, self.positions_BT], scales[layer][rows_BT, :, self.positions_BT] = \
                    quantize_int8(new_BTGDh)
            read.append(self._read(values, None if scales is None else scales[layer]))
        return read[0], read[1]

    def _read(self, values_SGXDh: Tensor, scales_SGX: Tensor | None) -> Tensor:
        """(B, G, span, Dh): the rows' slots up to `span`, in the cache's dtype."""
        rows = slice(None) if self.rows is None else self.rows
        scales = None if scales_SGX is None else scales_SGX[rows, :, : self.span]
        read = dequantize(values_SGXDh[rows, :, : self.span], scales, self.cache.dtype)
        # Compiled, Inductor dequantizes inside attention's loops, again for each query head of a
        # key/value head. Where int8 loads stall (AVX2, packed.SLOW_INT8_LOADS) that took the int8
        # `small` step from 0.79 to 1.66 ms a token: there the step dequantizes once, into a buffer.
        return realized(read) if scales is not None and packed.SLOW_INT8_LOADS else read

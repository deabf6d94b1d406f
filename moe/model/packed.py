"""Weights packed for inference: fp32, bf16, or int8 with one scale per output channel, and the
matrix-vector products a compiled decode step turns into single fused loops.

Shape letters (moe/shapes.py): T tokens, O outputs of a matrix, Z its inputs, D model width,
E experts, F expert hidden, K experts chosen per token, A assignments grouped by expert.

`pack_for_inference(model, dtype)` swaps, in place, every `nn.Linear` but the routers for a
`PackedLinear` and every `Experts` for `PackedExperts`. Each holds its weights as (O, Z) matrices,
the output channels' rows contiguous, and, for int8, q = round(W / s) with s_o = max_z |W_oz| / 127
(symmetric, per output channel: a quarter of fp32's bytes, each weight within s_o / 2 of its
value). Activations, norms, the router and the KV cache stay in the model's dtype (fp32 for int8).

Eagerly a packed matmul is `F.linear` over the weights (dequantised first for int8). Compiled
(`torch.compile`) for a handful of rows, it is written as a broadcast multiply and a sum, which
Inductor generates as one C++ loop: the dequantisation, and for the experts the gather of the two
chosen experts, happen in registers while the weights stream past. On a CPU that reads a cold
8 MB fp32 head at 21 GB/s where MKL's matrix-vector product manages 7 GB/s, and reads only the
chosen experts' rows, where indexing would first copy them.
"""

from __future__ import annotations

import mmap

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .experts import Experts, _expert_rows

FUSED_ROWS = 16  # compiled, up to this many rows a matmul runs as Inductor's fused loop
PACKED_DTYPES = (torch.float32, torch.bfloat16, torch.int8)
# Whether compiled code's vector loads of integers stall on this CPU: on AVX2 PyTorch's vector load
# of integers (`Vectorized<int8_t>::loadu(ptr, count)`, vec256_int.h, every width alike) copies
# through a stack buffer, a store-forwarding stall every 8 values, and the exported `small` int8
# step took 4.99 ms a token, slower than fp32's 1.29. There compiled int8 loops multiply int16
# activations by the weights in integers (`_int16_int8_product`), and the int8 KV cache is
# dequantized once a step. AVX-512 loads integers with masked loads: there the loops stay weight by
# weight in fp32 (measured at 0.43 ms a token; the integer loop is unmeasured there).
SLOW_INT8_LOADS = torch.backends.cpu.get_cpu_capability() == "AVX2"


def activation_dtype(weights: torch.dtype) -> torch.dtype:
    """What a model with weights in `weights` computes in: int8 weights work with fp32 activations."""
    return torch.float32 if weights == torch.int8 else weights


def quantize_int8(w_OZ: Tensor) -> tuple[Tensor, Tensor]:
    """int8 weights and fp32 scales (..., O): one scale per output channel, the max |w| of its row / 127."""
    scales_O = w_OZ.float().abs().amax(dim=-1).clamp(min=1e-12) / 127
    return (w_OZ.float() / scales_O[..., None]).round().clamp(-127, 127).to(torch.int8), scales_O


def dequantize(w_OZ: Tensor, scales_O: Tensor | None, dtype: torch.dtype) -> Tensor:
    return w_OZ.to(dtype) if scales_O is None else (w_OZ.to(torch.float32) * scales_O[..., None]).to(dtype)


def fused(rows: int) -> bool:
    """Whether a graph being compiled runs matmuls over this many rows as Inductor's fused loops."""
    return torch.compiler.is_compiling() and rows <= FUSED_ROWS


def packed_linear(x_TZ: Tensor, w_OZ: Tensor, scales_O: Tensor | None = None) -> Tensor:
    """`x @ W.T` for packed weights W (int8 ones with their scales), in x's dtype."""
    if fused(x_TZ.numel() // x_TZ.shape[-1]):
        return _fused_linear(x_TZ, w_OZ, scales_O)
    return F.linear(x_TZ, dequantize(w_OZ, scales_O, x_TZ.dtype))


def _fused_linear(x_TZ: Tensor, w_OZ: Tensor, scales_O: Tensor | None, chosen: Tensor | None = None) -> Tensor:
    """`x @ W.T` as a multiply and a sum, which Inductor compiles into one loop over W. With `chosen`,
    W is a stack of matrices (E, O, Z) (and scales (E, O)) of which chosen (...) picks one per row of
    x (the chosen experts): indexed inside the loop, never copied."""
    x, pick = realized(x_TZ.float()), (lambda t: t if chosen is None else t[chosen])
    if multiplies_in_integers(w_OZ):
        y = _int16_int8_product(x, w_OZ, pick)
    else:
        y = (x.unsqueeze(-2) * pick(w_OZ).float()).sum(-1)  # (..., O)
    return (y if scales_O is None else y * pick(scales_O)).to(x_TZ.dtype)


def multiplies_in_integers(w: Tensor) -> bool:
    """Whether compiled loops over weights w multiply in integers (`_int16_int8_product`): int8
    weights on a CPU whose integer loads stall (`SLOW_INT8_LOADS`)."""
    return SLOW_INT8_LOADS and w.dtype == torch.int8 and w.device.type == "cpu"


def _int16_int8_product(x_TZ: Tensor, w_OZ: Tensor, pick) -> Tensor:
    """`x @ W.T` (..., O) for int8 W in integers: each row of x quantized to int16 (its max |x| to
    `top`, within 1/65534 of it), the products summed in int32, one float conversion an output.

    Inductor does not vectorize a loop over int16, and leaves it to the C++ compiler, whose loop
    vectorizer (with `compile_options`) turns the sum into multiply-adds of 16-bit pairs (vpmaddwd:
    16 weights an instruction, where the fp32 loop converts, multiplies and adds 8). On this AVX2
    CPU the exported `small` int8 step took 0.41 against 0.59 ms a token reading four weights to a
    32-bit word in fp32 (8 rounds of 128 tokens in turns, one process), greedy tokens identical.
    `top` keeps the int32 sum from overflowing: |sum| <= 127 * top * Z < 2^31. The result is
    realized: left as a conversion and a multiply, Inductor recomputed it in every loop that read
    it (attention re-read K per query head: 2.4 ms a token)."""
    top = min(32767, (2**31 - 1) // (127 * x_TZ.shape[-1]))
    scale = x_TZ.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / top
    xq = realized((x_TZ / scale).round().to(torch.int16)).unsqueeze(-2)  # (..., 1, Z)
    sums = (xq.to(torch.int32) * pick(w_OZ).to(torch.int32)).sum(-1, dtype=torch.int32)  # (..., O)
    return realized(sums.float() * scale)


def compile_options(model: nn.Module) -> dict:
    """Inductor settings a compiled step of `model` needs: for int8 weights where the loops multiply
    in integers (`_int16_int8_product`), GCC's loop vectorizer, which Inductor switches off
    (`-fno-tree-loop-vectorize`: it vectorizes its loops itself, but not int16 ones), and no bounds
    checks on indices inside loops (AOTInductor's kept GCC from vectorizing the experts' loops: 2.2
    ms a token). Inductor has no setting for compiler flags; its `cpp.march` value is passed to the
    compiler word by word after its own flags, so the flag rides on it. The indices a decode step
    reads are its own (top-k experts, argmax tokens, cache positions), and the same model's eager
    prefill has checked the prompt's. Clang vectorizes loops unasked."""
    if not any(multiplies_in_integers(b) for b in model.buffers()):
        return {}
    # imported here: importing Inductor takes 2.5 s, wanted only when compiling
    from torch._inductor import cpp_builder

    options = {"assert_indirect_indexing": False}
    if cpp_builder.is_gcc():
        options["cpp.march"] = f"{torch._inductor.config.cpp.march or 'native'} -ftree-loop-vectorize"
    return options


def realized(x: Tensor) -> Tensor:
    """x, computed into a buffer of its own when compiled. Left to itself Inductor fuses whatever
    made x (an RMSNorm, an embedding lookup) into the matrix loop that reads it, recomputing it
    for every output row: the head renormalised its input 8192 times a token. Inductor's
    force_stride_order prim realizes its input: the exported `small` step took 0.430 against
    0.473 ms a token in int8, 0.786 against 0.880 in fp32 (12 rounds each in turns, one process),
    tokens identical. torch.compile and torch.export register the prim; eagerly x is returned.
    On a CPU only, where it was measured: on a GPU the buffer would cost a kernel launch per
    matrix, and torch.compile's CUDA step is launch-bound already (unmeasured there)."""
    if x.device.type != "cpu" or not torch.compiler.is_compiling():
        return x
    return torch.ops.prims.inductor_force_stride_order(x, x.stride())


class PackedLinear(nn.Module):
    """An `nn.Linear` for inference: weight (O, Z) in fp32, bf16 or int8 (with scales), optional bias."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        weight, scales = _pack(linear.weight.detach(), dtype)
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        y = packed_linear(x, self.weight, self.scales)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight.dtype}"


class PackedExperts(nn.Module):
    """`Experts` for inference: w1 and w3 fused into w13 (E, 2F, D), w2 (E, D, F), int8 with scales
    (E, 2F) and (E, D) or fp32 / bf16 without. Same calls as `Experts`, without gradients."""

    impl = "packed"

    def __init__(self, experts: Experts, dtype: torch.dtype):
        super().__init__()
        w13 = torch.cat((experts.w1.detach(), experts.w3.detach()), dim=-1).transpose(1, 2)  # (E, 2F, D)
        w13, s13 = _pack(w13, dtype)
        w2, s2 = _pack(experts.w2.detach().transpose(1, 2), dtype)  # (E, D, F)
        for name, tensor in (("w13", w13), ("s13", s13), ("w2", w2), ("s2", s2)):
            self.register_buffer(name, tensor)

    @property
    def n_experts(self) -> int:
        return self.w13.shape[0]

    def forward(self, x_AD: Tensor, gates_A: Tensor, counts_E: Tensor) -> Tensor:
        """`gate * expert(x)` for each row; rows grouped by expert, `counts_E[e]` for expert e."""
        y_AD = torch.empty_like(x_AD)
        for e, rows in _expert_rows(counts_E.tolist()):
            y_AD[rows] = self.expert(e, x_AD[rows]) * gates_A[rows, None].to(x_AD.dtype)
        return y_AD

    def expert(self, e: int, x_TD: Tensor) -> Tensor:
        h1, h3 = packed_linear(x_TD, self.w13[e], _at(self.s13, e)).chunk(2, dim=-1)
        return packed_linear(F.silu(h1) * h3, self.w2[e], _at(self.s2, e))

    def chosen(self, x_TD: Tensor, experts_TK: Tensor) -> Tensor:
        """(T, K, D): each token through each of its chosen experts, for a compiled decode step:
        the chosen experts' weights are indexed inside the fused loops, never copied."""
        x = x_TD[:, None, :]  # (T, 1, D): every chosen expert sees its token
        h1, h3 = _fused_linear(x, self.w13, self.s13, experts_TK).chunk(2, dim=-1)
        return _fused_linear(F.silu(h1) * h3, self.w2, self.s2, experts_TK)


def pack_for_inference(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Swap, in place, every `nn.Linear` but the routers (which stay fp32: routing is brittle) and
    every `Experts` of `model` for their packed forms in `dtype` (fp32, bf16 or int8), attention's
    wq, wk and wv fused into one first."""
    if dtype not in PACKED_DTYPES:
        raise ValueError(f"packed weights in {dtype}: expected one of {', '.join(map(str, PACKED_DTYPES))}")
    for module in list(model.modules()):
        if hasattr(module, "fuse_qkv"):  # attention: q, k and v into one matrix, packed below like any other
            module.fuse_qkv()
    for name, module in list(model.named_modules()):
        if isinstance(module, Experts):
            packed = PackedExperts(module, dtype)
        elif isinstance(module, nn.Linear) and not name.endswith("router"):
            packed = PackedLinear(module, dtype)
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, packed)
    return model


def _pack(w: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    w, scales = quantize_int8(w) if dtype == torch.int8 else (w.to(dtype), None)
    return on_huge_pages(w.contiguous()), scales


HUGE_PAGE = 2 << 20  # bytes, x86-64's


def on_huge_pages(t: Tensor) -> Tensor:
    """A copy of a CPU tensor (same strides) in memory Linux backs with 2 MB pages (transparent
    huge pages, asked for by madvise), or t itself for a small one or elsewhere.

    A decode step streams most of the weights it reads from DRAM: in 4 KB pages that is a TLB
    miss every 4 KB. On 2 MB pages a cold fp32 matrix-vector product ran at 32 GB/s against 27,
    the exported fp32 step took 0.74-0.99 ms against 0.93-1.02. PyTorch's allocator does the same
    for every allocation under THP_MEM_ALLOC_ENABLE=1, which must be set before the process's
    first tensor; this asks it only for the weights.
    """
    if t.device.type != "cpu" or t.nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return t
    region = mmap.mmap(-1, t.nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # not touched yet
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel built without transparent huge pages
        return t
    raw = torch.frombuffer(region, dtype=torch.uint8)  # the tensor keeps the mapping alive
    start = -raw.data_ptr() % HUGE_PAGE  # the first 2 MB boundary: huge pages are aligned
    layout = torch.empty_like(t, device="meta")  # t's strides where they are dense, else contiguous ones
    return raw[start : start + t.nbytes].view(t.dtype).as_strided(t.shape, layout.stride()).copy_(t)


def _at(scales: Tensor | None, index) -> Tensor | None:
    return None if scales is None else scales[index]

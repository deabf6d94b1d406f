"""Turning logits into tokens, and generating with a KV cache (prefill once, then one token a step).

Shape legend: B rows, T positions, V vocabulary.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model import ModelOutput, packed
from ..model.kv_cache import KVCache


@dataclass
class SamplingParams:
    max_new_tokens: int = 100
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens (0 = all)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p (nucleus)
    stop_tokens: tuple[int, ...] = ()  # generation ends after emitting one of these
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        generator = torch.Generator(device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def probabilities(logits_BV: Tensor, params: SamplingParams) -> Tensor:
    """The distribution tokens are drawn from: temperature, then top-k, then top-p, renormalised.

    At temperature 0 it is one-hot on the argmax (greedy), so speculative decoding can treat
    greedy and sampled decoding alike.
    """
    logits_BV = logits_BV.float()
    if params.temperature == 0:
        return torch.nn.functional.one_hot(logits_BV.argmax(-1), logits_BV.shape[-1]).float()
    logits_BV = logits_BV / params.temperature
    if params.top_k and params.top_k < logits_BV.shape[-1]:
        kth_BV = logits_BV.topk(params.top_k, dim=-1).values[..., -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_BV, float("-inf"))
    probs_BV = logits_BV.softmax(dim=-1)
    if params.top_p < 1:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV  # mass of the more likely tokens
        sorted_BV = sorted_BV.masked_fill(before_BV >= params.top_p, 0.0)  # the first token always stays
        probs_BV = torch.zeros_like(probs_BV).scatter(-1, order_BV, sorted_BV)
        probs_BV = probs_BV / probs_BV.sum(dim=-1, keepdim=True)
    return probs_BV


def sample(probs_BV: Tensor, generator: torch.Generator | None = None) -> Tensor:
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def sample_next(logits_BV: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> Tensor:
    """(B,) next tokens."""
    if params.temperature == 0:
        return logits_BV.argmax(dim=-1)
    return sample(probabilities(logits_BV, params), generator)


def new_token_budget(prompt: list[int], params: SamplingParams, context: int) -> int:
    """How many tokens a prompt may still get: max_new_tokens, or less where the context ends."""
    if not prompt:
        raise ValueError("empty prompt")
    if len(prompt) >= context:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in model.max_seq_len={context}")
    return min(params.max_new_tokens, context - len(prompt))


def compile_decode_step(model):
    """The model compiled for one-token decode steps: one graph, static shapes, no host syncs.

    With packed weights (`load_for_inference(..., packed=True)`) each matrix-vector product is one
    fused loop reading the weights once, in their dtype, and only the chosen experts' (`packed.py`).
    On a CPU the graph's wrapper is C++ too (Inductor's `cpp_wrapper`): no Python between kernels,
    15 % faster per step at the `small` shape.
    """
    cpu = next(model.parameters()).device.type == "cpu"
    options = {"cpp_wrapper": cpu} | packed.compile_options(model)  # int8 weights: packed.py's settings
    return torch.compile(model, fullgraph=True, dynamic=False, options=options)


def batch1_decode_step(model, kv_int8: bool = False):
    """The fastest step `generate` can decode one sequence with where the model is: the exported
    one on a CPU (`ExportedDecodeStep`), torch.compile's elsewhere (`compile_decode_step`)."""
    if ExportedDecodeStep.runs_on(next(model.parameters()).device):
        return ExportedDecodeStep(model, kv_int8)
    return compile_decode_step(model)


class ExportedDecodeStep:
    """`generate`'s one-token step for one sequence over the whole context, compiled ahead of time.

    `torch.export` traces the model's step (packed weights: `compile_decode_step` says why) over
    the tensors of a KV cache, which it writes in place; AOTInductor compiles the graph into a C++
    library, and each call is one call into it: no Dynamo guards and no Python wrappers between
    the call and the kernels, which torch.compile's step pays on every token (1.4x faster per
    step on this CPU, fp32 and int8 alike; ~15-30 s to build). The library reads the model's own
    weight tensors (AOTInductor's user-managed constants) rather than a copy compiled into it:
    no second copy in memory (226 MB less for fp32 `small`), a 2 MB package to build, not 116,
    and changes to the model's weights in place are what the next step computes with. On a CPU
    only: built for CUDA it crashed (`batch1_decode_step` picks the step for a device). Only what
    `generate` needs: batch 1, T = 1, a cache of one slot at `model.cfg.max_seq_len` built as
    `kv_int8` says; it returns the logits, not the routing statistics. The graph also takes the
    greedy choice (`greedy`), so that greedy decoding never reads the logits in Python: its next
    input is the token the graph picked.
    """

    @staticmethod
    def runs_on(device: torch.device) -> bool:
        """Whether the step can be built for this device: a CPU only. Built for CUDA, AOTInductor
        crashed the process (a segfault; PyTorch 2.11, an H200)."""
        return device.type == "cpu"

    def __init__(self, model, kv_int8: bool = False):
        self.kv_int8 = kv_int8
        dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
        if not self.runs_on(device):
            raise ValueError(f"ExportedDecodeStep runs on a CPU, not {device}: its AOTInductor build for CUDA "
                             f"crashed the process (PyTorch 2.11, an H200); there use compile_decode_step")
        example = KVCache(model.cfg, slots=1, device=device, dtype=dtype, int8=kv_int8).state()
        tokens = torch.zeros(1, 1, dtype=torch.long, device=device)
        step = _StepOverCache(model, list(example), dtype)
        with torch.no_grad():
            program = torch.export.export(step, (tokens, *example.values()))
        with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # PyTorch's own, about its pytree internals
            # No weights in the library (it reads the model's, below). Reassociating float math lets
            # the C++ compiler split each dot product's one chain of additions: int8 steps 0.363
            # against 0.397 ms, fp32 level (bandwidth-bound), greedy tokens unchanged.
            package = torch._inductor.aoti_compile_and_package(
                program, package_path=f"{folder}/step.pt2",
                inductor_configs={"aot_inductor.package_constants_in_so": False,
                                  "cpp.enable_unsafe_math_opt_flag": True} | packed.compile_options(model))
            runner = torch._inductor.aoti_load_package(package)
        # The runner keeps pointers to these tensors, not copies: they live as long as this step does.
        self.weights = dict(step.named_parameters()) | dict(step.named_buffers())
        runner.load_constants({name: self.weights[name] for name in runner.get_constant_fqns()},
                              check_full_update=True, user_managed=True)
        # The loader's own entry point, flat tensors in and out: calling `runner` itself parses the
        # graph's input and output specs from JSON and flattens the arguments on every call (0.1 ms
        # a token, 11 % of an fp32 step on this CPU).
        self.run = runner.loader.boxed_run

    def __call__(self, tokens: Tensor, cache: KVCache, decode: bool = True) -> ModelOutput:
        return ModelOutput(self._run(tokens, cache)[0], None, None, None, None, [])

    def greedy(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """The step's greedy next token (1, 1), the argmax of its logits taken inside the graph."""
        return self._run(tokens, cache)[1]

    def _run(self, tokens: Tensor, cache: KVCache) -> list[Tensor]:
        if cache.int8 != self.kv_int8 or tokens.shape != (1, 1):
            raise ValueError(f"this exported step takes one token (got {tuple(tokens.shape)}) and a cache with "
                             f"kv_int8={self.kv_int8} (got {cache.int8}): build it with the cache's kv_int8")
        return self.run([tokens, *cache.state().values()])


class _StepOverCache(torch.nn.Module):
    """The model's decode step as a function of tensors only, for `torch.export`."""

    def __init__(self, model, names: list[str], dtype: torch.dtype):
        super().__init__()
        self.model, self.names, self.dtype = model, names, dtype

    def forward(self, tokens: Tensor, *state: Tensor) -> tuple[Tensor, Tensor]:
        cache = KVCache.from_state(dict(zip(self.names, state)), self.dtype)
        logits = self.model(tokens, cache=cache, decode=True).logits
        return logits, logits.argmax(dim=-1)


def generate(model, prompt: list[int], params: SamplingParams, decode_step=None,
             images: Tensor | None = None, kv_int8: bool = False) -> Iterator[int]:
    """New tokens one at a time (streaming): prefill the prompt once, then decode with the cache.
    A prompt that does not fit is an error here, before any token is asked for.

    `decode_step` runs the one-token steps (default: the model itself; `compile_decode_step(model)`
    for a compiled one); the prefill always runs eagerly, its length varying from prompt to prompt.
    `images` (M, C, W, W) go with the prompt's <|image|> tokens: they are encoded once, at the
    prefill, and the cache keeps their visual tokens for every decode step. `kv_int8`: keep the KV
    cache in int8 (`KVCache`).
    """
    budget = new_token_budget(prompt, params, model.cfg.max_seq_len)
    return _stream(model, prompt, params, budget, model if decode_step is None else decode_step, images, kv_int8)


@torch.no_grad()
def _stream(model, prompt: list[int], params: SamplingParams, budget: int, decode_step,
            images: Tensor | None, kv_int8: bool) -> Iterator[int]:
    device = next(model.parameters()).device
    # The cache always spans the whole context: one shape for every call, so a compiled model
    # never recompiles (eagerly, attention only reads as far as the sequence goes).
    cache = KVCache(model.cfg, slots=1, device=device, dtype=next(model.parameters()).dtype, int8=kv_int8)
    generator = params.generator(device)
    images = None if images is None else images[None].to(device)
    logits_1V = model(torch.tensor([prompt], device=device), cache=cache, images=images, decode=True).logits[:, -1]
    tokens_11 = sample_next(logits_1V, params, generator)[None]
    greedy_in_graph = params.temperature == 0 and isinstance(decode_step, ExportedDecodeStep)
    for i in range(budget):
        token = int(tokens_11)
        yield token
        if token in params.stop_tokens or i + 1 == budget:
            return
        if greedy_in_graph:
            tokens_11 = decode_step.greedy(tokens_11, cache)
        else:
            logits_1V = decode_step(tokens_11, cache=cache, decode=True).logits[:, -1]
            tokens_11 = sample_next(logits_1V, params, generator)[None]


@torch.no_grad()
def generate_uncached(model, prompt: list[int], params: SamplingParams, images: Tensor | None = None) -> list[int]:
    """The same tokens as `generate`, re-running the whole sequence (and its images) every step: the baseline."""
    device = next(model.parameters()).device
    generator = params.generator(device)
    tokens = list(prompt)
    images = None if images is None else images[None].to(device)
    for _ in range(new_token_budget(prompt, params, model.cfg.max_seq_len)):
        logits_V = model(torch.tensor([tokens], device=device), images=images, decode=True).logits[0, -1]
        tokens.append(int(sample_next(logits_V[None], params, generator)))
        if tokens[-1] in params.stop_tokens:
            break
    return tokens[len(prompt):]

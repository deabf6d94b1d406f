"""Inference weights: packed fp32 / bf16 / int8, the int8 KV cache, and the compiled decode step."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from moe import MoETransformer
from moe import checkpoint as ckpt
from moe.infer.engine import Engine, Request
from moe.infer.sampling import (
    ExportedDecodeStep,
    SamplingParams,
    batch1_decode_step,
    compile_decode_step,
    generate,
)
from moe.model import packed as packed_module
from moe.model.experts import Experts
from moe.model.kv_cache import KVCache
from moe.model.packed import (
    FUSED_ROWS,
    HUGE_PAGE,
    PACKED_DTYPES,
    PackedExperts,
    PackedLinear,
    on_huge_pages,
    pack_for_inference,
    packed_linear,
    quantize_int8,
)

ROOT = Path(__file__).resolve().parent.parent
GREEDY = SamplingParams(max_new_tokens=16, temperature=0)


def packed_copy(model: MoETransformer, dtype: torch.dtype) -> MoETransformer:
    copy = MoETransformer(model.cfg).eval()
    copy.load_state_dict(model.state_dict())
    return pack_for_inference(copy.to(torch.float32 if dtype == torch.int8 else dtype), dtype)


@pytest.fixture
def model(tiny):
    return MoETransformer(tiny).eval()


def test_int8_is_per_output_channel_and_within_half_a_step():
    w = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different sizes
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (64,)
    assert (q.abs().amax(dim=1) == 127).all()  # each row's largest weight uses the whole range
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-7).all()


def test_packing_swaps_every_linear_but_the_routers(model):
    pack_for_inference(model, torch.int8)
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["lm_head"] is PackedLinear and kinds["blocks.0.attn.wqkv"] is PackedLinear
    assert "blocks.0.attn.wq" not in kinds  # q, k and v: one matrix, its rows theirs
    attn = model.blocks[0].attn
    assert attn.wqkv.weight.shape == ((model.cfg.n_heads + 2 * model.cfg.n_kv_heads) * model.cfg.head_dim,
                                      model.cfg.d_model)
    assert kinds["blocks.0.ffn.experts"] is PackedExperts and kinds["blocks.0.ffn.router"] is nn.Linear
    assert model.lm_head.weight.dtype == torch.int8 and model.blocks[0].ffn.router.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="packed weights in torch.float16: expected one of"):
        pack_for_inference(MoETransformer(model.cfg), torch.float16)


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
def test_every_packed_matrix_keeps_each_output_channels_row_contiguous(model, dtype):
    # The fused loops read a row per output; the experts' weights arrive transposed, and int8's
    # quantisation kept that layout until it was made contiguous (7-10 % of an int8 step).
    pack_for_inference(model, dtype)
    weights = {f"{name}.{attr}": getattr(m, attr) for name, m in model.named_modules()
               for attr in {PackedLinear: ("weight",), PackedExperts: ("w13", "w2")}.get(type(m), ())}
    assert {"blocks.0.ffn.experts.w13", "blocks.0.ffn.experts.w2", "lm_head.weight"} <= weights.keys()
    assert all(w.dtype == dtype and w.is_contiguous() for w in weights.values())


def test_packed_fp32_computes_what_the_model_does(model):
    packed = packed_copy(model, torch.float32)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(packed(tokens).logits, model(tokens).logits, atol=1e-5, rtol=1e-5)
        caches = [KVCache(model.cfg, 2) for _ in range(2)]
        for m, cache in zip((model, packed), caches):
            m(tokens[:, :12], cache=cache, decode=True)
        for t in range(12, 20):  # decode steps: the pairs dispatcher, through PackedExperts.expert
            want, got = (m(tokens[:, t:t + 1], cache=c, decode=True).logits for m, c in zip((model, packed), caches))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
def test_low_precision_weights_stay_close_to_fp32(model, dtype):
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 20))
    with torch.no_grad():
        want = model(tokens).logits
        got = packed_copy(model, dtype)(tokens).logits.float()
    error = (got - want).abs().mean() / want.std()
    assert 0 < error < 0.02  # measured 0.004-0.006 for both


def test_large_weights_move_to_aligned_huge_page_memory_unchanged():
    w = torch.randn(4, 512, 1024).transpose(1, 2)  # 8 MB, a transposed view: strides are kept
    moved = on_huge_pages(w)
    assert torch.equal(moved, w) and moved.stride() == w.stride() and moved.data_ptr() != w.data_ptr()
    assert moved.data_ptr() % HUGE_PAGE == 0  # where a 2 MB page can start
    small = torch.randn(64, 64)
    assert on_huge_pages(small) is small  # under one page: left where it is
    experts = Experts(4, 512, 1024)
    nn.init.normal_(experts.w1), nn.init.normal_(experts.w3), nn.init.normal_(experts.w2)
    packed = PackedExperts(experts, torch.int8)  # w13: 4 MB of int8
    assert packed.w13.data_ptr() % HUGE_PAGE == 0  # packing puts them there


def test_fused_matmul_equals_linear_when_compiled():
    w = torch.randn(40, 24)
    q, scales = quantize_int8(w)
    fused = torch.compile(packed_linear, fullgraph=True, dynamic=False)
    for x in (torch.randn(1, 24), torch.randn(3, 2, 24)):  # up to FUSED_ROWS rows: Inductor's own loop
        torch.testing.assert_close(fused(x, w), nn.functional.linear(x, w), atol=1e-5, rtol=1e-5)
        # int8 within what quantizing x to int16 may cost (AVX2's integer loops): half a step of x's
        # scale, max |x| / 32767, times the sum of |W|, and fp32's rounding
        bound = x.abs().amax(-1, keepdim=True) / (2 * 32767) * (q.abs() * scales[:, None]).sum(-1) + 1e-5
        assert ((fused(x, q, scales) - packed_linear(x, q, scales)).abs() <= bound).all()


def test_int8_kv_cache_is_smaller_and_close(model):
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 24))
    full = KVCache(model.cfg, 2)
    small = KVCache(model.cfg, 2, int8=True)
    Dh = model.cfg.head_dim
    assert small.nbytes == pytest.approx(full.nbytes * (Dh + 4) / (4 * Dh))
    with torch.no_grad():
        want = model(tokens, cache=full).logits
        got = model(tokens, cache=small).logits
        step = model(tokens[:, :1], cache=small, decode=True).logits  # and a decode step reads it back
    assert small.k_SGXDh[0].dtype == torch.int8 and small.lengths.tolist() == [25, 25]
    assert 0 < (got - want).abs().max() / want.std() < 0.05 and step.isfinite().all()


def test_compiled_int8_step_with_int8_cache_matches_eager(model):
    torch._dynamo.reset()
    packed = packed_copy(model, torch.int8)
    step = compile_decode_step(packed)  # fullgraph: a graph break or host sync would raise
    eager = list(generate(packed, [5, 6, 7], GREEDY, kv_int8=True))
    assert list(generate(packed, [5, 6, 7], GREEDY, step, kv_int8=True)) == eager


def test_the_exported_step_writes_what_eager_does(model):
    packed = packed_copy(model, torch.int8)
    step = ExportedDecodeStep(packed, kv_int8=True)  # torch.export + AOTInductor: a C++ runner
    eager = list(generate(packed, [5, 6, 7], GREEDY, kv_int8=True))
    assert list(generate(packed, [5, 6, 7], GREEDY, step, kv_int8=True)) == eager  # the graph's argmax
    sampled = SamplingParams(max_new_tokens=16, temperature=1.0, seed=3)  # its logits, sampled in Python
    assert list(generate(packed, [5, 6, 7], sampled, step, kv_int8=True)) == list(
        generate(packed, [5, 6, 7], sampled, kv_int8=True))
    with pytest.raises(ValueError, match="build it with the cache's kv_int8"):
        list(generate(packed, [5, 6, 7], GREEDY, step))  # an fp32 cache: not what it was built for
    # The library reads the model's own weights, not a copy of them: change them, and it follows.
    packed.lm_head.scales.neg_()
    flipped = list(generate(packed, [5, 6, 7], GREEDY, kv_int8=True))
    assert flipped != eager and list(generate(packed, [5, 6, 7], GREEDY, step, kv_int8=True)) == flipped


@pytest.mark.parametrize("integers", [False, True])
def test_a_fused_loop_reads_its_input_computed_once_not_recomputed_per_output_row(monkeypatch, integers):
    """Inductor fuses what made a matrix loop's input (here an RMSNorm) into the loop unless the
    input is realized first: in the traced graph the product with W reads x through the realizing
    prim (past views of it), and the exported graph still computes what eager does. In fp32 and in
    integers (AVX2's int8 loops, which quantize the realized input to int16 first) alike."""
    monkeypatch.setattr(packed_module, "SLOW_INT8_LOADS", integers)
    torch.manual_seed(0)
    linear = PackedLinear(nn.Linear(16, 32, bias=False), torch.int8)

    class Normed(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return self.linear(torch.nn.functional.rms_norm(x, (16,)))

    x = torch.randn(1, 16)
    program = torch.export.export(Normed(), (x,))
    product = next(n for n in program.graph.nodes if n.target == torch.ops.aten.mul.Tensor)
    x_side = product.args[0]  # e.g. (x realized).unsqueeze(-2) * W, or ((x / s).round().to(int16)) realized
    while x_side.target in (torch.ops.aten.unsqueeze.default, torch.ops.aten.to.dtype):
        x_side = x_side.args[0]
    assert x_side.target == torch.ops.prims.inductor_force_stride_order.default
    torch.testing.assert_close(program.module()(x), Normed()(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("isa", ["AVX2", "AVX512"])
def test_compiled_int8_loops_multiply_in_integers_on_avx2_and_compute_what_eager_does(model, monkeypatch, isa):
    """Where PyTorch's AVX2 integer loads stall, a compiled int8 loop quantizes its input to int16
    and multiplies it by the weights in integers (the chosen experts' indexed inside the loop);
    elsewhere it multiplies weight by weight in fp32. Both compute what eager does, and so does a
    whole compiled step with an int8 cache."""
    monkeypatch.setattr(packed_module, "SLOW_INT8_LOADS", isa == "AVX2")
    torch.manual_seed(0)
    linear = PackedLinear(nn.Linear(32, 40, bias=False), torch.int8)
    experts = Experts(4, 32, 24)
    for w in (experts.w1, experts.w3, experts.w2):
        nn.init.normal_(w)
    experts = PackedExperts(experts, torch.int8)

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.experts = linear, experts

        def forward(self, x_TD, chosen_TK):
            return self.linear(x_TD), self.experts.chosen(x_TD, chosen_TK)

    x, chosen = torch.randn(3, 32), torch.tensor([[0, 2], [3, 1], [2, 2]])
    program = torch.export.export(Both(), (x, chosen))
    to_int16 = [n for n in program.graph.nodes if n.target == torch.ops.aten.to.dtype and n.args[1] == torch.int16]
    assert len(to_int16) == (3 if isa == "AVX2" else 0)  # the input of each of the 3 matrices
    want = (linear(x), torch.stack([torch.stack([experts.expert(int(e), x[t:t + 1])[0] for e in chosen[t]])
                                    for t in range(3)]))
    torch._dynamo.reset()
    both = Both()
    compiled = torch.compile(both, fullgraph=True, dynamic=False, options=packed_module.compile_options(both))
    for got, expected in zip(compiled(x, chosen), want):  # int16 inputs: within 1/32767 of each row's max
        torch.testing.assert_close(got, expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-4)
    packed = packed_copy(model, torch.int8)  # and the int8 cache, dequantized once a step on AVX2
    eager = list(generate(packed, [5, 6, 7], GREEDY, kv_int8=True))
    assert list(generate(packed, [5, 6, 7], GREEDY, compile_decode_step(packed), kv_int8=True)) == eager


def test_compile_options_turn_on_the_compilers_loop_vectorizer_for_integer_int8_loops_only(model, monkeypatch):
    """The integer loops need GCC's loop vectorizer, which Inductor switches off: the setting that
    turns it back on reaches the compiler's command line after Inductor's own flag (the last one
    wins). Only int8 weights on a CPU whose loops multiply in integers get it."""
    from torch._inductor import config, cpp_builder

    monkeypatch.setattr(packed_module, "SLOW_INT8_LOADS", True)
    int8, fp32 = packed_copy(model, torch.int8), packed_copy(model, torch.float32)
    options = packed_module.compile_options(int8)
    assert options["assert_indirect_indexing"] is False and packed_module.compile_options(fp32) == {}
    if cpp_builder.is_gcc():
        with config.patch(options):
            words = cpp_builder.CppBuilder("k", ["k.cpp"], cpp_builder.CppOptions()).get_command_line().split()
        assert words.index("-ftree-loop-vectorize") > words.index("-fno-tree-loop-vectorize")
        assert f"-march={config.cpp.march or 'native'}" in words
    monkeypatch.setattr(packed_module, "SLOW_INT8_LOADS", False)
    assert packed_module.compile_options(int8) == {}


def test_off_a_cpu_batch_one_decoding_takes_torch_compiles_step_not_the_exported_one(model):
    """AOTInductor's CUDA build of the exported step crashed the process on an H200 (PyTorch 2.11):
    off a CPU it refuses at once, before exporting anything, and `generate.py --compile` takes
    torch.compile's step there. (A model on the meta device stands in for one on a GPU.)"""
    packed = packed_copy(model, torch.float32)
    assert isinstance(batch1_decode_step(packed), ExportedDecodeStep)
    off_cpu = packed_copy(model, torch.float32).to("meta")
    with pytest.raises(ValueError, match="ExportedDecodeStep runs on a CPU, not meta"):
        ExportedDecodeStep(off_cpu)
    step = batch1_decode_step(off_cpu)
    assert not isinstance(step, ExportedDecodeStep) and step._orig_mod is off_cpu  # torch.compile's, lazily


def test_a_compiled_step_checks_several_tokens_at_once(model):
    """As speculative decoding's verification does: 5 tokens, 10 (token, expert) rows, one graph."""
    torch._dynamo.reset()
    packed = packed_copy(model, torch.float32)
    step = compile_decode_step(packed)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 12))
    caches = [KVCache(model.cfg, 1) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            packed(tokens[:, :7], cache=cache, decode=True)
        got = step(tokens[:, 7:], cache=caches[0], decode=True).logits
        want = packed(tokens[:, 7:], cache=caches[1], decode=True).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_engine_serves_int8_weights_and_cache_as_generate_does(model):
    packed = packed_copy(model, torch.int8)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    results = Engine(packed, slots=2, kv_int8=True).run([Request(p, GREEDY, id=i) for i, p in enumerate(prompts)])
    for r in results:
        assert r.tokens == list(generate(packed, prompts[r.id], GREEDY, kv_int8=True))


def test_continuous_batching_through_the_compiled_step_writes_the_eager_engines_tokens(model):
    """Batches of 2..FUSED_ROWS rows share one graph and a single row has its own; more rows run eagerly."""
    torch._dynamo.reset()
    packed = packed_copy(model, torch.float32)
    compiled, batches = compile_decode_step(packed), []

    def step(tokens, **kwargs):
        batches.append(len(tokens))
        return compiled(tokens, **kwargs)

    def requests() -> list[Request]:  # more than the slots, of different lengths
        return [Request([i + 1] * (1 + i % 4), SamplingParams(max_new_tokens=3 + i, temperature=0), id=i)
                for i in range(FUSED_ROWS + 4)]

    slots = FUSED_ROWS + 2
    engine = Engine(packed, slots=slots, decode_step=step)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # a running count, over every test
    assert engine.warm_up() > 0 and batches == [1, 2] and engine.cache.lengths.tolist() == [0] * slots
    got = {r.id: r.tokens for r in engine.run(requests())}
    assert got == {r.id: r.tokens for r in Engine(packed, slots=slots).run(requests())}
    assert {1, 2, FUSED_ROWS} <= set(batches) and max(batches) == FUSED_ROWS  # the larger ones went eagerly
    assert max(s.batch_size for s in engine.steps) == slots
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2  # both built by warm_up


def test_loading_int8_packs_and_plain_loading_keeps_the_checkpoint(tiny_run):
    plain, _ = ckpt.load_for_inference(tiny_run)
    assert {p.dtype for p in plain.parameters()} == {torch.float32} and isinstance(plain.lm_head, nn.Linear)
    int8, _ = ckpt.load_for_inference(tiny_run, dtype=torch.int8)
    assert int8.lm_head.weight.dtype == torch.int8 and next(int8.parameters()).dtype == torch.float32


def test_generate_and_bench_take_int8(tiny_run, tmp_path, entry_point):
    proc = entry_point("generate.py", "--checkpoint", str(tiny_run), "--prompt", "def", "--max-new-tokens", "5",
                       "--temperature", "0", "--dtype", "int8", "--kv-int8", "--compile")  # the exported step
    assert proc.returncode == 0 and proc.stdout.startswith("def"), proc.stderr
    out = tmp_path / "quality.json"
    proc = entry_point("bench.py", "quality", "--checkpoint", str(tiny_run), "--dtype", "int8", "--kv-int8",
                       "--prompts", "2", "--new-tokens", "8", "--val-batches", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["weights"], r["kv_cache"]) for r in rows] == [("fp32", "float32"), ("int8", "float32"),
                                                              ("fp32", "int8"), ("int8", "int8")]
    assert rows[0]["top1_agreement"] == 1 and rows[0]["val_loss_change"] == 0 and rows[0]["tokens"] == 16
    assert all(0.5 < r["top1_agreement"] <= 1 and abs(r["val_loss_change"]) < 0.05 for r in rows)
    proc = entry_point("bench.py", "decode", "--checkpoint", str(tiny_run), "--dtype", "int8", "--batch-sizes", "1",
                       "--prompt-lens", "8", "--new-tokens", "3", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "int8 weights, float32 activations" in proc.stdout
    bad = entry_point("bench.py", "quality", "--checkpoint", str(tiny_run), "--dtype", "int4")
    assert bad.returncode == 2 and "unknown dtype 'int4'" in bad.stderr


def test_quality_measures_the_compiled_step_token_by_token(model):
    """`bench.py quality --compile`: the compiled batch-1 step, fed a sequence one token at a time,
    predicts fp32's greedy continuation as eager fp32 does (all of it), and a continuation it did
    not write only where it happens to agree."""
    from moe.bench.benchmarks import _stepwise_agreement

    fp32 = packed_copy(model, torch.float32)
    step = batch1_decode_step(fp32)
    prompts = [[5, 6, 7], [9, 10]]
    sequences = [p + list(generate(fp32, p, SamplingParams(max_new_tokens=12, temperature=0))) for p in prompts]
    assert _stepwise_agreement(fp32, step, False, prompts, sequences) == 1
    shuffled = [p + [(t * 7 + 1) % model.cfg.vocab_size for t in s[len(p):]] for p, s in zip(prompts, sequences)]
    assert _stepwise_agreement(fp32, step, False, prompts, shuffled) < 0.5

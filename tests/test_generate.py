"""Inference: the KV cache, sampling, continuous batching and speculative decoding."""

from dataclasses import replace
from functools import partial

import pytest
import torch

from moe import ModelConfig, MoETransformer, load_config
from moe.infer.engine import Engine, Request
from moe.infer.prompts import read_prompt_file
from moe.infer.sampling import (
    SamplingParams,
    generate,
    generate_uncached,
    probabilities,
    sample_next,
)
from moe.infer.speculative import SpeculativeStats, speculative_generate
from moe.model.dispatch import DECODE_TOKENS, DecodeDispatcher, LocalDispatcher
from moe.model.kv_cache import KVCache
from moe.tokenizer import train_tokenizer

GREEDY = SamplingParams(max_new_tokens=24, temperature=0)


@pytest.fixture
def target(tiny):
    return MoETransformer(tiny).eval()


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("grad", [True, False])  # without gradients, decode=True takes the DecodeDispatcher
def test_cached_decode_equals_the_full_forward_logits(tiny, n_kv_heads, grad):
    model = MoETransformer(replace(tiny, n_kv_heads=n_kv_heads)).eval()
    tokens = torch.randint(0, tiny.vocab_size, (3, 24))
    with torch.set_grad_enabled(grad):
        full = model(tokens)
        cache = KVCache(model.cfg, slots=3)
        prefill = model(tokens[:, :10], cache=cache)
        torch.testing.assert_close(prefill.logits, full.logits[:, :10])
        for t in range(10, 24):
            step = model(tokens[:, t : t + 1], cache=cache, decode=not grad)
            torch.testing.assert_close(step.logits[:, 0], full.logits[:, t], atol=1e-5, rtol=1e-5)
            routed = sum(s.tokens_per_expert.sum() for s in step.router_stats)
            assert routed == 3 * tiny.top_k * tiny.n_layers
    assert cache.lengths.tolist() == [24, 24, 24]


def test_decode_routing_choices_match_the_full_forward(tiny):
    model = MoETransformer(tiny).eval()
    tokens = torch.randint(0, tiny.vocab_size, (1, 16))
    chosen = []
    hook = model.blocks[1].ffn.register_forward_hook(
        lambda mod, args, out: chosen.append(mod.router_logits(args[0].reshape(-1, tiny.d_model)).topk(2).indices))
    model(tokens)
    cache = KVCache(tiny, slots=1)
    with torch.no_grad():
        model(tokens[:, :8], cache=cache, decode=True)
        for t in range(8, 16):
            model(tokens[:, t : t + 1], cache=cache, decode=True)
    hook.remove()
    full, prefill, steps = chosen[0], chosen[1], chosen[2:]
    assert torch.equal(torch.cat([prefill, *steps]), full)


def test_decoding_is_the_callers_explicit_choice(tiny):
    model = MoETransformer(tiny).eval()
    tokens = torch.randint(0, tiny.vocab_size, (1, 5))
    local = model.blocks[0].ffn.dispatcher
    assert isinstance(local.for_decoding(DECODE_TOKENS), DecodeDispatcher)
    assert local.for_decoding(DECODE_TOKENS + 1) is local  # a long prefill sorts as training does
    assert LocalDispatcher(capacity_factor=1.0).for_decoding(1).capacity_factor == 1.0  # drops need the batch
    with pytest.raises(ValueError, match="torch.no_grad"):
        model(tokens, decode=True)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, decode=True).logits, model(tokens).logits)


def test_prompt_files_are_read_with_file_and_line_in_every_error(tmp_path):
    tokenizer = train_tokenizer(["def main(): pass"] * 5, 300)
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "a"}\n\n{"images": []}\n')
    texts, requests = read_prompt_file(good, tokenizer, None, GREEDY)
    assert texts == ["a", ""] and [r.id for r in requests] == [0, 1] and requests[0].prompt[0] == 0  # EOT first
    for name, text, message in [("list.jsonl", '{"images": "x.png"}\n', 'list.jsonl:1: "images" must be a list'),
                                ("array.jsonl", '{"prompt": "a"}\n\n[1, 2]\n', "array.jsonl:3: expected a JSON object")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            read_prompt_file(tmp_path / name, tokenizer, None, GREEDY)


def test_cache_is_n_heads_times_smaller_under_mqa(tiny):
    mqa = KVCache(replace(tiny, n_kv_heads=1), slots=2)
    mha = KVCache(replace(tiny, n_kv_heads=tiny.n_heads), slots=2)
    assert mha.nbytes == tiny.n_heads * mqa.nbytes
    assert mqa.nbytes == 2 * tiny.n_layers * 2 * 1 * tiny.max_seq_len * tiny.head_dim * 4  # K and V, fp32


def test_cached_generation_equals_uncached(target):
    for params in (GREEDY, SamplingParams(max_new_tokens=20, temperature=0.9, top_k=40, top_p=0.9, seed=3)):
        assert list(generate(target, [1, 2, 3], params)) == generate_uncached(target, [1, 2, 3], params)


def test_sampling_is_seeded_and_stops_at_stop_tokens(target):
    params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=7)
    first = list(generate(target, [4, 5], params))
    assert first == list(generate(target, [4, 5], params)) and len(first) == 30
    assert first != list(generate(target, [4, 5], replace(params, seed=8)))
    stop = first[5]
    stopped = list(generate(target, [4, 5], replace(params, stop_tokens=(stop,))))
    assert stopped == first[: first.index(stop) + 1]


def test_top_k_and_top_p_keep_exactly_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    top_k = probabilities(logits, SamplingParams(top_k=2))
    torch.testing.assert_close(top_k, torch.tensor([[0.5, 0.2, 0, 0, 0]]) / 0.7)
    top_p = probabilities(logits, SamplingParams(top_p=0.8))  # 0.5 + 0.2 < 0.8 <= 0.5 + 0.2 + 0.15
    torch.testing.assert_close(top_p, torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85)
    assert probabilities(logits, SamplingParams(top_p=0.3))[0].tolist() == [1, 0, 0, 0, 0]
    assert sample_next(logits, SamplingParams(temperature=0)).item() == 0
    hot = probabilities(logits, SamplingParams(temperature=0.5))
    torch.testing.assert_close(hot, torch.tensor([[0.25, 0.04, 0.0225, 0.01, 0.0025]]) / 0.325)


def test_prompt_longer_than_the_context_is_a_clear_error(target, tiny):
    with pytest.raises(ValueError, match="leaves no room in model.max_seq_len=64"):
        next(generate(target, list(range(tiny.max_seq_len)), GREEDY))


def test_continuous_batching_gives_each_request_what_it_gets_alone(target):
    requests = [Request([3 + i, 9, 27 + i], SamplingParams(max_new_tokens=4 + 5 * i, temperature=0), id=i)
                for i in range(7)]
    engine = Engine(target, slots=3)
    results = engine.run(requests)
    assert sorted(r.id for r in results) == list(range(7))
    for r in results:
        assert r.tokens == list(generate(target, requests[r.id].prompt, requests[r.id].params))
    sizes = [s.batch_size for s in engine.steps]
    assert max(sizes) == 3 and min(sizes) == 1  # the batch shrinks as the queue empties
    assert sizes[: sizes.index(2)] == [3] * sizes.index(2)  # finished slots are refilled at once
    for step in engine.steps:  # every decoded token routed to top_k experts in every MoE layer
        assert all(sum(layer) == step.batch_size * target.cfg.top_k for layer in step.tokens_per_expert)


def test_batched_results_equal_solo_results_at_the_context_end(target, tiny):
    lengths = (tiny.max_seq_len - 5, tiny.max_seq_len - 2, tiny.max_seq_len - 1)  # prompt + 18 passes the end
    requests = [Request(torch.randint(5, tiny.vocab_size, (n,)).tolist(), SamplingParams(max_new_tokens=18,
                        temperature=0), id=i) for i, n in enumerate(lengths)]
    results = Engine(target, slots=2).run(requests)
    for r in results:
        solo = list(generate(target, requests[r.id].prompt, requests[r.id].params))
        assert r.tokens == solo and len(solo) == tiny.max_seq_len - len(requests[r.id].prompt)
        assert r.finish == "length"


def test_a_long_prompt_is_prefilled_in_chunks_while_the_other_rows_decode(target, tiny):
    short = Request([3, 9, 27], SamplingParams(max_new_tokens=20, temperature=0), id=0)
    long = Request(torch.randint(5, tiny.vocab_size, (40,)).tolist(), SamplingParams(8, temperature=0), id=1)
    engine = Engine(target, slots=2, step_tokens=8)
    engine.submit(short)
    assert [e.id for e in engine.step().emitted] == [0, 0]  # prefilled, first token, then decoded
    engine.submit(long)
    records = [engine.step() for _ in range(6)]
    assert [r.prefill_tokens for r in records] == [7, 7, 7, 7, 7, 5]  # 8 a step, less the decoding row
    assert [r.batch_size for r in records] == [1, 1, 1, 1, 1, 2]  # the short row never waits
    results = {r.id: r.tokens for r in engine.run()}
    for request in (short, long):  # chunked or whole, the same tokens
        assert results[request.id] == list(generate(target, request.prompt, request.params))
    with pytest.raises(ValueError, match="step_tokens=2 must exceed slots=2"):
        Engine(target, slots=2, step_tokens=2)


def test_short_prompts_waiting_together_are_prefilled_in_one_forward(target, tiny):
    prompts = [torch.randint(5, tiny.vocab_size, (n,)).tolist() for n in (3, 9, 5, 12, 30)]
    requests = [Request(p, SamplingParams(6, temperature=0), id=i) for i, p in enumerate(prompts)]
    engine = Engine(target, slots=5, step_tokens=48)
    forwards = []
    target.register_forward_hook(lambda module, args, out: forwards.append(tuple(args[0].shape)))
    for request in requests:
        engine.submit(request)
    assert engine.step().prefill_tokens == 3 + 9 + 5 + 12
    assert forwards == [(4, 12), (4, 1)]  # 4 prompts padded to 12 (48 tokens, the budget), then their decode
    engine.step()  # 48 less the 4 decoding rows leaves room for the 30
    assert forwards[2:] == [(1, 30), (5, 1)]
    results = {r.id: r.tokens for r in engine.run()}
    for request in requests:  # padded or not, the same tokens
        assert results[request.id] == list(generate(target, request.prompt, request.params))


def test_a_cancelled_request_frees_its_slot_for_the_next_step(target):
    engine = Engine(target, slots=1)
    for i in range(3):
        engine.submit(Request([3 + i, 9], SamplingParams(max_new_tokens=50, temperature=0), id=i))
    engine.step()
    assert engine.cancel(2) and engine.cancel(0) and not engine.cancel(0)  # queued, running, gone
    assert [e.id for e in engine.step().emitted] == [1, 1]  # request 1 has the slot
    assert not engine.queue and list(engine.running) == [0]


def test_static_batching_waits_for_the_whole_batch(target):
    requests = [Request([1, 2], SamplingParams(max_new_tokens=n, temperature=0), id=i) for i, n in enumerate([2, 9, 2, 2])]
    static, continuous = Engine(target, slots=2, static=True), Engine(target, slots=2)
    static.run(requests)
    continuous.run(requests)
    assert len(static.steps) > len(continuous.steps)
    assert sorted(r.tokens for r in static.results) == sorted(r.tokens for r in continuous.results)


@pytest.mark.parametrize("noise", [0.0, 0.3, 3.0])  # draft = target (all accepted), close, unrelated
def test_greedy_speculative_output_is_the_plain_greedy_output(target, noise, noisy_copy):
    draft = noisy_copy(target, noise)
    stats = SpeculativeStats()
    for k in (1, 4):
        assert list(speculative_generate(target, draft, [7, 8, 9], GREEDY, k=k, stats=stats)) == \
            list(generate(target, [7, 8, 9], GREEDY))
    if noise == 0:
        assert stats.acceptance_rate == 1.0 and stats.tokens_per_target_forward > 2
    if noise == 3.0:
        assert stats.acceptance_rate < 0.5


def test_speculative_sampling_is_distributed_exactly_as_the_target(noisy_copy):
    cfg = ModelConfig(vocab_size=8, d_model=16, n_layers=1, n_heads=2, n_experts=4, top_k=2, d_ff=16,
                      max_seq_len=16, init_std=0.3)
    torch.manual_seed(1)
    target = MoETransformer(cfg).eval()
    draft = noisy_copy(target, 1.0)
    prompt = [3, 1]
    with torch.no_grad():
        p1 = target(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        p2 = sum(p1[x] * target(torch.tensor([prompt + [x]])).logits[0, -1].softmax(-1) for x in range(8))
    n = 2000
    counts = torch.zeros(2, 8)
    stats = SpeculativeStats()
    for seed in range(n):
        params = SamplingParams(max_new_tokens=2, temperature=1.0, seed=seed)
        first, second = speculative_generate(target, draft, prompt, params, k=3, stats=stats)
        counts[0, first] += 1
        counts[1, second] += 1
    assert 0.2 < stats.acceptance_rate < 0.95  # both the accept and the resample paths ran
    critical = 24.32  # chi-square, 7 degrees of freedom, p = 0.001
    for observed, expected in zip(counts, (p1 * n, p2 * n)):
        assert ((observed - expected) ** 2 / expected).sum() < critical


def test_draft_with_another_vocabulary_is_refused(target, tiny):
    other = MoETransformer(replace(tiny, vocab_size=256)).eval()
    with pytest.raises(ValueError, match="draft vocabulary \\(256\\) differs from the target's \\(512\\)"):
        speculative_generate(target, other, [1], GREEDY)


# ---- the command line -------------------------------------------------------------------------

import json
from pathlib import Path

from moe.train.trainer import RunOptions, Trainer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def generate_cli(entry_point):
    return partial(entry_point, "generate.py")


def test_generate_streams_a_continuation(tiny_run, generate_cli):
    proc = generate_cli("--checkpoint", str(tiny_run), "--prompt", "def f(x):", "--max-new-tokens", "12",
                        "--temperature", "0", "--stream")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("def f(x):") and "tokens/s" in proc.stderr


def test_generate_serves_a_prompt_file_with_continuous_batching(tiny_run, tmp_path, generate_cli):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\n\nclass A:\nx = 1\n")
    args = ("--checkpoint", str(tiny_run), "--prompt-file", str(prompts), "--max-new-tokens", "5", "--slots", "2",
            "--temperature", "0")
    proc = generate_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stdout.splitlines() if line.startswith("--- ")] == \
        ["--- 0: import os", "--- 1: class A:", "--- 2: x = 1"]
    compiled = generate_cli(*args, "--compile")  # the engine's decode steps compiled: the same text
    assert compiled.returncode == 0 and "the steps compiled in" in compiled.stderr, compiled.stderr
    assert compiled.stdout == proc.stdout


def test_generate_with_a_draft_reports_acceptance(tiny_run, generate_cli):
    proc = generate_cli("--checkpoint", str(tiny_run), "--draft-checkpoint", str(tiny_run), "--prompt", "a",
                        "--max-new-tokens", "10", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert "acceptance 100%" in proc.stderr


def test_a_draft_with_another_vocabulary_is_one_clear_error(tiny_run, tmp_path, generate_cli):
    cfg = load_config("tiny", [f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}", "data.sources={docs = 1}",
                               "model.vocab_size=384", "train.max_steps=1", "train.sample_tokens=0"])
    Trainer(cfg, RunOptions(tmp_path / "other", torch.device("cpu"), peak_flops=1e11, quiet=True)).train()
    proc = generate_cli("--checkpoint", str(tiny_run), "--draft-checkpoint", str(tmp_path / "other"), "--prompt", "a")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "its tokenizer differs from" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "/no/such/run"], "checkpoint /no/such/run: no such file or directory"),
    (["--prompt", "word " * 100], "leaves no room in model.max_seq_len=64"),
    (["--prompt", "word " * 100, "--draft-checkpoint", "RUN"], "leaves no room in model.max_seq_len=64"),
    (["--top-p", "0"], "top_p=0.0: must be in (0, 1]"),
    (["--prompt-file", "nothere.txt"], "--prompt-file nothere.txt: no such file"),
    (["--prompt-file", "EMPTY"], "no prompts in it"),
])
def test_generate_errors_are_one_clear_line(tiny_run, args, message, tmp_path, generate_cli):
    (tmp_path / "empty.txt").write_text("\n \n")
    args = [{"RUN": str(tiny_run), "EMPTY": str(tmp_path / "empty.txt")}.get(a, a) for a in args]
    proc = generate_cli("--checkpoint", str(tiny_run), *args)
    assert proc.returncode == 2
    assert proc.stdout == "" and proc.stderr.count("\n") == 1  # nothing echoed first; the error on its own line
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_the_decode_step_compiles_to_one_graph_and_matches_eager(target):
    from moe.infer.sampling import compile_decode_step

    torch._dynamo.reset()
    step = compile_decode_step(target)  # fullgraph: a graph break or host sync would raise
    params = SamplingParams(max_new_tokens=12, temperature=0)
    assert list(generate(target, [5, 6, 7], params, step)) == list(generate(target, [5, 6, 7], params))

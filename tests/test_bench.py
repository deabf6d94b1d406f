"""The cost model against hand-computed values and the model itself; the benchmarks behind bench.py."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moe import MoETransformer, costmodel, load_config
from moe.bench import benchmarks
from moe.bench.claims import claims
from moe.bench.commands import build_parser
from moe.bench.serving import at_equal_latency, poisson_load
from moe.model.kv_cache import KVCache

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def meta_model(cfg):
    with torch.device("meta"):
        return MoETransformer(cfg)


CONFIGS = {
    "tiny": [],
    "small": [],
    "dense_small": [],
    "gpt4": [],
    "tiny-gqa-tied-every-2": ["model.n_kv_heads=2", "model.tie_embeddings=true", "model.moe_every=2"],
    "small-mha-top1": ["model.n_kv_heads=8", "model.top_k=1"],
}


@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_counts_and_flops_equal_the_models_own(name):
    cfg = load_config(name.split("-")[0], CONFIGS[name]).model
    model, ours = meta_model(cfg), costmodel.param_counts(cfg)
    theirs = model.param_counts()
    for field in ("embedding", "attention", "experts", "dense_ffn", "router", "norm", "total", "active"):
        assert getattr(ours, field) == getattr(theirs, field), field
    for context in (1, 100, cfg.max_seq_len):
        assert costmodel.flops_per_token(cfg, context) == model.flops_per_token(context)
        assert costmodel.flops_per_token(cfg, context, training=True) == model.flops_per_token(context, training=True)


def test_the_gpt4_config_reproduces_the_reference_figures():
    p = costmodel.param_counts(load_config("gpt4").model)
    assert 1.8e12 < p.total < 1.85e12 and 275e9 < p.active < 285e9
    assert 54e9 < p.attention < 58e9 and 110e9 < p.per_expert < 112e9


def test_kv_cache_bytes_by_hand_and_against_the_cache():
    cfg = load_config("small").model  # 4 layers, 8 heads of 32, 1 K/V head
    assert costmodel.kv_cache_bytes(cfg, batch=3, context=100) == 2 * 4 * 1 * 32 * 2 * 3 * 100  # K+V, bf16
    for g in (1, 2, 8):
        shaped = dataclasses.replace(cfg, n_kv_heads=g)
        assert costmodel.kv_cache_bytes(shaped, 5, shaped.max_seq_len, bytes_per_value=4) == \
            KVCache(shaped, slots=5, device="meta").nbytes
    mha = dataclasses.replace(cfg, n_kv_heads=cfg.n_heads)
    assert costmodel.kv_cache_bytes(mha, 1, 64) / costmodel.kv_cache_bytes(cfg, 1, 64) == cfg.n_heads


def test_unique_experts_expectation_matches_a_simulation():
    rng = np.random.default_rng(0)
    E, k = 16, 2
    for batch in (1, 3, 8, 64):
        picks = np.argsort(rng.random((4000, batch, E)), axis=-1)[..., :k]  # k distinct experts per token
        distinct = np.mean([len(np.unique(p)) for p in picks])
        assert distinct == pytest.approx(costmodel.expected_experts(E, k, batch), rel=0.01)


def test_a_decode_step_by_hand():
    cfg = load_config("tiny").model  # V 512, D 64, 2 layers, 4 heads / 1 KV, 16 experts of F 64, top-2
    hw = costmodel.Hardware("toy", flops=1e12, bandwidth=1e10, memory=1e9, dollars_per_hour=3.6)
    step = costmodel.decode_step(cfg, hw, batch=1, context=10, bytes_per_param=2)
    p = costmodel.param_counts(cfg)
    weights = (p.total - p.experts - 512 * 64 + 2 * 2 * 3 * 64 * 64) * 2  # batch 1: 2 experts in each of 2 layers
    kv = 2 * 2 * 1 * 16 * 10 * 2
    assert step["weight_bytes"] == weights and step["kv_bytes"] == kv
    assert step["memory_s"] == pytest.approx((weights + kv) / 1e10)
    assert step["bound"] == "memory" and step["step_s"] == step["memory_s"]
    assert step["dollars_per_1k_tokens"] == pytest.approx(3.6 / 3600 * step["step_s"] * 1000)
    two = costmodel.decode_step(cfg, hw, batch=1, context=10, tp=2)
    assert two["step_s"] == pytest.approx(step["step_s"] / 2) and two["tokens_per_s_per_user"] == pytest.approx(
        2 * step["tokens_per_s_per_user"])


def test_a_parallel_training_step_by_hand():
    assert costmodel.pipeline_bubble(4, 12) == pytest.approx(3 / 15)
    assert costmodel.pipeline_bubble(4, 12, stages_per_rank=2) == pytest.approx(3 / 27)
    assert costmodel.pipeline_bubble(1, 1) == 0
    cfg = load_config("tiny").model  # 2 layers, D=64
    hw = costmodel.Hardware("toy", flops=1e12, bandwidth=1e10, memory=1e9, dollars_per_hour=1.0, link=1e9)
    step = costmodel.training_step(cfg, hw, tokens=1000, tp=4, pp=2, microbatches=6, mfu=0.5)
    flops = 1000 * costmodel.flops_per_token(cfg, cfg.max_seq_len, training=True)
    assert step["compute_s"] == pytest.approx(flops / (8 * 0.5e12))
    # one layer a stage: 4 all-reduces of 1000 x 64 bf16 values, a ring moving 2 * 3/4 of each
    assert step["tp_bytes"] == 4 * 1 * 1000 * 64 * 2 * 2 * 3 / 4
    assert step["pp_bytes"] == 2 * 1000 * 64 * 2  # activations on, their gradients back
    assert step["comm_s"] == pytest.approx((step["tp_bytes"] + step["pp_bytes"]) / 1e9)
    assert step["step_s"] == pytest.approx((step["compute_s"] + step["comm_s"]) / (1 - 1 / 7))
    assert costmodel.training_step(cfg, hw, 1000)["tp_bytes"] == 0


def test_the_parallel_benchmark_measures_a_pipeline_under_torchrun(tmp_path, entry_point):
    out = tmp_path / "p.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "bench.py", "parallel",
                           "--config", "tiny", "--train.pp=2", "--microbatches", "1,2", "--schedules", "1f1b,gpipe",
                           "--iters", "2", "--json", str(out)], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["schedule"], r["microbatches"]) for r in rows] == [("1f1b", 2), ("gpipe", 1), ("gpipe", 2)]  # 1f1b: m >= p
    for r in rows:
        assert 0 < r["step_s"] and 0 <= r["bubble"] < 1 and r["imbalance"] >= 1
        assert r["bubble_model"] == pytest.approx(1 / (r["microbatches"] + 1))
    split = entry_point("bench.py", "parallel", "--config", "tiny", "--expert-split", "256", "--iters", "2", "--json",
                        str(out))
    assert split.returncode == 0, split.stderr
    result = json.loads(out.read_text())
    assert result["rows_split"] == 512 and 0 < result["rows_divided"] < 512 and result["split_over_divided"] > 0


def test_speculative_closed_form():
    assert costmodel.tokens_per_target_forward(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert costmodel.speculative_speedup(0.5, 2, 0.0) == pytest.approx(1.75)
    assert costmodel.speculative_speedup(0.5, 2, 0.25) == pytest.approx(1.75 / 1.5)


def test_the_claims_table_covers_the_spec_and_gives_verdicts():
    rows = claims(load_config("gpt4").model)
    assert len(rows) == 12 and all(r["figure"] and r["verdict"] for r in rows)
    text = " ".join(r["figure"] for r in rows)
    assert "6.7 tokens/s" in text  # 1 T dense on 8x H100, overheads equal to parameter reads
    assert "10.5 of 16" in text  # distinct experts at batch 8


def test_the_cost_model_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import moe.costmodel as c; from moe.config import load_config\n"
            "print(c.param_counts(load_config('gpt4').model).total)")
    proc = run("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == costmodel.param_counts(load_config("gpt4").model).total


# ---- the measured benchmarks ------------------------------------------------------------------

@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return MoETransformer(load_config("tiny").model).eval()


def test_decode_sweep_counts_the_experts_it_touched(tiny_model):
    peaks = {"matmul_flops": 1e11, "bandwidth": 1e10}
    result, routing = benchmarks.decode_sweep(tiny_model, peaks, batch_sizes=(1, 4), prompt_lens=(8,), new_tokens=5)
    assert [(r["prompt_len"], r["batch"]) for r in result["rows"]] == [(8, 1), (8, 4)]
    assert routing[1].shape == (5, 2, 16) and (routing[1].sum(-1) == 2).all()  # one token, top-2, per layer
    assert (routing[4].sum(-1) == 8).all()
    load = benchmarks.expert_load(tiny_model.cfg, routing)["rows"]
    assert load[0]["distinct"] == 2 and load[0]["max"] == 1 and load[0]["idle_share"] == pytest.approx(14 / 16)
    assert 2 <= load[1]["distinct"] <= 8 and load[1]["mean"] == pytest.approx(0.5)
    assert all(r["mbu"] > 0 and r["mfu"] > 0 for r in result["rows"])


@pytest.mark.parametrize("noise", [0.0, 3.0])
def test_batched_speculative_decoding_is_plain_greedy_row_by_row(tiny_model, noise, noisy_copy):
    draft = noisy_copy(tiny_model, noise)
    prompts = torch.randint(0, 512, (3, 6), generator=torch.Generator().manual_seed(1))
    r = benchmarks.speculative_batch(tiny_model, draft, prompts, new_tokens=12, k=3)
    assert r["matches_greedy"]
    if noise == 0:
        assert r["acceptance"] == 1.0 and r["tokens_per_target_forward"] == 4
    else:
        assert r["acceptance"] < 0.5


def test_bench_help_documents_every_command(capsys):
    proc = run("bench.py", "--help")  # the entry point itself, once
    assert proc.returncode == 0
    for command in ("machine", "decode", "experts", "batching", "speculative", "costmodel", "moe-layer", "train-step",
                    "parallel", "serve"):
        assert f"  {command} " in proc.stdout
        with pytest.raises(SystemExit) as exit:  # each command's own help, in this process (no start-up each)
            build_parser().parse_args([command, "--help"])
        assert exit.value.code == 0 and "--json" in capsys.readouterr().out


def test_bench_commands_write_json(tmp_path, entry_point):
    out = tmp_path / "r.json"
    for args in (["machine"], ["decode", "--config", "tiny", "--batch-sizes", "1,2", "--prompt-lens", "8",
                               "--new-tokens", "4"],
                 ["experts", "--config", "tiny", "--batch-sizes", "1,8", "--new-tokens", "4"],
                 ["costmodel", "--config", "gpt4", "--tp", "8", "--train-tokens", "13e12"]):
        proc = entry_point("bench.py", *args, "--json", str(out))
        assert proc.returncode == 0, proc.stderr
        result = json.loads(out.read_text())
        assert result["benchmark"] == args[0]
        if args[0] == "machine":  # both precisions' peaks, the compute dtype's as the roofline
            assert set(result["matmul_flops_by_dtype"]) == {"float32", "bfloat16"}
            assert result["matmul_flops"] == result["matmul_flops_by_dtype"][result["dtype"]] > 0
    assert result["params"]["total"] == costmodel.param_counts(load_config("gpt4").model).total
    assert result["decode"]["bound"] == "memory" and result["training"]["flops"] > 2e25


def test_plots_are_written(tmp_path, entry_point):
    pytest.importorskip("matplotlib")
    out = tmp_path / "experts.png"
    proc = entry_point("bench.py", "experts", "--config", "tiny", "--batch-sizes", "1,4", "--new-tokens", "3", "--plot",
                       str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_documented_claims_table_is_what_the_cost_model_says():
    readme = (ROOT / "docs" / "benchmarks.md").read_text()
    for row in claims(load_config("gpt4").model):
        assert f"| {row['claim']} | {row['figure']} | {row['verdict']} |" in readme, row["claim"]


def test_the_serve_benchmark_loads_both_compiled_engines_over_http(tmp_path, tiny_run, entry_point):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    proc = entry_point("bench.py", "serve", "--checkpoint", str(tiny_run), "--rates", "20,40", "--requests", "6",
                       "--slots", "4", "--timeout", "60", "--json", str(out), "--plot", str(png),
                       "--compile")  # the servers' decode steps compiled
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert [(r["mode"], r["rate"]) for r in result["rows"]] == [("static", 20), ("static", 40), ("continuous", 20),
                                                                 ("continuous", 40)]
    for row in result["rows"]:  # every request streamed exactly the Pareto length it asked for
        asked = sum(a.max_tokens for a in poisson_load(6, row["rate"], 512, 64))
        assert row["served"] == 6 and row["tokens"] == asked and not row["errors"]
        assert 0 < row["ttft_s"]["p50"] <= row["ttft_s"]["p99"] <= row["latency_s"]["p99"]
    assert set(result["at_equal_p99"]) == {"ttft_s", "per_token_s", "latency_s"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_throughput_at_equal_latency_is_read_off_the_other_curve():
    def row(mode, tokens_per_s, p99):
        return {"mode": mode, "rate": tokens_per_s, "served": 1, "tokens_per_s": tokens_per_s, "ttft_s": {"p99": p99}}
    rows = [row("static", 10, 1.0), row("static", 20, 4.0),
            row("continuous", 10, 0.5), row("continuous", 30, 1.5), row("continuous", 40, 3.0)]
    found = at_equal_latency(rows, "ttft_s")
    assert [(p["ratio"], p["lower_bound"]) for p in found] == [(2.0, False), (2.0, True)]  # 20 at 1.0 s, interpolated

"""bf16 and fp32: choosing the precision, the kernels in bf16 against the fp32 reference, training,
resuming and generating in bf16. Every test runs on any CPU: PyTorch computes bf16 on all of them
(emulated where the hardware lacks it), so only `auto`'s choice depends on the machine."""

import json
from pathlib import Path

import pytest
import torch

from moe import checkpoint as ckpt
from moe import hardware
from moe.config import ConfigError, ModelConfig, load_config
from moe.infer.sampling import SamplingParams, generate, generate_uncached
from moe.model import MoE
from moe.model.experts import moe_reference
from moe.model.kv_cache import KVCache
from moe.model.routing import route
from moe.train.trainer import RunOptions, Trainer

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
# bf16 keeps 8 bits of mantissa: one rounding is ~0.4 %; a layer's output, a sum of a few hundred
# products rounded at each matmul's end, lands within a few percent of fp32's, the fp32 reference's.
BF16_TOLERANCE = dict(rtol=0.05, atol=0.02)


def test_precision_names_and_devices_without_bf16_are_one_clear_error():
    assert hardware.resolve_precision("fp32", CPU) == torch.float32
    assert hardware.resolve_precision("bf16", CPU) == torch.bfloat16
    assert hardware.resolve_precision("auto", CPU) in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="precision 'fp16': expected auto, fp32 or bf16"):
        hardware.resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="precision bf16: meta has no bf16 matmuls"):
        hardware.resolve_precision("bf16", torch.device("meta"))
    assert hardware.resolve_precision("auto", torch.device("meta")) == torch.float32  # no bf16: fp32
    with pytest.raises(ConfigError, match="train.precision='fp16': expected one of 'auto', 'bf16', 'fp32'"):
        load_config("tiny", ["train.precision=fp16"])


def test_auto_takes_bf16_exactly_where_the_probe_finds_it_faster(monkeypatch):
    peaks = {torch.float32: 100e9, torch.bfloat16: 400e9}
    monkeypatch.setattr(hardware, "matmul_peak", lambda device, n, iters, dtype: peaks[dtype])
    hardware.fast_bf16.cache_clear()
    assert hardware.resolve_precision("auto", CPU) == torch.bfloat16
    peaks[torch.bfloat16] = 50e9  # emulated bf16: slower than fp32
    hardware.fast_bf16.cache_clear()
    assert hardware.resolve_precision("auto", CPU) == torch.float32
    hardware.fast_bf16.cache_clear()  # the real probe for later tests


@pytest.mark.parametrize("impl", ["split", "grouped_mm"])
def test_fast_expert_paths_in_bf16_equal_the_fp32_reference(impl):
    cfg = ModelConfig(d_model=64, d_ff=96, n_experts=8, top_k=2, expert_impl=impl)
    torch.manual_seed(0)
    layer = MoE(cfg)
    x = torch.randn(200, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x).y
    assert y.dtype == torch.float32  # bf16 inside, the residual stream's dtype outside
    grads = torch.autograd.grad(y.square().sum(), [x, layer.experts.w1, layer.experts.w2, layer.router.weight])
    assert all(g.dtype == torch.float32 for g in grads)  # fp32 gradients for fp32 master weights

    y_ref = moe_reference(x, route(layer.router_logits(x), cfg.top_k), layer.experts)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, layer.experts.w1, layer.experts.w2, layer.router.weight])
    torch.testing.assert_close(y, y_ref, **BF16_TOLERANCE)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g / g_ref.abs().max(), g_ref / g_ref.abs().max(), **BF16_TOLERANCE)


def test_the_router_stays_fp32_under_bf16_autocast():
    layer = MoE(ModelConfig(d_model=32, d_ff=32, n_experts=4, top_k=2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.router_logits(torch.randn(5, 32)).dtype == torch.float32


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def tiny(cache_dir, *overrides):
    return load_config("tiny", [f"data.cache_dir={json.dumps(cache_dir)}", "data.sources={docs = 1}",
                                "train.sample_tokens=0", "train.max_steps=30", "train.eval_every=15", *overrides])


@pytest.fixture(scope="module")
def runs(cache_dir, tmp_path_factory):
    """The same 30 steps in fp32 and in bf16: same data, same order."""
    out = {}
    for precision in ("fp32", "bf16"):
        run = tmp_path_factory.mktemp(precision) / "run"
        Trainer(tiny(cache_dir, f"train.precision={precision}"),
                RunOptions(run, CPU, peak_flops=1e11, quiet=True)).train()
        out[precision] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return out


def test_bf16_training_learns_what_fp32_learns_and_says_it_ran_in_bf16(runs):
    evals = {p: [r["val_loss"] for r in records if r["type"] == "eval"] for p, records in runs.items()}
    assert len(evals["bf16"]) == 3 and evals["bf16"][-1] < evals["bf16"][0] - 0.2  # it learns
    assert evals["bf16"] != evals["fp32"]  # really another precision...
    assert evals["bf16"] == pytest.approx(evals["fp32"], abs=0.05)  # ...learning the same
    for precision, records in runs.items():
        logged = {r.get("precision") for r in records if r["type"] in ("train", "summary")}
        assert logged == {precision}


def test_bf16_checkpoints_hold_fp32_weights(cache_dir, tmp_path):
    Trainer(tiny(cache_dir, "train.precision=bf16", "train.max_steps=2"),
            RunOptions(tmp_path, CPU, peak_flops=1e11, quiet=True)).train()
    model, _ = ckpt.load_for_inference(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_generation_in_bf16_stores_weights_and_cache_in_bf16(cache_dir, tmp_path):
    Trainer(tiny(cache_dir, "train.max_steps=2"), RunOptions(tmp_path, CPU, peak_flops=1e11, quiet=True)).train()
    model, _ = ckpt.load_for_inference(tmp_path, CPU, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 10))
    with torch.no_grad():
        full = model(tokens).logits
        cache = KVCache(model.cfg, slots=2, device=CPU, dtype=torch.bfloat16)
        steps = [model(tokens[:, :6], cache=cache, decode=True).logits]
        steps += [model(tokens[:, t : t + 1], cache=cache, decode=True).logits for t in range(6, 10)]
    assert full.dtype == cache.k_SGXDh[0].dtype == torch.bfloat16
    # cached decoding rounds in another order than the full forward: equal within bf16's precision
    torch.testing.assert_close(torch.cat(steps, dim=1).float(), full.float(), **BF16_TOLERANCE)
    tokens = list(generate(model, [1, 2, 3], SamplingParams(max_new_tokens=12, temperature=0)))
    assert len(tokens) == 12 and all(0 <= t < model.cfg.vocab_size for t in tokens)


def test_bf16_asked_of_a_device_without_it_is_refused_before_any_work(cache_dir, tmp_path):
    with pytest.raises(ConfigError, match="train.precision bf16: meta has no bf16 matmuls"):
        Trainer(tiny(cache_dir, "train.precision=bf16"), RunOptions(tmp_path, torch.device("meta"), quiet=True))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_generate_and_bench_take_a_dtype(cache_dir, tmp_path, entry_point):
    Trainer(tiny(cache_dir, "train.max_steps=2"), RunOptions(tmp_path / "run", CPU, peak_flops=1e11, quiet=True)).train()
    proc = entry_point("generate.py", "--checkpoint", str(tmp_path / "run"), "--prompt", "def", "--max-new-tokens", "5",
                       "--temperature", "0", "--dtype", "bf16")
    assert proc.returncode == 0 and proc.stdout.startswith("def"), proc.stderr
    bad = entry_point("generate.py", "--checkpoint", str(tmp_path / "run"), "--dtype", "fp16")
    assert bad.returncode == 2 and "invalid choice: 'fp16'" in bad.stderr
    out = tmp_path / "decode.json"
    proc = entry_point("bench.py", "decode", "--config", "tiny", "--batch-sizes", "1", "--prompt-lens", "8",
                       "--new-tokens", "3", "--dtype", "bf16", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    peak = json.loads(out.read_text())["matmul_flops"]
    assert "greedy decoding, bfloat16 weights, bfloat16 activations" in proc.stdout and peak > 0
    assert result["rows"][0]["mfu"] == pytest.approx(result["rows"][0]["gflops"] * 1e9 / peak)  # against bf16's peak


def test_train_step_and_moe_layer_benchmarks_compare_precisions_turn_by_turn(tmp_path, entry_point):
    out = tmp_path / "step.json"
    proc = entry_point("bench.py", "train-step", "--config", "tiny", "--iters", "2", "--precision", "fp32,bf16",
                       "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["precision"], r["dtype"]) for r in rows] == [("fp32", "float32"), ("bf16", "bfloat16")]
    for r in rows:  # each against its own precision's peak
        assert r["mfu"] == pytest.approx(r["achieved_gflops"] / r["peak_gflops"])
    assert rows[1]["speedup"] == pytest.approx(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"])
    proc = entry_point("bench.py", "moe-layer", "--config", "tiny", "--iters", "2", "--tokens", "128", "--impls",
                       "auto,loop", "--precision", "fp32,bf16", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result["ratio_to_floor"]) == {"fp32", "bf16"}
    assert {(r["precision"], r["name"]) for r in result["rows"]} == {
        (p, n) for p in ("fp32", "bf16") for n in ("moe[auto]", "moe[loop]", "floor")}
    bad = entry_point("bench.py", "train-step", "--precision", "fp16")
    assert bad.returncode == 2 and "unknown precision 'fp16'" in bad.stderr


# ---- CUDA (skipped without a GPU; `.ci/gpu` runs them where there is one) ----------------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@requires_cuda
def test_cuda_auto_precision_is_bf16_on_ampere_and_later():
    dev = torch.device("cuda")
    expected = torch.bfloat16 if torch.cuda.get_device_capability(dev)[0] >= 8 else torch.float32
    assert hardware.resolve_precision("auto", dev) == expected == hardware.inference_dtype(None, dev)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("impl", ["auto", "split"])
def test_cuda_bf16_expert_kernels_equal_the_fp32_reference(impl):
    cfg = ModelConfig(d_model=64, d_ff=96, n_experts=8, top_k=2, expert_impl=impl)
    layer = MoE(cfg).cuda()
    x = torch.randn(300, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x).y
    y_ref = moe_reference(x, route(layer.router_logits(x), cfg.top_k), layer.experts)
    torch.testing.assert_close(y, y_ref, **BF16_TOLERANCE)
    g, g_ref = (torch.autograd.grad(out.square().sum(), layer.experts.w1)[0] for out in (y, y_ref))
    torch.testing.assert_close(g / g_ref.abs().max(), g_ref / g_ref.abs().max(), **BF16_TOLERANCE)


@pytest.mark.cuda
@requires_cuda
def test_cuda_training_runs_in_bf16_and_generates(cache_dir, tmp_path):
    summary = Trainer(tiny(cache_dir, "train.max_steps=4"),
                      RunOptions(tmp_path, torch.device("cuda"), peak_flops=1e14, quiet=True)).train()
    assert summary["precision"] == "bf16" and summary["val_loss"] < 10
    model, _ = ckpt.load_for_inference(tmp_path, "cuda", torch.bfloat16)
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    assert list(generate(model, [1, 2, 3], greedy)) == generate_uncached(model, [1, 2, 3], greedy)


def test_the_cpu_peak_probe_shrinks_for_a_dtype_the_cpu_emulates(monkeypatch):
    """A 2048 product reaches a CPU's peak, but in an emulated dtype (bf16 on AVX2: ~1.4 GFLOP/s) one
    call takes seconds: a first 512 product sizes the probe to PROBE_CALL_S a call."""
    sizes = []

    def rate(dev, n, iters, dtype):
        sizes.append(n)
        return {torch.float32: 200e9, torch.bfloat16: 1.4e9}[dtype]

    monkeypatch.setattr(hardware, "_matmul_rate", rate)
    assert hardware.matmul_peak(CPU, dtype=torch.float32) == 200e9 and sizes == [512, 2048]  # fast: full size
    sizes.clear()
    hardware.matmul_peak(CPU, dtype=torch.bfloat16)
    n = sizes[1]
    assert sizes[0] == 512 and 2 * n**3 / 1.4e9 <= hardware.PROBE_CALL_S < 2 * (n + 1) ** 3 / 1.4e9
    sizes.clear()
    hardware.matmul_peak(CPU, n=64, dtype=torch.bfloat16)  # a size asked for is taken as it is
    assert sizes == [64]

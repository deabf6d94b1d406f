"""The entry points: thin scripts, clear one-line errors, JSON results."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_moe_layer_writes_json_with_the_ratio_to_floor(tmp_path, entry_point):
    out = tmp_path / "layer.json"
    proc = entry_point("bench.py", "moe-layer", "--config", "tiny", "--tokens", "128", "--iters", "1", "--impls",
                       "auto,loop", "--precision", "fp32", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["ratio_to_floor"]["fp32"] > 0 and result["impl"] == {"fp32": "split"}
    assert [r["name"] for r in result["rows"]] == ["moe[auto]", "moe[loop]", "floor"]
    assert "ratio_to_floor" in proc.stdout


def test_bench_train_step_reports_tokens_per_second(tmp_path, entry_point):
    out = tmp_path / "step.json"
    proc = entry_point("bench.py", "train-step", "--config", "tiny", "--batch-size", "2", "--seq-len", "16", "--iters",
                       "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["tokens_per_s"] > 0


@pytest.mark.parametrize("args, message", [
    (["train.py", "--model.n_layer=3"], "unknown key model.n_layer; did you mean model.n_layers?"),
    (["train.py", "--model.n_layers", "x"], "model.n_layers='x': expected int"),
    (["train.py", "--train.lr=-1"], "train.lr=-1.0: must be >= 0"),
    (["train.py", "--train.batch_size_start=16"], "train.batch_size_start=16 exceeds train.batch_size=8"),
    (["train.py", "--resume", "--init-from", "x"], "--resume and --init-from exclude each other"),
    (["train.py", "--config", "missing.toml"], "config 'missing.toml' not found"),
    (["bench.py", "moe-layer", "--device", "tpu"], "unknown device 'tpu'"),
    (["bench.py", "moe-layer", "--impls", "fast"], "unknown implementation 'fast'"),
    (["bench.py", "moe-layer", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["bench.py", "decode", "--batch-sizes", "1,0"], "'0': must be >= 1"),
    (["bench.py", "decode", "--config", "tiny"], "prompt 128 + 32 new tokens exceed model.max_seq_len=64"),
    (["bench.py", "experts", "--config", "dense_small"], "a dense model (model.n_experts=1) has no experts"),
    (["bench.py", "costmodel", "--hardware", "tpu"], "invalid choice: 'tpu'"),
])
def test_bad_input_is_one_clear_line_without_traceback(args, message, tmp_path, entry_point):
    if args[0] == "train.py":
        args = [*args, "--out", str(tmp_path / "run")]
    proc = entry_point(*args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["decode", "batching"])
def test_inference_benchmarks_run_on_random_weights(command, tmp_path, entry_point):
    out = tmp_path / "result.json"
    extra = ["--new-tokens", "8", "--batch-sizes", "1,2", "--prompt-lens", "8"] if command == "decode" \
        else ["--requests", "6", "--slots", "2", "--compile"]
    proc = entry_point("bench.py", command, "--config", "tiny", *extra, "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    if command == "decode":
        assert all(r["decode_tokens_per_s"] > 0 for r in result["rows"])
        assert result["kv_cache_bytes_full_context"]["mha"] == 4 * result["kv_cache_bytes_full_context"]["mqa"]
    else:
        assert [r["mode"] for r in result["rows"]] == ["static", "continuous", "continuous, compiled"]
        assert result["same_tokens"] and result["build_s"] > 0

"""Training under torchrun on the CPU: 2 processes over gloo, each test spawning its own."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe import checkpoint as ckpt

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # one thread a process: 2 cores


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def flags(cache_dir, steps):
    return ["--config", "tiny", "--data.sources={docs=1}", f"--data.cache_dir={cache_dir}", f"--train.max_steps={steps}",
            "--train.batch_size=4", "--train.batch_size_start=4", "--train.micro_batch_size=2", "--train.log_every=1",
            "--train.eval_every=3", "--train.ckpt_every=3", "--train.sample_tokens=0", "--peak-flops=1e11", "--quiet",
            "--train.precision=fp32"]  # exact agreement with one process to 1e-5 is an fp32 property


def train(*args, procs=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)] if procs > 1 else [sys.executable]
    proc = subprocess.run([*launcher, "train.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]


@pytest.fixture(scope="module")
def single(cache_dir, tmp_path_factory):
    """The reference: one process, 6 steps of 4 sequences."""
    run = tmp_path_factory.mktemp("single") / "run"
    train(*flags(cache_dir, 6), "--out", str(run))
    return run


def test_ddp_losses_equal_the_single_process_run(cache_dir, single, tmp_path):
    train(*flags(cache_dir, 6), "--out", str(tmp_path / "ddp"), procs=2)
    assert losses(tmp_path / "ddp") == pytest.approx(losses(single), abs=1e-5)
    assert len(losses(single)) == 6


def test_expert_parallel_layer_equals_the_whole_layer(tmp_path):
    out = tmp_path / "ep"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "ep_worker.py"), str(out)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads(Path(f"{out}.{rank}.json").read_text())
        assert result["experts_held"] == 8 and result["y_scale"] > 0.5
        for key in ("y", "x_grad", "router_grad", "w1_grad", "w2_grad", "w3_grad"):  # relative differences
            assert result[key] < 1e-6, (rank, key, result[key])


@pytest.mark.parametrize("layout", ["--train.parallel=zero1", "--train.parallel=fsdp", "--train.expert_parallel=2"])
def test_sharded_runs_train_and_round_trip_their_checkpoints(cache_dir, single, tmp_path, layout):
    run = tmp_path / "run"
    train(*flags(cache_dir, 3), layout, "--out", str(run), procs=2)
    train("--out", str(run), "--resume", "--train.max_steps=5", "--quiet", procs=2)  # resumed under torchrun
    # and in a single process (one process holds all the experts)
    train("--out", str(run), "--resume", "--train.max_steps=6", "--train.expert_parallel=1", "--quiet")
    assert losses(run) == pytest.approx(losses(single), abs=1e-5)
    model, _ = ckpt.load_for_inference(run)  # a whole checkpoint
    assert model.blocks[0].ffn.experts.w1.shape[0] == 16


def test_a_single_process_checkpoint_resumes_under_torchrun(cache_dir, tmp_path):
    run = tmp_path / "run"
    train(*flags(cache_dir, 3), "--out", str(run))
    train("--out", str(run), "--resume", "--train.max_steps=4", "--train.parallel=zero1", "--quiet", procs=2)
    assert len(losses(run)) == 4
    assert ckpt.latest_checkpoint(run).name == "step-0000004"


@pytest.mark.parametrize("args, message", [
    (["--train.expert_parallel=2"], "train.expert_parallel=2 needs that many processes: run under torchrun"),
    (["--train.expert_parallel=2", "--train.parallel=fsdp"], "combines with train.parallel='ddp' only"),
    (["--train.parallel=zero2"], "train.parallel='zero2'"),
])
def test_bad_distributed_settings_are_one_line(cache_dir, tmp_path, args, message):
    proc = subprocess.run([sys.executable, "train.py", *flags(cache_dir, 1), *args, "--out", str(tmp_path / "x")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr

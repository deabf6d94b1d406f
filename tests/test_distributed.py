"""Training under torchrun on the CPU: 2 processes over gloo, each test spawning its own."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moe import checkpoint as ckpt
from moe.config import ConfigError, load_config

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
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else [sys.executable]
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
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
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


# ---- tensor and pipeline parallelism (one DeviceMesh of dp x pp x tp) ----------------------------

PIPELINE = ["--train.pp=2", "--train.micro_batch_size=4", "--train.pp_microbatches=2"]  # micro-batches of 2, as `single`'s


def test_tensor_parallel_losses_and_drops_equal_the_single_process_run(cache_dir, tmp_path):
    capacity = ["--model.dispatch=capacity", "--model.capacity_factor=1.0"]  # dropless: the tp x pp tests below
    train(*flags(cache_dir, 5), *capacity, "--out", str(tmp_path / "one"))
    train(*flags(cache_dir, 5), *capacity, "--train.tp=2", "--out", str(tmp_path / "tp"), procs=2)
    records = [[r for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
                if r["type"] == "train"] for run in ("one", "tp")]
    assert [r["dropped"] for r in records[1]] == [r["dropped"] for r in records[0]]
    assert sum(map(sum, (r["dropped"] for r in records[0]))) > 0
    assert losses(tmp_path / "tp") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)


@pytest.fixture(scope="module")
def single4(cache_dir, tmp_path_factory):
    """The reference for 4-layer pipelines: one process, 5 steps."""
    run = tmp_path_factory.mktemp("single4") / "run"
    train(*flags(cache_dir, 5), "--model.n_layers=4", "--out", str(run))
    return run


@pytest.mark.parametrize("layout", [
    ["--train.pp_schedule=gpipe"],
    ["--train.pp_schedule=1f1b", "--model.n_layers=4", "--train.pp_first_stage_layers=1"],  # 1 + 3 blocks
    ["--train.pp_schedule=interleaved", "--model.n_layers=4"],  # 2 stages a rank: blocks 0, 2 | 1, 3
], ids=["gpipe", "1f1b-uneven", "interleaved"])
def test_pipeline_losses_equal_the_single_process_run(cache_dir, single, single4, tmp_path, layout):
    train(*flags(cache_dir, 5), *PIPELINE, *layout, "--out", str(tmp_path / "pp"), procs=2)
    reference = single4 if "--model.n_layers=4" in layout else single
    assert losses(tmp_path / "pp") == pytest.approx(losses(reference)[:5], abs=1e-5)


def test_zero1_over_tensor_parallel(cache_dir, single, tmp_path):
    run = tmp_path / "dp_tp"  # dp=2 (FSDP2's replicate, AdamW state sharded by MeshZero1) x tp=2
    train(*flags(cache_dir, 3), "--train.tp=2", "--train.parallel=zero1", "--out", str(run), procs=4)
    train("--out", str(run), "--resume", "--train.max_steps=5", "--quiet", procs=4)  # its AdamW state, gathered and back
    assert losses(run) == pytest.approx(losses(single)[:5], abs=1e-5)


def test_a_tp_x_pp_checkpoint_resumes_in_one_process_and_the_reverse(cache_dir, single, tmp_path):
    mesh = ["--train.tp=2", *PIPELINE]
    one = ["--train.tp=1", "--train.pp=1", "--train.micro_batch_size=2"]
    there, back = tmp_path / "there", tmp_path / "back"
    train(*flags(cache_dir, 3), *mesh, "--out", str(there), procs=4)  # tp=2 x pp=2
    train("--out", str(there), "--resume", "--train.max_steps=5", *one, "--quiet")
    shutil.copytree(ckpt.checkpoint_dir(single) / "step-0000003", ckpt.checkpoint_dir(back) / "step-0000003")
    (back / "metrics.jsonl").write_text("".join(line + "\n" for line in (single / "metrics.jsonl").read_text().splitlines()
                                                if json.loads(line).get("step", 0) <= 3))
    train("--out", str(back), "--resume", "--train.max_steps=5", *mesh, "--quiet", procs=4)
    for run in (there, back):
        assert losses(run) == pytest.approx(losses(single)[:5], abs=1e-5)
        assert ckpt.load_for_inference(run)[0].blocks[1].ffn.experts.w1.shape[0] == 16  # whole


def test_generate_under_torchrun_with_tp_equals_one_process(single):
    def generate(procs, *sampling):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else [sys.executable]
        proc = subprocess.run([*launcher, "generate.py", "--checkpoint", str(single), "--prompt", "def",
                               "--max-new-tokens", "24", *sampling], cwd=ROOT, env=ENV, capture_output=True, text=True,
                              timeout=300)
        print(proc.stderr[-2000:])  # shown if the comparison fails
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    text = generate(1, "--temperature", "0")
    assert len(text) > 10 and generate(2, "--temperature", "0") == text


EXIT_SCRIPT = """
import atexit, torch, torch.distributed as dist
from moe.cli import run
def main(argv):
    if argv[0] == "gloo":
        dist.init_process_group("gloo", init_method=f"file://{argv[1]}", rank=0, world_size=1)
        dist.all_reduce(torch.ones(2))
    atexit.register(print, " finalized")
    print("written", end="")  # a pipe's buffer, flushed on the way out
    return 3
run(main)
"""


@pytest.mark.parametrize("group", ["gloo", "none"])
def test_a_process_in_a_gloo_group_exits_without_finalizing_python(group, tmp_path):
    """cli.leave: gloo's threads may still need Python after the last collective, so such a process
    leaves at once, its output flushed and its exit code kept; any other finalizes as usual."""
    proc = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, group, str(tmp_path / "store")], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stdout == ("written" if group == "gloo" else "written finalized\n")


@pytest.mark.parametrize("overrides, message", [
    (["train.tp=3"], "train.tp=3 does not divide model.n_heads=4"),
    (["train.tp=2", "model.d_ff=63"], "train.tp=2 does not divide model.d_ff=63"),
    (["train.tp=4", "model.n_kv_heads=2"], "train.tp=4 does not divide model.n_kv_heads=2"),
    (["train.pp=3", "train.pp_microbatches=4"], "train.pp=3 makes 3 pipeline stages (schedule 1f1b) for model.n_layers=2"),
    (["train.pp=2", "train.pp_microbatches=1"], "train.pp_schedule='1f1b' needs train.pp_microbatches >= train.pp=2"),
    (["train.pp=2", "train.pp_microbatches=2", "train.pp_first_stage_layers=2"],
     "train.pp_first_stage_layers=2 leaves fewer than one layer for each of the other 1 stages"),
    (["train.pp=2", "train.pp_microbatches=3"], "train.pp_microbatches=3 does not divide train.micro_batch_size=8"),
    (["train.tp=2", "train.expert_parallel=2"], "train.expert_parallel=2 combines with data parallelism only"),
])
def test_bad_layouts_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny", overrides)


def test_a_layout_that_does_not_divide_the_processes_is_one_line(cache_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3",
                           "train.py", *flags(cache_dir, 1), "--train.tp=2", "--out", str(tmp_path / "x")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    # every rank says it on one line (they may interleave), none with a traceback of ours; torchrun reports after
    assert proc.returncode != 0 and proc.stderr.count("error: train.tp=2 x train.pp=1 = 2 does not divide the 3 processes") == 3
    assert f'File "{ROOT / "moe"}' not in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--train.tp=2"], "train.tp=2 needs that many processes: run under torchrun --nproc_per_node 2"),
    (["--train.expert_parallel=2"], "train.expert_parallel=2 needs that many processes: run under torchrun"),
    (["--train.expert_parallel=2", "--train.parallel=fsdp"], "combines with train.parallel='ddp' only"),
    (["--train.parallel=zero2"], "train.parallel='zero2'"),
])
def test_bad_distributed_settings_are_one_line(cache_dir, tmp_path, args, message, entry_point):
    proc = entry_point("train.py", *flags(cache_dir, 1), *args, "--out", tmp_path / "x")
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr

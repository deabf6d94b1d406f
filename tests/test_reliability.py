"""Faults and bad input: kills at any moment, full disks, corrupt checkpoints, NaNs, typos.
Nothing is lost, and every failure is one clear line."""

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe import checkpoint as ckpt
from moe import load_config
from moe.train.trainer import RunOptions, Trainer

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def cli(out, cache_dir, *extra):
    return [sys.executable, str(ROOT / "train.py"), "--config", "tiny", "--out", str(out), "--quiet",
            f"--data.cache_dir={cache_dir}", "--data.sources={docs = 1}", "--train.max_steps=30",
            "--train.log_every=1", "--train.ckpt_every=2", "--train.eval_every=10", "--train.sample_tokens=0",
            "--model.router_jitter=0.1", "--peak-flops=1e11", *extra]


def loadable(folder: Path) -> bool:
    model_cfg = ckpt.load_config_from(folder).model
    from moe import MoETransformer

    ckpt.load_weights(folder, MoETransformer(model_cfg))
    return "optimizer" in ckpt.load_trainer_state(folder)


def steps_logged(run: Path) -> set[int]:
    try:
        return {json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if '"type": "train"' in line}
    except (FileNotFoundError, json.JSONDecodeError):  # not there yet, or a line half-written
        return set()


def test_sigkill_at_random_moments_loses_nothing(cache_dir, tmp_path):
    """Killed again and again (once halfway through writing a checkpoint), resumed each time, the
    run ends with the uninterrupted run's weights, bit for bit."""
    subprocess.run(cli(tmp_path / "whole", cache_dir), check=True, capture_output=True, env=ENV, timeout=300)
    run, rng = tmp_path / "killed", random.Random(0)
    # SIGKILL once past these steps, after a random few milliseconds more (mid-step, mid-evaluation
    # or mid-checkpoint: every other step writes one); None: the process kills itself inside
    # step 12's checkpoint write.
    for target in (5, None, 17, 23, 28):
        resume = ["--resume"] if ckpt.list_checkpoints(run) else []
        env = {**ENV, ckpt.CRASH_ENV: "12"} if target is None else ENV
        proc = subprocess.Popen(cli(run, cache_dir, *resume), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while target is not None and proc.poll() is None and max(steps_logged(run), default=0) < target:
            assert time.time() < deadline
            time.sleep(0.005)
        if target is not None:
            time.sleep(rng.uniform(0, 0.05))
            proc.kill()
        assert proc.wait(timeout=120) == -signal.SIGKILL
        newest = ckpt.latest_checkpoint(run, warn=lambda _: None)
        assert newest is not None and loadable(newest)  # whatever resume would pick, it can load
        if target is None:
            assert newest.name == "step-0000010" and not (run / "checkpoints" / "step-0000012").exists()
    subprocess.run(cli(run, cache_dir, "--resume"), check=True, capture_output=True, env=ENV, timeout=300)
    final = "checkpoints/step-0000030/model.safetensors"
    whole, resumed = load_file(tmp_path / "whole" / final), load_file(run / final)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def tiny(cache_dir, *overrides):
    return load_config("tiny", [f"data.cache_dir={json.dumps(cache_dir)}", "data.sources={docs = 1}",
                                "train.sample_tokens=0", "train.eval_every=100", *overrides])


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_full_disk_stops_the_run_and_keeps_the_last_checkpoint(cache_dir, tmp_path, monkeypatch):
    trainer = Trainer(tiny(cache_dir, "train.max_steps=6", "train.ckpt_every=3"),
                      RunOptions(tmp_path, torch.device("cpu"), peak_flops=1e11, quiet=True))
    real = ckpt.save_model

    def full_disk(model, path):
        if "0000006" in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(model, path)

    monkeypatch.setattr(ckpt, "save_model", full_disk)
    with pytest.raises(ckpt.CheckpointError) as error:
        trainer.train()
    good = tmp_path / "checkpoints" / "step-0000003"
    assert str(error.value) == (f"could not write checkpoint {tmp_path / 'checkpoints' / 'step-0000006'} "
                                f"(No space left on device); the last good one, {good}, is intact")
    assert ckpt.verify(good) is None and loadable(good)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000003"]  # no half-written folder


def test_a_corrupt_checkpoint_is_reported_and_skipped_on_resume(cache_dir, tmp_path):
    subprocess.run(cli(tmp_path, cache_dir, "--train.max_steps=4", "--train.keep_checkpoints=2"), check=True,
                   capture_output=True, env=ENV, timeout=300)
    newest = tmp_path / "checkpoints" / "step-0000004" / "trainer.pt"
    newest.write_bytes(newest.read_bytes()[:-1] + b"x")  # same size, one byte flipped
    proc = subprocess.run(cli(tmp_path, cache_dir, "--train.max_steps=5", "--resume"), capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "step-0000004: trainer.pt checksum mismatch" in proc.stdout + proc.stderr
    assert "resuming from" in proc.stdout and "step-0000002" in proc.stdout


def nan_at(trainer, steps: set[int]):
    """Make the loss non-finite at the given (1-based) steps, as a bad batch or an overflow would."""
    forward = trainer.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        return out._replace(loss=out.loss * float("nan")) if trainer.step + 1 in steps else out

    trainer.forward = poisoned


def test_non_finite_steps_are_skipped_then_rolled_back(cache_dir, tmp_path):
    trainer = Trainer(tiny(cache_dir, "train.max_steps=12", "train.ckpt_every=4", "train.max_bad_steps=3"),
                      RunOptions(tmp_path, torch.device("cpu"), peak_flops=1e11, quiet=True))
    nan_at(trainer, {2, 6, 7, 8})
    weights = lambda: {k: v.clone() for k, v in trainer.model.state_dict().items()}  # noqa: E731
    trainer.train_step()
    before = weights()
    record = trainer.train_step()  # step 2: skipped
    assert not record["finite"] and record["skipped_steps"] == 1
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    for _ in range(2):
        trainer.train_step()
    trainer.save()  # step 4, the last good checkpoint
    at_4 = weights()
    trainer.train_step()  # 5: fine, the weights move on
    for _ in range(3):  # 6, 7, 8: three in a row -> back to step 4's weights
        record = trainer.train_step()
    assert record["skipped_steps"] == 4 and record["rollbacks"] == 1
    assert all(torch.equal(at_4[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.step == 8 and trainer.sequences_drawn == 8 * trainer.cfg.batch_size_start  # bad data not redrawn
    summary = trainer.train()  # and on to the end, finite
    assert summary["steps"] == 12 and summary["skipped_steps"] == 4 and summary["rollbacks"] == 1
    assert torch.isfinite(torch.tensor(summary["val_loss"]))
    rollbacks = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"rollback"' in l]
    assert rollbacks == [{"type": "rollback", "step": 8, "to": "step-0000004", "skipped_steps": 4}]


def test_non_finite_steps_with_no_checkpoint_stop_clearly(cache_dir, tmp_path):
    trainer = Trainer(tiny(cache_dir, "train.max_steps=5", "train.max_bad_steps=2"),
                      RunOptions(tmp_path, torch.device("cpu"), peak_flops=1e11, quiet=True))
    nan_at(trainer, {1, 2})
    trainer.train_step()
    with pytest.raises(Exception, match="2 steps in a row with a non-finite loss or gradient .* no checkpoint"):
        trainer.train_step()


@pytest.fixture(scope="module")
def run_dir(cache_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "run"
    subprocess.run(cli(run, cache_dir, "--train.max_steps=2", "--model.router_jitter=0"), check=True,
                   capture_output=True, env=ENV, timeout=300)
    return run


def bad_inputs(run, cache_dir, tmp):
    empty, latin1, image = tmp / "empty.txt", tmp / "latin1.txt", tmp / "not_an_image.png"
    empty.write_text("")
    latin1.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    image.write_text("not a picture")
    train = cli(tmp / "new", cache_dir)[1:]
    return [
        (train + ["--model.n_layer=3"], "unknown key model.n_layer; did you mean model.n_layers?"),
        (train + ["--trian.lr=1"], "unknown section trian in --trian.lr; did you mean --train.lr?"),
        (train + ["--model.d_model=abc"], "model.d_model='abc': expected int"),
        (train + ["--model.d_model=98"], "model.d_model=98 is not divisible by model.n_heads=4"),
        (train + ["--model.n_layers=0"], "model.n_layers=0: must be a positive integer"),
        (train + ["--train.lr=-0.1"], "train.lr=-0.1: must be >= 0"),
        (train + ["--train.lr=0"], "train.lr=0.0: must be > 0"),
        (train + ["--init-from", str(run), "--model.d_model=128", "--model.n_heads=4"], "weights do not fit this model"),
        (cli(run, cache_dir, "--resume", "--model.vocab_size=600")[1:], "tokenizer has 512 tokens but model.vocab_size=600"),
        (train + [f"--data.sources={{{json.dumps(str(empty))} = 1}}"], f"data source {empty}: no text in it"),
        (train + [f"--data.sources={{{json.dumps(str(latin1))} = 1}}"], f"{latin1}: not UTF-8 text"),
        (train + ["--device", "tpu"], "unknown device 'tpu'"),
        (train + ["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["generate.py", "--checkpoint", str(run), "--prompt", "x" * 400], "leaves no room in model.max_seq_len=64"),
        (["generate.py", "--checkpoint", str(tmp / "nowhere"), "--prompt", "hi"], "no such file or directory"),
        (["generate.py", "--checkpoint", str(run), "--image", str(image), "--prompt", "hi"], "this model has no vision branch"),
        (["generate.py", "--checkpoint", str(run), "--device", "cuda:7", "--prompt", "hi"], "device 'cuda:7'"),
        (["generate.py", "--checkpoint", str(run), "--top-p", "2"], "top_p=2.0: must be in (0, 1]"),
        (["bench.py", "decode", "--batch-sizes", "0"], "'0': must be >= 1"),
        (["bench.py", "costmodel", "--hardware", "tpu"], "invalid choice: 'tpu'"),
        (["bench.py", "warp"], "invalid choice: 'warp'"),
        (["-m", "moe.hf", "import", "--hf", str(tmp / "nowhere"), "--out", str(tmp / "x")], "no config.json there"),
        (["-m", "moe.hf", "export", "--checkpoint", str(run), "--out", str(run)], "exists and is not empty"),
        (["-m", "moe.serve", "--checkpoint", str(tmp / "nowhere")], "no such file or directory"),
        (["-m", "moe.serve", "--checkpoint", str(run), "--slots", "0"], "'0': must be >= 1"),
        (["-m", "moe.plot", str(tmp / "nowhere"), "--out", str(tmp / "runs.png")], "no metrics.jsonl there"),
    ]


def test_bad_input_is_one_line_and_touches_nothing(run_dir, cache_dir, tmp_path, entry_point):
    before = digest(run_dir)
    for args, message in bad_inputs(run_dir, cache_dir, tmp_path):
        proc = entry_point(*args)
        lines = [line for line in proc.stderr.splitlines() if line.strip() and "examples/s" not in line
                 and not line.startswith("usage:") and not line.startswith(" ")]
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr[-500:])
        assert "Traceback" not in proc.stderr and len(lines) == 1, (args, proc.stderr[-800:])
    assert digest(run_dir) == before  # the run directory is exactly as it was


def test_debug_shows_the_traceback(cache_dir, tmp_path, entry_point):
    proc = entry_point(*cli(tmp_path / "x", cache_dir, "--model.d_model=98", "--debug")[1:])
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "is not divisible" in proc.stderr

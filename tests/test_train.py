"""The trainer: schedules, data cache, loss masking, checkpoints, exact resume after SIGKILL."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moe import checkpoint as ckpt
from moe.config import TrainConfig, load_config
from moe.data import corpus as data_module
from moe.data.corpus import InstructData, prepare_data
from moe.files import current_umask
from moe.tokenizer import ASSISTANT, EOT, USER
from moe.train.launch import launch
from moe.train.stopping import StopSignals
from moe.train.trainer import RunOptions, Trainer, batch_size_at, lr_at

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def tiny_config(cache_dir, *overrides):
    return load_config("tiny", [f"data.cache_dir={json.dumps(cache_dir)}", "data.sources={docs = 1}",
                                "train.sample_tokens=0", *overrides])


def test_learning_rate_warms_up_then_decays_by_cosine():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)  # half way down the cosine
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(500, cfg) == pytest.approx(1e-4)


def test_batch_size_ramps_linearly_with_tokens_seen():
    cfg = TrainConfig(batch_size=16, batch_size_start=4, ramp_tokens=1200)
    assert [batch_size_at(t, cfg) for t in (0, 100, 300, 600, 1199, 1200, 10**9)] == [4, 5, 7, 10, 15, 16, 16]
    assert batch_size_at(0, TrainConfig(batch_size=16, batch_size_start=4, ramp_tokens=0)) == 16


def test_tokenised_corpus_is_cached_and_reused(cache_dir, monkeypatch):
    cfg = tiny_config(cache_dir)
    tokenizer, first = prepare_data(cfg.data, cfg.model, seed=0)
    cached = sorted(Path(cache_dir).rglob("*.npy")) + sorted(Path(cache_dir).rglob("bpe-*.json"))
    stamps = [p.stat().st_mtime_ns for p in cached]

    def no_reading(*args):
        raise AssertionError("the corpus was read again")

    monkeypatch.setattr(data_module, "read_documents", no_reading)
    tokenizer2, second = prepare_data(cfg.data, cfg.model, seed=0)
    assert tokenizer2.to_str() == tokenizer.to_str()
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    assert torch.equal(first.batch(0, 4, 32).inputs, second.batch(0, 4, 32).inputs)


def test_a_first_run_says_what_it_is_doing_before_the_first_step(tmp_path, capsys):
    cfg = tiny_config(str(tmp_path / "fresh"), "train.max_steps=1")
    Trainer(cfg, RunOptions(tmp_path / "run", torch.device("cpu"), peak_flops=1e11))
    first = capsys.readouterr().err
    assert re.search(r"training a 512-token BPE tokenizer .*: done in \d+\.\d s", first)
    assert re.search(r"reading and tokenising source docs .*: done in \d+\.\d s", first)
    Trainer(cfg, RunOptions(tmp_path / "again", torch.device("cpu"), peak_flops=1e11))
    assert "tokenis" not in capsys.readouterr().err  # the caches answer: nothing slow to announce


def test_batches_are_packed_windows_with_shifted_targets(cache_dir):
    cfg = tiny_config(cache_dir)
    tokenizer, data = prepare_data(cfg.data, cfg.model, seed=0)
    batch = data.batch(10, 4, 48)
    assert batch.inputs.shape == batch.targets.shape == (4, 48)
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    assert torch.equal(data.batch(10, 4, 48).inputs, batch.inputs)  # stateless: same index, same data
    assert not torch.equal(data.batch(14, 4, 48).inputs, batch.inputs)
    assert (data.batch(0, 64, 48).inputs == tokenizer.token_to_id(EOT)).any()  # documents are separated
    assert 2.0 < data.bytes_per_token < 8.0


def test_instruction_loss_is_masked_to_the_response(cache_dir, tmp_path):
    cfg = tiny_config(cache_dir)
    tokenizer, _ = prepare_data(cfg.data, cfg.model, seed=0)
    file = tmp_path / "chat.jsonl"
    file.write_text('{"prompt": "add 2 and 3", "response": "5"}\n{"prompt": "hi", "response": "hello"}\n')
    data = InstructData(file, tokenizer, val_fraction=0.1)
    inputs, targets = data.example_tensors("add 2 and 3", "5", seq_len=32)
    prompt_ids, response_ids = tokenizer.encode("add 2 and 3").ids, tokenizer.encode("5").ids
    head = [tokenizer.token_to_id(USER), *prompt_ids, tokenizer.token_to_id(ASSISTANT)]
    expected = [-100] * (len(head) - 1) + response_ids + [tokenizer.token_to_id(EOT)]
    expected += [-100] * (32 - len(expected))
    assert targets.tolist() == expected
    assert inputs[: len(head)].tolist() == head


def test_bad_instruction_file_is_a_clear_error(cache_dir, tmp_path):
    cfg = tiny_config(cache_dir)
    tokenizer, _ = prepare_data(cfg.data, cfg.model, seed=0)
    file = tmp_path / "bad.jsonl"
    file.write_text('{"prompt": "a", "response": "b"}\n{"question": "c"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object with \"prompt\" and \"response\""):
        InstructData(file, tokenizer, val_fraction=0.1)


def test_training_lowers_the_validation_loss(cache_dir, tmp_path):
    cfg = tiny_config(cache_dir, "train.max_steps=40", "train.eval_every=40", "train.ckpt_every=40")
    trainer = Trainer(cfg, RunOptions(tmp_path / "run", torch.device("cpu"), peak_flops=1e11, quiet=True))
    before = trainer.evaluate()["val_loss"]
    summary = trainer.train()
    assert summary["val_loss"] < before - 0.5
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_logs = [r for r in records if r["type"] == "train"]
    assert train_logs[-1]["step"] == 40 and 0 < train_logs[-1]["mfu"]
    for r in train_logs:  # the loss and its parts are averaged over the same steps
        parts = r["ce_loss"] + cfg.model.aux_loss_coef * r["balance_loss"] + cfg.model.z_loss_coef * r["z_loss"]
        assert r["loss"] == pytest.approx(parts, rel=1e-6)
    assert len(train_logs[-1]["expert_share"]) == cfg.model.n_layers
    assert sum(train_logs[-1]["expert_share"][0]) == pytest.approx(1.0, abs=1e-3)
    assert ckpt.list_checkpoints(tmp_path / "run")[-1].name == "step-0000040"


def test_mfu_never_exceeds_one_even_against_a_peak_probed_on_a_busy_machine(cache_dir, tmp_path):
    cfg = tiny_config(cache_dir, "train.max_steps=4", "train.log_every=2")
    summary = Trainer(cfg, RunOptions(tmp_path / "run", torch.device("cpu"), peak_flops=1e3, quiet=True)).train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mfus = [r["mfu"] for r in records if r["type"] in ("train", "summary")]
    assert len(mfus) == 3 and all(0 < m <= 1 for m in mfus)
    assert summary["peak_flops"] > 1e6  # probed again: far above the 1 kFLOP/s it was told


def test_instruction_fine_tuning_from_a_checkpoint(cache_dir, tmp_path):
    base = tiny_config(cache_dir, "train.max_steps=5")
    Trainer(base, RunOptions(tmp_path / "base", torch.device("cpu"), peak_flops=1e11, quiet=True)).train()
    source = ckpt.resolve_checkpoint(tmp_path / "base")
    chat = tiny_config(cache_dir, "train.max_steps=5", f"data.instruct={json.dumps(str(ROOT / 'data/instruct_example.jsonl'))}")
    trainer = Trainer(chat, RunOptions(tmp_path / "chat", torch.device("cpu"), init_from=source, peak_flops=1e11, quiet=True))
    assert trainer.step == 0  # a new run: weights only
    assert trainer.train()["val_loss"] > 0


def test_longer_context_starts_from_the_short_model(cache_dir, tmp_path):
    base = tiny_config(cache_dir, "train.max_steps=5")
    Trainer(base, RunOptions(tmp_path / "short", torch.device("cpu"), peak_flops=1e11, quiet=True)).train()
    long = tiny_config(cache_dir, "train.max_steps=3", "model.max_seq_len=128", "model.rope_scale=2.0")
    source = ckpt.resolve_checkpoint(tmp_path / "short")
    trainer = Trainer(long, RunOptions(tmp_path / "long", torch.device("cpu"), init_from=source, peak_flops=1e11, quiet=True))
    assert trainer.data.batch(0, 2, 128).inputs.shape == (2, 128)
    assert trainer.train()["steps"] == 3
    wider = tiny_config(cache_dir, "model.d_model=128")
    with pytest.raises(ckpt.CheckpointError, match="weights do not fit this model"):
        Trainer(wider, RunOptions(tmp_path / "wide", torch.device("cpu"), init_from=source, peak_flops=1e11, quiet=True))


def test_truncated_checkpoint_is_detected_and_the_previous_one_used(cache_dir, tmp_path):
    cfg = tiny_config(cache_dir, "train.max_steps=10", "train.ckpt_every=5", "train.keep_checkpoints=3")
    Trainer(cfg, RunOptions(tmp_path, torch.device("cpu"), peak_flops=1e11, quiet=True)).train()
    older, newest = ckpt.list_checkpoints(tmp_path)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    warnings = []
    assert ckpt.latest_checkpoint(tmp_path, warn=warnings.append) == older
    assert "model.safetensors has 1000 bytes" in warnings[0]
    (older / "trainer.pt").write_bytes(b"garbage")
    assert ckpt.latest_checkpoint(tmp_path, warn=warnings.append) is None
    assert "trainer.pt" in warnings[-1]


def test_checkpoint_files_get_the_mode_every_other_file_gets(cache_dir, tmp_path):
    cfg = tiny_config(cache_dir, "train.max_steps=1")
    Trainer(cfg, RunOptions(tmp_path / "run", torch.device("cpu"), peak_flops=1e11, quiet=True)).train()
    folder = ckpt.list_checkpoints(tmp_path / "run")[-1]
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == \
        {name: 0o666 & ~current_umask() for name in (*ckpt.FILES, "manifest.json")}


def test_only_the_last_n_checkpoints_are_kept(cache_dir, tmp_path):
    cfg = tiny_config(cache_dir, "train.max_steps=8", "train.ckpt_every=2", "train.keep_checkpoints=2")
    Trainer(cfg, RunOptions(tmp_path, torch.device("cpu"), peak_flops=1e11, quiet=True)).train()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-0000006", "step-0000008"]
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))


def train_cli(out, cache_dir, *extra):
    return [sys.executable, str(ROOT / "train.py"), "--config", "tiny", "--out", str(out), "--quiet",
            f"--data.cache_dir={cache_dir}", "--data.sources={docs = 1}", "--train.max_steps=40",
            "--train.log_every=1", "--train.ckpt_every=5", "--train.eval_every=20", "--train.sample_tokens=0",
            "--model.router_jitter=0.1", "--peak-flops=1e11", *extra]


def losses_by_step(run_dir):
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["type"] == "train":
            losses[record["step"]] = record["loss"]  # a resumed run logs some steps again: keep the last
    return losses


@pytest.fixture(scope="module")
def whole_run(cache_dir, tmp_path_factory):
    """The 40 steps of `train_cli`, never interrupted: what stopped and resumed runs must equal."""
    run = tmp_path_factory.mktemp("whole") / "run"
    subprocess.run(train_cli(run, cache_dir), check=True, capture_output=True, timeout=300)
    return run


@pytest.fixture(scope="module")
def whole_run_bf16(cache_dir, tmp_path_factory):
    """The same in bf16 (whatever `auto` picks on this machine)."""
    run = tmp_path_factory.mktemp("whole_bf16") / "run"
    subprocess.run(train_cli(run, cache_dir, "--train.precision=bf16"), check=True, capture_output=True, timeout=300)
    return run


def kill_and_resume(cache_dir, run, *extra):
    """Train, SIGKILL the run at step 17 or later, resume it: its losses by step."""
    proc = subprocess.Popen(train_cli(run, cache_dir, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and 17 not in _steps_so_far(run):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 17 in _steps_so_far(run) and 40 not in _steps_so_far(run)
    resumed = subprocess.run(train_cli(run, cache_dir, *extra, "--resume"), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    return losses_by_step(run)


def test_kill_and_resume_is_bit_identical(cache_dir, whole_run, tmp_path):
    whole, after_kill = losses_by_step(whole_run), kill_and_resume(cache_dir, tmp_path / "killed")
    assert sorted(whole) == sorted(after_kill) == list(range(1, 41))
    assert all(whole[s] == after_kill[s] for s in whole)  # bit for bit, every step


def test_kill_and_resume_is_bit_identical_in_bf16(cache_dir, whole_run_bf16, tmp_path):
    whole = losses_by_step(whole_run_bf16)
    after_kill = kill_and_resume(cache_dir, tmp_path / "killed", "--train.precision=bf16")
    assert sorted(whole) == sorted(after_kill) == list(range(1, 41))
    assert all(whole[s] == after_kill[s] for s in whole)  # bit for bit in bf16 too
    assert '"precision": "bf16"' in (tmp_path / "killed" / "metrics.jsonl").read_text()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_is_bit_identical(cache_dir, whole_run,
                                                                                      tmp_path, signum):
    run = tmp_path / "stopped"
    no_periodic = "--train.ckpt_every=1000"  # so the only checkpoint before the end is the one the signal asks for
    proc = subprocess.Popen(train_cli(run, cache_dir, no_periodic), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and 12 not in _steps_so_far(run):
        time.sleep(0.02)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    stopped_at = max(_steps_so_far(run))
    assert proc.returncode == 128 + signum, stderr
    assert [p.name for p in ckpt.list_checkpoints(run)] == [f"step-{stopped_at:07d}"] and stopped_at < 40
    assert f"stopped by {signal.Signals(signum).name} after step {stopped_at}" in stderr and "--resume" in stderr
    resumed = subprocess.run(train_cli(run, cache_dir, no_periodic, "--resume"), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    whole, after = losses_by_step(whole_run), losses_by_step(run)
    assert sorted(after) == list(range(1, 41)) and all(whole[s] == after[s] for s in whole)


def test_a_second_signal_stops_at_once():
    # Python's own SIGINT handler, as an interactive run has it (a shell's background job starts
    # with SIGINT ignored, and then a second Ctrl-C is rightly ignored too)
    outside = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopSignals() as stop:
            stop.handle(signal.SIGINT, None)  # the first: noted, nothing else
            assert stop.received == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):  # the second: Python's own handler again, at once
                stop.handle(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outside)


def _steps_so_far(run_dir):
    try:
        return losses_by_step(run_dir)
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or a line half-written
        return {}


def test_resuming_a_finished_run_says_so_and_writes_nothing(cache_dir, tmp_path, capsys):
    overrides = [f"data.cache_dir={json.dumps(cache_dir)}", "data.sources={docs = 1}", "train.sample_tokens=0",
                 "train.max_steps=3"]
    run = tmp_path / "run"
    launch("tiny", overrides, run, torch.device("cpu"), peak_flops=1e11, quiet=True)
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert launch("tiny", [], run, torch.device("cpu"), resume=True, peak_flops=1e11, quiet=True) is None
    assert "is finished: step 3 of train.max_steps=3; nothing to do" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files


def test_a_run_directory_is_never_overwritten(cache_dir, tmp_path, entry_point):
    cfg = tiny_config(cache_dir, "train.max_steps=2")
    Trainer(cfg, RunOptions(tmp_path, torch.device("cpu"), peak_flops=1e11, quiet=True)).train()
    proc = entry_point(*train_cli(tmp_path, cache_dir)[1:])
    assert proc.returncode == 2 and "already holds checkpoints: pass --resume" in proc.stderr


@pytest.mark.parametrize("extra, message", [
    (["--resume"], "--resume: no usable checkpoint in"),
    (["--init-from", "/nonexistent/run"], "checkpoint /nonexistent/run: no such file or directory"),
    (["--data.sources={\"/no/such/file.txt\" = 1}"], "data source /no/such/file.txt: no such file or directory"),
])
def test_train_cli_errors_are_one_clear_line(cache_dir, tmp_path, extra, message, entry_point):
    proc = entry_point(*train_cli(tmp_path / "run", cache_dir, *extra)[1:])
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_local_text_jsonl_and_parquet_sources_are_read_with_datasets(tmp_path):
    import datasets

    rows = ["first document", "second document\nwith two lines"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": r}) + "\n" for r in rows))
    datasets.Dataset.from_dict({"body": rows}).to_parquet(str(tmp_path / "b.parquet"))
    (tmp_path / "c.txt").write_text(rows[1])
    assert data_module.read_documents(str(tmp_path / "a.jsonl"), text_field="body") == rows
    assert data_module.read_documents(str(tmp_path / "b.parquet"), text_field="body") == rows
    assert data_module.read_documents(str(tmp_path / "c.txt")) == [rows[1]]  # a whole file is one document
    assert len(data_module.read_documents(str(tmp_path), text_field="body")) == 5  # a directory: all of them
    with pytest.raises(ValueError, match=r"a.jsonl: no column 'text' \(columns: body\); set data.text_field"):
        data_module.read_documents(str(tmp_path / "a.jsonl"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt: no text in it"):
        data_module.read_documents(str(tmp_path / "empty.txt"))

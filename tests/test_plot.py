"""Runs you can look at: `python -m moe.plot` and TensorBoard logging beside metrics.jsonl."""

import json
import threading

import pytest
import torch
from PIL import Image

from moe import load_config
from moe.plot import plot_runs
from moe.train.trainer import RunOptions, Trainer


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("logged")
    cfg = load_config("tiny", [f"data.cache_dir={json.dumps(str(out / 'cache'))}", "data.sources={docs = 1}",
                               "train.max_steps=4", "train.log_every=1", "train.eval_every=2", "train.eval_batches=1",
                               "train.sample_tokens=0", "train.tensorboard=true"])
    before = set(threading.enumerate())
    with Trainer(cfg, RunOptions(out / "run", torch.device("cpu"), peak_flops=1e11, quiet=True)) as trainer:
        trainer.train()
    started = [t for t in set(threading.enumerate()) - before if t.name != "tqdm_monitor"]  # tqdm's is global
    assert trainer.metrics_file.closed and not started  # no file, nor the TensorBoard writer's thread, left open
    return out / "run"


def test_the_plot_has_loss_schedule_speed_and_each_layers_expert_share_per_run(logged_run, tmp_path):
    pytest.importorskip("matplotlib")
    other = tmp_path / "other"  # a second run to overlay: the same metrics under another name
    other.mkdir()
    (other / "metrics.jsonl").write_text((logged_run / "metrics.jsonl").read_text())
    titles = plot_runs([logged_run, other], tmp_path / "runs.png")
    assert titles == ["loss", "learning rate (solid) and batch size (dashed)", "tokens/s (solid) and MFU (dotted)",
                      "run: MoE layer 0 expert share", "run: MoE layer 1 expert share",
                      "other: MoE layer 0 expert share", "other: MoE layer 1 expert share"]
    assert Image.open(tmp_path / "runs.png").size == (3 * 540, 3 * 432)  # 3 columns; a top row and a row a run


def test_tensorboard_logs_what_metrics_jsonl_does(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logged_run / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/val_loss", "experts/load_cv_layer_1"} <= tags
    logged = [json.loads(line) for line in (logged_run / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in logged if r["type"] == "train"}
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(losses)

"""One training run from the command line's choices: a new run, `--resume` of a killed one, or
`--init-from` another's weights; under torchrun, one rank of many. What `train.py` calls."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..config import load_config
from ..model import describe
from . import distributed
from .trainer import RunOptions, Trainer


def launch(config_name: str, overrides: list[str], out: Path, device: torch.device, resume: bool = False,
           init_from: str | None = None, compile: bool = False, peak_flops: float | None = None,
           quiet: bool = False) -> dict | None:
    """Train, print the summary, and return it (None when a resumed run was already finished:
    nothing is written then). A run directory that holds checkpoints is only ever continued
    (`resume`), never overwritten."""
    resume_from = init_folder = None
    if resume:
        resume_from = ckpt.latest_checkpoint(out)
        if resume_from is None:
            raise ckpt.CheckpointError(f"--resume: no usable checkpoint in {ckpt.checkpoint_dir(out)}")
        config = ckpt.load_config_from(resume_from, overrides)
    else:
        config = load_config(config_name, overrides)
        if ckpt.list_checkpoints(out):
            raise ckpt.CheckpointError(f"{out} already holds checkpoints: pass --resume to continue that run, "
                                       f"or choose another --out")
        init_folder = ckpt.resolve_checkpoint(init_from) if init_from else None

    world, device = distributed.init(device, config.train)
    try:
        say = print if world.is_main else (lambda *a, **k: None)  # one rank speaks for all
        layout = ""
        if world.distributed:
            cfg = config.train
            layout = f"; {world.size} processes, {cfg.parallel}"
            layout += f", experts split over {world.expert_parallel}" if world.expert_parallel > 1 else ""
            if world.mesh is not None:
                layout = (f"; {world.size} processes: {world.degree('dp')} data-parallel ({cfg.parallel}) x "
                          f"{cfg.pp} pipeline stages ({cfg.pp_schedule}, {cfg.pp_microbatches} micro-batches) x "
                          f"{cfg.tp} tensor-parallel")
        say(describe(config.model) + layout)
        options = RunOptions(out, device, resume_from, init_folder, compile, peak_flops, quiet, world)
        with Trainer(config, options) as trainer:
            say(f"precision: {trainer.precision} (train.precision={config.train.precision})")
            if resume_from and trainer.step >= config.train.max_steps:
                say(f"{out} is finished: step {trainer.step} of train.max_steps={config.train.max_steps}; nothing "
                    f"to do (pass a larger --train.max_steps to train on)")
                return None
            if resume_from:
                say(f"resuming from {resume_from} (step {trainer.step})")
            summary = trainer.train()
            if config.train.sample_tokens and world.is_main and world.whole_model and config.train.parallel != "fsdp":
                say(f"--- sample ---\n{trainer.sample(config.train.sample_tokens)}\n--------------")
        say(f"{summary['steps']} steps, {summary['tokens_seen']:,} tokens, {summary['wall_s']:.0f} s; "
            f"val loss {summary['val_loss']:.4f}, {summary['val_bpb']:.3f} bits per byte")
        if summary["skipped_steps"]:
            say(f"{summary['skipped_steps']} steps skipped for a non-finite loss or gradient, "
                f"{summary['rollbacks']} rollbacks to a checkpoint")
        if summary["tokens_per_s"]:
            say(f"{summary['tokens_per_s']:,.0f} tokens/s in {summary['precision']}, MFU {summary['mfu']:.1%} of "
                f"its peak of {summary['peak_flops'] / 1e9:,.0f} GFLOP/s; checkpoints and metrics.jsonl in {out}")
        return summary
    finally:
        distributed.close()

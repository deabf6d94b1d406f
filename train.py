"""Train an MoE transformer.

With no arguments: the `small` model on the built-in corpus (Python's docs and standard
library, text 2 epochs and code 4), on the CPU, in about ten minutes, into runs/small.

Examples:
  python train.py                                         the default run
  python train.py --config tiny --train.max_steps=200     a quick one
  python train.py --out runs/small --resume               continue a killed run exactly
  python train.py --init-from runs/small --out runs/long --model.max_seq_len=512 \\
      --model.rope_scale=2 --train.max_steps=100          longer context, position interpolation
  python train.py --init-from runs/small --out runs/chat --data.instruct=data/instruct_example.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moe import checkpoint as ckpt
from moe import distributed
from moe.cli import add_config_args, describe_model, device_arg, run, split_overrides
from moe.config import load_config
from moe.trainer import RunOptions, Trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/CONFIG_NAME)")
    parser.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its newest good checkpoint (its config; overrides apply)")
    parser.add_argument("--init-from", metavar="CHECKPOINT",
                        help="start a new run from the weights of a checkpoint or run directory")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (for CUDA)")
    parser.add_argument("--peak-flops", type=float, metavar="FLOP/S",
                        help="peak FLOP/s for MFU (default: measured by a short matmul probe)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args, overrides = split_overrides(parser, argv)
    if args.resume and args.init_from:
        parser.error("--resume and --init-from exclude each other")
    out = Path(args.out or Path("runs") / Path(args.config).stem)

    resume_from = init_from = None
    if args.resume:
        resume_from = ckpt.latest_checkpoint(out)
        if resume_from is None:
            raise ckpt.CheckpointError(f"--resume: no usable checkpoint in {ckpt.checkpoint_dir(out)}")
        config = ckpt.load_config_from(resume_from, overrides)
    else:
        config = load_config(args.config, overrides)
        if ckpt.list_checkpoints(out):
            raise ckpt.CheckpointError(f"{out} already holds checkpoints: pass --resume to continue that run, "
                                       f"or choose another --out")
        init_from = ckpt.resolve_checkpoint(args.init_from) if args.init_from else None

    world, device = distributed.init(args.device, config.train.expert_parallel)
    try:
        say = print if world.is_main else (lambda *a, **k: None)  # one rank speaks for all
        layout = ""
        if world.distributed:
            layout = f"; {world.size} processes, {config.train.parallel}"
            layout += f", experts split over {world.expert_parallel}" if world.expert_parallel > 1 else ""
        say(describe_model(config.model) + layout)
        options = RunOptions(out, device, resume_from, init_from, args.compile, args.peak_flops, args.quiet, world)
        trainer = Trainer(config, options)
        if resume_from:
            say(f"resuming from {resume_from} (step {trainer.step})")
        summary = trainer.train()
        if config.train.sample_tokens and world.is_main:
            say(f"--- sample ---\n{trainer.sample(config.train.sample_tokens)}\n--------------")
        say(f"{summary['steps']} steps, {summary['tokens_seen']:,} tokens, {summary['wall_s']:.0f} s; "
            f"val loss {summary['val_loss']:.4f}, {summary['val_bpb']:.3f} bits per byte")
        if summary["skipped_steps"]:
            say(f"{summary['skipped_steps']} steps skipped for a non-finite loss or gradient, "
                f"{summary['rollbacks']} rollbacks to a checkpoint")
        if summary["tokens_per_s"]:
            say(f"{summary['tokens_per_s']:,.0f} tokens/s, MFU {summary['mfu']:.1%} of "
                f"{summary['peak_flops'] / 1e9:,.0f} GFLOP/s; checkpoints and metrics.jsonl in {out}")
    finally:
        distributed.close()
    return 0


if __name__ == "__main__":
    run(main)

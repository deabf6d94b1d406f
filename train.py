"""Train an MoE transformer.

With no arguments: the `small` model on the built-in corpus (Python's docs and standard
library, text 2 epochs and code 4), on the CPU, into runs/small: about ten minutes on an
idle 2-core machine, longer on a busy one.

Examples:
  python train.py                                         the default run
  python train.py --config tiny --train.max_steps=200     a quick one
  python train.py --out runs/small --resume               continue a killed run exactly
  python train.py --init-from runs/small --out runs/long --model.max_seq_len=512 \\
      --model.rope_scale=2 --train.max_steps=100          longer context, position interpolation
  python train.py --init-from runs/small --out runs/chat --data.instruct=data/instruct_example.jsonl
  OMP_NUM_THREADS=1 torchrun --nproc_per_node 4 train.py --config tiny --train.tp=2 --train.pp=2 \
      --train.micro_batch_size=4 --train.pp_microbatches=2      tensor x pipeline parallel (docs/distributed.md)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moe.cli import add_config_args, device_arg, run, split_overrides
from moe.train.launch import launch


def build_parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = split_overrides(parser, argv)
    if args.resume and args.init_from:
        parser.error("--resume and --init-from exclude each other")
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    launch(args.config, overrides, out, args.device, args.resume, args.init_from, args.compile, args.peak_flops,
           args.quiet)
    return 0


if __name__ == "__main__":
    run(main)

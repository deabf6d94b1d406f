"""Benchmarks. `python bench.py --help` lists them; each prints a table, `--json PATH` saves it."""

from __future__ import annotations

import argparse
from typing import get_args, get_type_hints

from moe import ModelConfig, benchmarks
from moe.cli import add_config_args, device_arg, parse_args, print_table, run, write_json


def impl_list(text: str) -> tuple[str, ...]:
    impls = tuple(text.split(","))
    known = get_args(get_type_hints(ModelConfig)["expert_impl"])
    for impl in impls:
        if impl not in known:
            raise argparse.ArgumentTypeError(f"unknown implementation {impl!r} (expected {', '.join(known)})")
    return impls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("moe-layer", help="one MoE layer, forward+backward, against its dense compute floor")
    p.add_argument("--tokens", type=int, default=2048, help="tokens through the layer (default 2048)")
    p.add_argument("--iters", type=int, default=30, help="timed calls of each contender, taking turns (default 30)")
    p.add_argument("--impls", type=impl_list, default="auto,grouped_mm,loop",
                   help="comma-separated expert implementations to time (auto, grouped_mm, split, loop); "
                        "the first is the one reported as ratio_to_floor (default: auto,grouped_mm,loop)")

    p2 = sub.add_parser("train-step", help="forward+backward+AdamW of the whole model: tokens/s")
    p2.add_argument("--batch-size", type=int, default=8)
    p2.add_argument("--seq-len", type=int, default=None, help="default: model.max_seq_len")
    p2.add_argument("--iters", type=int, default=10)

    for p in (p, p2):
        add_config_args(p)
        p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
        p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args, config = parse_args(parser, argv)
    device, cfg = args.device, config.model

    if args.command == "moe-layer":
        result = benchmarks.moe_layer(cfg, args.tokens, args.iters, device, args.impls)
        result["matmul_peak_gflops"] = benchmarks.matmul_peak(device) / 1e9
        shape = result["shape"]
        print(f"MoE layer fwd+bwd on {device} ({result['threads']} threads): {shape['tokens']} tokens, "
              f"D={shape['d_model']} F={shape['d_ff']} E={shape['n_experts']} k={shape['top_k']}, "
              f"{result['expert_gflop_per_step']:.2f} GFLOP of expert matmuls")
        print_table(result["rows"], [("name", "run", "s"), ("ms", "ms", ".1f"),
                                     ("gflops", "GFLOP/s", ".1f"), ("ratio_to_floor", "x floor", ".3f")])
        print(f"ratio_to_floor ({args.impls[0]} -> {result['impl']}): {result['ratio_to_floor']:.3f}; "
              f"measured matmul peak {result['matmul_peak_gflops']:.0f} GFLOP/s")
    else:
        result = benchmarks.train_step(cfg, args.batch_size, args.seq_len, args.iters, device)
        print(f"train step on {device} ({result['threads']} threads): batch {result['batch_size']} x "
              f"{result['seq_len']}, {result['params_total'] / 1e6:.1f} M params "
              f"({result['params_active'] / 1e6:.1f} M active)")
        print(f"{result['step_ms']:.0f} ms/step, {result['tokens_per_s']:.0f} tokens/s, "
              f"{result['achieved_gflops']:.1f} GFLOP/s achieved")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    run(main)

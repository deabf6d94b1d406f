"""Benchmarks. `python bench.py --help` lists them; each prints a table, `--json PATH` saves it."""

from __future__ import annotations

import argparse
from typing import get_args, get_type_hints

import torch

from moe import ModelConfig, MoETransformer, benchmarks
from moe.checkpoint import load_config_from, load_draft_for_inference, load_for_inference, resolve_checkpoint
from moe.cli import add_config_args, device_arg, parse_args, print_table, run, write_json
from moe.data import prepare_data
from moe.sampling import compile_decode_step


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

    p1 = sub.add_parser("moe-layer", help="one MoE layer, forward+backward, against its dense compute floor")
    p1.add_argument("--tokens", type=int, default=2048, help="tokens through the layer (default 2048)")
    p1.add_argument("--iters", type=int, default=30, help="timed calls of each contender, taking turns (default 30)")
    p1.add_argument("--impls", type=impl_list, default="auto,grouped_mm,loop",
                   help="comma-separated expert implementations to time (auto, grouped_mm, split, loop); "
                        "the first is the one reported as ratio_to_floor (default: auto,grouped_mm,loop)")

    p2 = sub.add_parser("train-step", help="forward+backward+AdamW of the whole model: tokens/s")
    p2.add_argument("--batch-size", type=int, default=8)
    p2.add_argument("--seq-len", type=int, default=None, help="default: model.max_seq_len")
    p2.add_argument("--iters", type=int, default=10)

    p3 = sub.add_parser("decode", help="batch-1 decoding tokens/s with and without the KV cache, latency")
    p3.add_argument("--new-tokens", type=int, default=128)
    p3.add_argument("--compile", action="store_true", help="torch.compile the decode step (~15 s to compile here)")
    p4 = sub.add_parser("batching", help="static vs continuous batching on a long-tailed workload")
    p4.add_argument("--requests", type=int, default=64)
    p4.add_argument("--slots", type=int, default=8)
    p5 = sub.add_parser("speculative", help="plain vs speculative batch-1 decoding with a draft model")
    p5.add_argument("--draft-checkpoint", required=True, help="a smaller model sharing the tokenizer")
    p5.add_argument("--new-tokens", type=int, default=128)
    p5.add_argument("--prompts", type=int, default=4, help="validation windows used as prompts (default 4)")
    for p in (p3, p4):
        p.add_argument("--checkpoint", help="a run directory or checkpoint (default: random weights of --config)")
    p5.add_argument("--checkpoint", required=True, help="the target: a run directory or checkpoint")

    for p in (p1, p2, p3, p4, p5):
        add_config_args(p)
        p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
        p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args, config = parse_args(parser, argv)
    device, cfg = args.device, config.model
    if args.command in ("decode", "batching", "speculative"):
        return inference_benchmark(args, cfg)

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


def inference_benchmark(args: argparse.Namespace, cfg: ModelConfig) -> int:
    torch.manual_seed(0)
    if args.checkpoint:
        model, tokenizer = load_for_inference(args.checkpoint, args.device)
    else:
        model, tokenizer = MoETransformer(cfg).to(args.device).eval(), None
    where = args.checkpoint or f"random weights, {args.config}"
    if args.command == "decode":
        step = compile_decode_step(model) if args.compile else None
        result = benchmarks.decode(model, new_tokens=args.new_tokens, decode_step=step)
        lat = result["token_to_token_ms"]
        cached = "with the KV cache" + (", compiled" if args.compile else "")
        print(f"batch-1 decode ({where}): {result['cached_tokens_per_s']:.0f} tokens/s {cached}, "
              f"{result['uncached_tokens_per_s']:.0f} without; first token {result['first_token_ms']:.1f} ms; "
              f"token-to-token p50 {lat['p50']:.2f} / p90 {lat['p90']:.2f} / p99 {lat['p99']:.2f} ms")
        print("KV cache at full context, batch 1: " + ", ".join(
            f"{k.upper()} {v / 1024:.0f} KiB" for k, v in result["kv_cache_bytes_full_context"].items()))
    elif args.command == "batching":
        result = benchmarks.batching(model, args.requests, args.slots)
        lengths = result["output_lengths"]
        print(f"{result['requests']} greedy requests ({where}), output lengths {lengths['min']}-{lengths['max']} "
              f"(median {lengths['median']}), {result['slots']} slots:")
        print_table(result["rows"], [("mode", "batching", "s"), ("tokens_per_s", "tokens/s", ".0f"),
                                     ("mean_latency_s", "mean latency s", ".2f"), ("p99_latency_s", "p99 s", ".2f"),
                                     ("slot_utilisation", "slots busy", ".0%"), ("decode_steps", "steps", "d")])
        print(f"continuous / static throughput: {result['speedup']:.2f}x")
    else:
        draft = load_draft_for_inference(args.draft_checkpoint, tokenizer, args.device)
        data = load_validation(args.checkpoint, tokenizer)
        prompts = [data.batch(i, 1, 32, split="val").inputs[0].tolist() for i in range(args.prompts)]
        result = benchmarks.speculative(model, draft, prompts, args.new_tokens)
        print(f"greedy batch-1 decoding, target {result['target_params'] / 1e6:.1f} M params "
              f"({result['target_active'] / 1e6:.1f} M active), draft {result['draft_params'] / 1e6:.1f} M "
              f"({result['draft_active'] / 1e6:.1f} M active), {len(prompts)} prompts x {args.new_tokens} tokens:")
        rows = [{**r, "acceptance": "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}",
                 "k": "plain" if r["k"] == 0 else f"k={r['k']}"} for r in result["rows"]]
        print_table(rows, [("k", "decoding", "s"), ("tokens_per_s", "tokens/s", ".0f"), ("acceptance", "accepted", "s"),
                           ("tokens_per_target_forward", "tokens/target fwd", ".2f"), ("speedup", "speedup", ".2f")])
    write_json(args.json, result)
    return 0


def load_validation(checkpoint: str, tokenizer):
    """The validation split of the data a checkpoint was trained on (for realistic prompts)."""
    folder = resolve_checkpoint(checkpoint)
    config = load_config_from(folder)
    return prepare_data(config.data, config.model, config.train.seed, tokenizer)[1]


if __name__ == "__main__":
    run(main)

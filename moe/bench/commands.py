"""Benchmarks and the cost model. Each command prints a table; `--json PATH` saves the figures and,
with the `plot` extra (pip install -e '.[plot]'), `--plot PATH.png` draws the curve that matters.

  machine      this machine's roofline: peak matmul FLOP/s in fp32 and bf16, memory bandwidth
  decode       prefill and decode tokens/s across batch sizes and prompt lengths, latency
               percentiles, MFU and MBU against `machine`, KV-cache bytes for MQA / GQA / MHA
  experts      tokens per expert per decode step at each batch size, against uniform routing
  batching     static vs continuous batching on a long-tailed workload
  serve        the OpenAI server under Poisson load: throughput, TTFT and inter-token latency, continuous
               batching against the static engine
  speculative  speculative vs plain greedy decoding at batch 1..8, against the closed form
  quality      bf16 and int8 weights (and an int8 KV cache) against fp32: top-1 agreement, validation loss
  costmodel    the analytic cost model for a config on a GPU (or this CPU), and --claims:
               the reference design's arithmetic checked from configs/gpt4.toml
  moe-layer    one MoE layer, forward + backward, against its dense compute floor
  train-step   forward + backward + AdamW of the whole model: tokens/s and MFU per precision
  parallel     under torchrun: a step's compute vs collectives under tp / pp, the pipeline bubble

Every MFU is read against the matmul peak of the precision that ran: --precision (auto, fp32,
bf16; bf16 autocast over fp32 weights, as training runs) for train-step and moe-layer, --dtype
(fp32, bf16, or int8 weights with fp32 activations) for the inference commands.

Examples:
  python bench.py machine
  python bench.py train-step --precision fp32,bf16 --hf
  python bench.py decode --checkpoint runs/small --dtype bf16 --plot decode.png
  python bench.py decode --checkpoint runs/small --dtype int8 --batch-sizes 1 --compile --new-tokens 128
  python bench.py quality --checkpoint runs/small --dtype bf16,int8 --kv-int8
  python bench.py experts --batch-sizes 1,8,64
  python bench.py speculative --checkpoint runs/small --draft-checkpoint runs/draft
  python bench.py serve --checkpoint runs/small --rates 1,2,4,8,16,32 --plot serve.png
  python bench.py costmodel --config gpt4 --hardware h100-sxm --tp 8 --batch 1
  python bench.py costmodel --claims
  torchrun --nproc_per_node 2 bench.py parallel --config small --train.pp=2 --microbatches 1,2,4,8
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from typing import get_args, get_type_hints

import torch

from .. import costmodel, hardware
from ..checkpoint import (
    load_config_from,
    load_draft_for_inference,
    load_for_inference,
    resolve_checkpoint,
)
from ..cli import (
    add_config_args,
    device_arg,
    int_list,
    parse_args,
    positive_float_list,
    positive_int,
    print_table,
    write_json,
)
from ..config import ModelConfig, load_config
from ..data.corpus import prepare_data
from ..infer.sampling import ExportedDecodeStep, compile_decode_step
from ..model import MoETransformer, activation_dtype, pack_for_inference
from . import benchmarks
from .claims import claims
from .parallel import expert_split, sweep
from .plots import plot_decode, plot_experts, plot_serving, plot_speculative
from .serving import LATENCIES, serve_benchmark


def comma_list(what: str, known) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: comma-separated names, each one of `known`."""
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(text.split(","))
        for name in names:
            if name not in known:
                raise argparse.ArgumentTypeError(f"unknown {what} {name!r} (expected {', '.join(known)})")
        return names

    return parse


precision_list = comma_list("precision", ("auto", *hardware.PRECISIONS))
dtype_list = comma_list("dtype", tuple(hardware.INFERENCE_DTYPES))
impl_list = comma_list("implementation", get_args(get_type_hints(ModelConfig)["expert_impl"]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = lambda name, text: sub.add_parser(name, help=text, description=text)  # noqa: E731

    p = add("machine", "peak matmul FLOP/s in fp32 and bf16 and memory bandwidth (a large copy); "
                       "the others read each result against the peak of the precision it ran in")
    commands = {"machine": p}

    p = add("decode", "prefill and decode tokens/s, latency, MFU and MBU across batch sizes and prompt lengths")
    p.add_argument("--batch-sizes", type=int_list, default=(1, 2, 4, 8, 16, 32, 64), help="default 1,2,4,...,64")
    p.add_argument("--prompt-lens", type=int_list, default=(16, 128), help="default 16,128")
    p.add_argument("--new-tokens", type=positive_int, default=32, help="decode steps per run (default 32)")
    p.add_argument("--compile", action="store_true",
                   help="also time batch-1 decoding eagerly, with torch.compile's step and, on a CPU, with the "
                        "step compiled ahead of time by AOTInductor (~40 s to build both)")
    commands["decode"] = p

    p = add("experts", "tokens per expert per layer at every decode step, per batch size, against uniform routing")
    p.add_argument("--batch-sizes", type=int_list, default=(1, 2, 4, 8, 16, 32, 64), help="default 1,2,4,...,64")
    p.add_argument("--prompt-len", type=positive_int, default=16)
    p.add_argument("--new-tokens", type=positive_int, default=32, help="decode steps per batch size (default 32)")
    commands["experts"] = p

    p = add("batching", "static vs continuous batching of greedy requests with long-tailed output lengths")
    p.add_argument("--requests", type=positive_int, default=64)
    p.add_argument("--slots", type=positive_int, default=8)
    p.add_argument("--compile", action="store_true",
                   help="also run continuous batching with its decode steps of up to 16 rows compiled "
                        "(compile_decode_step; ~20-30 s to build, before the clock starts), and check it "
                        "writes the eager engine's tokens")
    commands["batching"] = p

    p = add("serve", "the OpenAI server (python -m moe.serve, started on 127.0.0.1) under Poisson arrivals with "
                     "Pareto output lengths: throughput, time to first token, inter-token latency p50/p99 at each "
                     "rate, continuous batching against the static engine under the same load")
    p.add_argument("--checkpoint", required=True, help="a run directory or checkpoint")
    p.add_argument("--rates", type=positive_float_list, default=(1, 2, 4, 8, 16, 32),
                   help="mean arrivals per second, one load each (default 1,2,4,8,16,32)")
    p.add_argument("--requests", type=positive_int, default=64, help="requests per load (default 64)")
    p.add_argument("--slots", type=positive_int, default=16, help="the servers' --slots (default 16)")
    p.add_argument("--compile", action="store_true",
                   help="the servers' --compile: decode steps of up to 16 rows compiled (each server builds them "
                        "before it listens)")
    p.add_argument("--timeout", type=positive_int, default=300,
                   help="seconds a load may run past its last arrival; what is unfinished then counts as not "
                        "served (default 300)")
    p.add_argument("--seed", type=int, default=0, help="arrivals, prompts and lengths (default 0)")
    p.add_argument("--server-threads", type=positive_int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="the servers' PyTorch threads (default: a core less than the machine's, the load "
                        "generator's; on 2 cores both engines serve 1.1-1.3x more so than with 2 threads)")
    commands["serve"] = p

    p = add("speculative", "speculative vs plain greedy decoding with a draft model, at batch 1..8")
    p.add_argument("--draft-checkpoint", required=True, help="a smaller model sharing the tokenizer")
    p.add_argument("--batch-sizes", type=int_list, default=(1, 2, 4, 8), help="default 1,2,4,8")
    p.add_argument("-k", type=positive_int, default=4, help="tokens drafted per round (default 4)")
    p.add_argument("--new-tokens", type=positive_int, default=64)
    p.add_argument("--prompts", type=positive_int, default=8, help="validation windows used as prompts (default 8)")
    commands["speculative"] = p

    p = add("quality", "bf16 and int8 weights (and an int8 KV cache) against fp32: top-1 agreement on fp32's "
                       "greedy tokens from validation prompts, and validation loss")
    p.add_argument("--checkpoint", required=True, help="a run directory or checkpoint")
    p.add_argument("--dtype", type=dtype_list, default=("bf16", "int8"), help="comma-separated (default bf16,int8)")
    p.add_argument("--prompts", type=positive_int, default=8, help="validation windows used as prompts (default 8)")
    p.add_argument("--new-tokens", type=positive_int, default=125, help="greedy tokens per prompt (default 125)")
    p.add_argument("--val-batches", type=positive_int, default=8,
                   help="validation batches of train.micro_batch_size sequences for the loss (default 8)")
    p.add_argument("--compile", action="store_true",
                   help="also the top-1 agreement of the compiled batch-1 step `generate.py --compile` decodes with "
                        "(fed the same tokens one at a time; ~30 s to build each)")
    commands["quality"] = p

    p = add("costmodel", "the analytic cost model (no measurement): parameters, FLOPs, bytes, KV cache, "
                         "roofline time, tokens/s, MFU, GPUs, dollars; --claims checks the reference design")
    p.add_argument("--claims", action="store_true", help="the reference design's claims, from configs/gpt4.toml")
    p.add_argument("--hardware", default="h100-sxm", choices=[*costmodel.HARDWARE, "cpu"],
                   help="a GPU's datasheet figures, or cpu: this machine, measured (default h100-sxm)")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--context", type=positive_int, default=None, help="tokens of context (default model.max_seq_len)")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel degree (default 1)")
    p.add_argument("--pp", type=positive_int, default=1, help="pipeline-parallel degree (default 1)")
    p.add_argument("--bytes-per-param", type=float, default=None,
                   help="2 for bf16, 1 for fp8/int8 (default 2 on GPUs, 4 on the CPU, which runs fp32)")
    p.add_argument("--dollars-per-hour", type=float, default=None, help="per device (default: the table's)")
    p.add_argument("--train-tokens", type=float, default=None, help="also price training on this many tokens")
    p.add_argument("--devices", type=positive_int, default=None, help="devices for training (default tp x pp)")
    p.add_argument("--mfu", type=float, default=0.35, help="training MFU assumed (default 0.35)")
    p.add_argument("--microbatches", type=positive_int, default=None,
                   help="with --tp / --pp: also model a training step of --batch sequences per replica, cut "
                        "into this many pipeline micro-batches (compute, communication, bubble)")
    commands["costmodel"] = p

    p = add("moe-layer", "one MoE layer, forward+backward, against its dense compute floor")
    p.add_argument("--tokens", type=positive_int, default=2048, help="tokens through the layer (default 2048)")
    p.add_argument("--iters", type=positive_int, default=30, help="timed calls of each contender, taking turns")
    p.add_argument("--impls", type=impl_list, default="auto,grouped_mm,loop",
                   help="comma-separated expert implementations to time (auto, grouped_mm, split, loop); "
                        "the first is the one reported as ratio_to_floor (default: auto,grouped_mm,loop)")
    commands["moe-layer"] = p

    p = add("train-step", "forward+backward+AdamW of the whole model: tokens/s and MFU in each precision")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seq-len", type=positive_int, default=None, help="default: model.max_seq_len")
    p.add_argument("--iters", type=positive_int, default=10)
    p.add_argument("--hf", action="store_true",
                   help="also time transformers' MixtralForCausalLM of the same shape (needs the hf extra)")
    commands["train-step"] = p

    p = add("parallel", "under torchrun with --train.tp=N and/or --train.pp=N: a training step's time split "
                        "into compute and collectives, and the pipeline bubble against (p - 1) / (m + p - 1)")
    p.add_argument("--microbatches", type=int_list, default=(1, 2, 4, 8), help="pipeline micro-batch counts (default 1,2,4,8)")
    p.add_argument("--schedules", type=comma_list("schedule", ("gpipe", "1f1b", "interleaved")), default=("gpipe", "1f1b"),
                   help="comma-separated pipeline schedules (default gpipe,1f1b)")
    p.add_argument("--seqs-per-microbatch", type=positive_int, default=2, help="sequences in a pipeline micro-batch (default 2)")
    p.add_argument("--iters", type=positive_int, default=5, help="timed steps per layout (default 5)")
    p.add_argument("--expert-split", type=positive_int, metavar="TOKENS", default=None,
                   help="instead, in one process: one tp rank's expert work for TOKENS tokens, experts divided "
                        "among the ranks (ours) against each expert's hidden units split (Megatron's)")
    commands["parallel"] = p

    for name in ("moe-layer", "train-step"):
        commands[name].add_argument(
            "--precision", type=precision_list, default=("auto",),
            help="comma-separated: auto, fp32, bf16 (bf16 autocast over fp32 weights, as training runs); "
                 "several take turns call by call, e.g. fp32,bf16 (default auto)")
    for name in ("decode", "experts", "batching"):
        commands[name].add_argument("--checkpoint", help="a run directory or checkpoint (default: random weights)")
    commands["speculative"].add_argument("--checkpoint", required=True, help="the target: a run directory or checkpoint")
    for name in ("decode", "experts", "batching", "speculative", "serve"):
        commands[name].add_argument("--dtype", choices=list(hardware.INFERENCE_DTYPES), default=None,
                                    help="the weights' dtype: fp32, bf16, or int8 (fp32 activations); default bf16 "
                                         "on CUDA, fp32 on a CPU")
    for name in ("decode", "batching", "quality", "serve"):
        commands[name].add_argument("--kv-int8", action="store_true",
                                    help="also (quality) or instead keep the KV cache in int8")
    for name, p in commands.items():
        add_config_args(p)
        p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
        p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
        if name in ("decode", "experts", "speculative", "serve"):
            p.add_argument("--plot", metavar="PNG", help="also draw the results (needs the plot extra)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(build_parser(), argv)
    result = COMMANDS[args.command](args, config if args.command == "parallel" else config.model)
    write_json(args.json, result)
    return 0


# ---- commands -----------------------------------------------------------------------------------

def machine(args, cfg: ModelConfig) -> dict:
    result = hardware.machine(args.device, dtypes=(torch.float32, torch.bfloat16))
    print(f"{result['device']} ({result['threads']} threads; precision auto here: {result['dtype']}): matmul "
          f"{result['matmul_flops'] / 1e9:,.0f} GFLOP/s, memory {result['bandwidth'] / 1e9:,.1f} GB/s, "
          f"ridge {result['ridge_flops_per_byte']:.1f} FLOP/byte (below it a kernel is bandwidth-bound)")
    peaks = result["matmul_flops_by_dtype"]
    print("matmul peak by dtype: " + ", ".join(f"{name} {flops / 1e9:,.0f} GFLOP/s" for name, flops in peaks.items())
          + f" (bfloat16 / float32: {peaks['bfloat16'] / peaks['float32']:.1f}x)")
    return result


def load_model(args, cfg: ModelConfig):
    torch.manual_seed(0)
    dtype = hardware.inference_dtype(args.dtype, args.device)
    if getattr(args, "checkpoint", None):
        return (*load_for_inference(args.checkpoint, args.device, dtype, packed=True), args.checkpoint)
    model = MoETransformer(cfg).to(args.device, activation_dtype(dtype)).eval()
    return pack_for_inference(model, dtype), None, f"random weights of {args.config}"


def decode(args, cfg: ModelConfig) -> dict:
    model, _, where = load_model(args, cfg)
    weights = hardware.dtype_name(model.lm_head.weight.dtype)
    peaks = hardware.machine(args.device, next(model.parameters()).dtype)  # int8 weights compute in fp32
    result, _ = benchmarks.decode_sweep(model, peaks, args.batch_sizes, args.prompt_lens, args.new_tokens,
                                        kv_int8=args.kv_int8)
    kv = "int8" if args.kv_int8 else peaks["dtype"]
    print(f"greedy decoding, {weights} weights, {peaks['dtype']} activations, {kv} KV cache, {where} "
          f"({costmodel.param_counts(model.cfg).active / 1e6:.1f} M active parameters), {args.new_tokens} steps "
          f"per run; roofline: {peaks['matmul_flops'] / 1e9:.0f} GFLOP/s ({peaks['dtype']}), "
          f"{peaks['bandwidth'] / 1e9:.1f} GB/s; MBU counts the bytes read in these dtypes")
    print_table(result["rows"], [("prompt_len", "prompt", "d"), ("batch", "batch", "d"),
                                 ("prefill_tokens_per_s", "prefill tok/s", ",.0f"),
                                 ("decode_tokens_per_s", "decode tok/s", ",.0f"), ("p50_ms", "p50 ms", ".2f"),
                                 ("p90_ms", "p90 ms", ".2f"), ("p99_ms", "p99 ms", ".2f"), ("gflops", "GFLOP/s", ".1f"),
                                 ("mfu", "MFU", ".1%"), ("gbytes_per_s", "GB/s", ".2f"), ("mbu", "MBU", ".1%")])
    print("KV cache at the full context, per sequence: " + ", ".join(
        f"{k.upper()} {v / 1024:,.0f} KiB" for k, v in result["kv_cache_bytes_full_context"].items()))
    if args.compile:
        steps = {"eager": None, "torch.compile": compile_decode_step(model)}
        if ExportedDecodeStep.runs_on(args.device):
            steps["AOTInductor"] = ExportedDecodeStep(model, args.kv_int8)
        else:
            print(f"no AOTInductor step on {args.device}: ExportedDecodeStep runs on a CPU only")
        runs = {name: benchmarks.batch1_decode(model, new_tokens=args.new_tokens, decode_step=step,
                                               kv_int8=args.kv_int8, peaks=peaks) for name, step in steps.items()}
        result["batch1"] = runs
        result["batch1_compiled_matches_eager"] = all(r["tokens"] == runs["eager"]["tokens"] for r in runs.values())
        print(f"batch 1, {args.new_tokens} greedy tokens, token to token (the prefill apart):")
        print_table([{"step": name, **run, "p50_ms": run["token_to_token_ms"]["p50"],
                      "speedup": run["decode_tokens_per_s"] / runs["eager"]["decode_tokens_per_s"]}
                     for name, run in runs.items()],
                    [("step", "step", "s"), ("decode_tokens_per_s", "decode tok/s", ",.0f"), ("p50_ms", "p50 ms", ".2f"),
                     ("gbytes_per_s", "GB/s", ".2f"), ("mbu", "MBU", ".1%"), ("speedup", "x eager", ".2f")])
        print(f"greedy tokens identical to eager: {result['batch1_compiled_matches_eager']}")
    if args.plot:
        plot_decode(args.plot, result)
    return result


def experts(args, cfg: ModelConfig) -> dict:
    model, _, where = load_model(args, cfg)
    if model.cfg.n_experts == 1:
        raise ValueError(f"{where}: a dense model (model.n_experts=1) has no experts to count")
    _, routing = benchmarks.decode_sweep(model, None, args.batch_sizes, (args.prompt_len,), args.new_tokens)
    result = benchmarks.expert_load(model.cfg, routing)
    E, k = model.cfg.n_experts, model.cfg.top_k
    print(f"tokens per expert per MoE layer at each of {args.new_tokens} decode steps, {where}, top-{k} of {E}")
    print_table(result["rows"], [("batch", "batch", "d"), ("min", "min", "d"), ("mean", "mean", ".2f"),
                                 ("max", "max", "d"), ("idle_share", "idle", ".1%"),
                                 ("distinct", "distinct experts", ".2f"),
                                 ("distinct_uniform", "uniform E(1-(1-k/E)^B)", ".2f")])
    if args.plot:
        plot_experts(args.plot, result)
    return result


def batching(args, cfg: ModelConfig) -> dict:
    model, _, where = load_model(args, cfg)
    step = compile_decode_step(model) if args.compile else None
    result = benchmarks.batching(model, args.requests, args.slots, kv_int8=args.kv_int8, decode_step=step)
    lengths = result["output_lengths"]
    print(f"{result['requests']} greedy requests ({where}), output lengths {lengths['min']}-{lengths['max']} "
          f"(median {lengths['median']}), {result['slots']} slots:")
    print_table(result["rows"], [("mode", "batching", "s"), ("tokens_per_s", "tokens/s", ".0f"),
                                 ("mean_latency_s", "mean latency s", ".2f"), ("p99_latency_s", "p99 s", ".2f"),
                                 ("slot_utilisation", "slots busy", ".0%"), ("decode_steps", "steps", "d")])
    print(f"continuous / static throughput: {result['speedup']:.2f}x")
    if args.compile:
        print(f"compiled / eager continuous: {result['compiled_speedup']:.2f}x (the steps built in "
              f"{result['build_s']:.0f} s); same tokens: {result['same_tokens']}")
    return result


def serve(args, cfg: ModelConfig) -> dict:
    folder = resolve_checkpoint(args.checkpoint)
    model_cfg = load_config_from(folder).model
    server_args = ["--device", str(args.device), "--threads", str(args.server_threads),
                   *(["--dtype", args.dtype] if args.dtype else []), *(["--kv-int8"] if args.kv_int8 else []),
                   *(["--compile"] if args.compile else [])]
    print(f"{args.requests} streamed greedy completions a load ({folder}), Poisson arrivals, prompts of 16-64 random "
          f"tokens, outputs 4 x (1 + Pareto(1.2)) tokens capped at 160; {args.slots} slots, {args.server_threads} "
          f"PyTorch thread(s) a server; static engine first")
    result = serve_benchmark(str(folder), "bench", model_cfg.vocab_size, model_cfg.max_seq_len, list(args.rates),
                             args.requests, args.slots, args.timeout, args.seed, tuple(server_args))
    print_table([{**r, **{f"{k}_{q}": r[k][q] * 1e3 for k in ("ttft_s", "itl_s", "per_token_s", "latency_s")
                          for q in ("p50", "p99")}} for r in result["rows"]],
                [("mode", "batching", "s"), ("rate", "req/s", "g"), ("served", "served", "d"),
                 ("tokens_per_s", "tokens/s", ",.0f"), ("ttft_s_p50", "TTFT p50 ms", ",.0f"),
                 ("ttft_s_p99", "TTFT p99 ms", ",.0f"), ("itl_s_p50", "ITL p50 ms", ",.1f"),
                 ("itl_s_p99", "ITL p99 ms", ",.1f"), ("per_token_s_p99", "ms/token p99", ",.1f"),
                 ("latency_s_p99", "latency p99 ms", ",.0f")])
    for key, name in LATENCIES.items():
        points = result["at_equal_p99"][key]
        print(f"at the static engine's p99 {name}: continuous / static throughput " + (", ".join(
            f"{'>=' if p['lower_bound'] else ''}{p['ratio']:.2f}x ({p['p99_s'] * 1e3:,.0f} ms)" for p in points)
            or "(no point where continuous batching was as slow)"))
    if args.plot:
        plot_serving(args.plot, result)
    return result


def speculative(args, cfg: ModelConfig) -> dict:
    target, tokenizer, where = load_model(args, cfg)
    draft = load_draft_for_inference(args.draft_checkpoint, tokenizer, args.device,
                                     hardware.inference_dtype(args.dtype, args.device), packed=True)
    data = load_validation(args.checkpoint, tokenizer)
    prompts = [data.batch(i, 1, 32, split="val").inputs[0].tolist() for i in range(args.prompts)]
    result = benchmarks.speculative_sweep(target, draft, prompts, args.batch_sizes, args.new_tokens, args.k)
    result.update(target_active=costmodel.param_counts(target.cfg).active,
                  draft_active=costmodel.param_counts(draft.cfg).active)
    print(f"greedy decoding, {args.new_tokens} tokens per row, k = {args.k}: target {where} "
          f"({result['target_active'] / 1e6:.1f} M active), draft {args.draft_checkpoint} "
          f"({result['draft_active'] / 1e6:.1f} M active)")
    print_table(result["rows"], [("batch", "batch", "d"), ("acceptance", "accepted", ".0%"),
                                 ("tokens_per_target_forward", "tok/target fwd", ".2f"),
                                 ("closed_form_tokens_per_forward", "(1-a^(k+1))/(1-a)", ".2f"),
                                 ("draft_cost_ratio", "c", ".2f"), ("verify_cost_ratio", "verify / step", ".2f"),
                                 ("speedup", "speedup", ".2f"), ("closed_form_speedup", "closed form", ".2f"),
                                 ("costed_speedup", "costed", ".2f"), ("matches_greedy", "= greedy", "")])
    print("closed form: (1 - a^(k+1)) / ((1 - a)(k c + 1)) with a and c (a draft step / a target step) measured;\n"
          "it assumes checking k + 1 tokens costs one target step. costed: tokens per target forward / "
          "((k + 1) c + verify), the costs as they were (this draft runs k + 1 steps a round)")
    if args.plot:
        plot_speculative(args.plot, result)
    return result


def quality(args, cfg: ModelConfig) -> dict:
    _, tokenizer = load_for_inference(args.checkpoint)
    data = load_validation(args.checkpoint, tokenizer)
    prompts = [data.batch(i, 1, 32, split="val").inputs[0].tolist() for i in range(args.prompts)]
    model_cfg = load_config_from(resolve_checkpoint(args.checkpoint))
    n, seq_len = model_cfg.train.micro_batch_size, model_cfg.model.max_seq_len
    batches = [data.batch(i * n, n, seq_len, split="val") for i in range(args.val_batches)]
    variants = [(d, False) for d in ("fp32", *args.dtype)] + [(d, True) for d in ("fp32", *args.dtype) if args.kv_int8]
    models = {dtype: load_for_inference(args.checkpoint, args.device, hardware.inference_dtype(dtype, args.device),
                                        packed=True)[0] for dtype, _ in dict.fromkeys(variants)}
    result = benchmarks.quality(models, list(dict.fromkeys(variants)), prompts, args.new_tokens, batches, args.compile)
    print(f"{args.checkpoint}: against fp32's greedy tokens ({len(prompts)} validation prompts x {args.new_tokens}, "
          f"each position fed fp32's tokens so far) and validation loss ({args.val_batches} x {n} x {seq_len} tokens)")
    print_table(result["rows"], [("weights", "weights", "s"), ("kv_cache", "KV cache", "s"),
                                 ("top1_agreement", "top-1 agreement", ".2%"),
                                 *([("top1_compiled", "compiled", ".2%")] if args.compile else []),
                                 ("val_loss", "val loss", ".4f"), ("val_loss_change", "change", "+.2%")])
    return result


def load_validation(checkpoint: str, tokenizer):
    """The validation split of the data a checkpoint was trained on (for realistic prompts)."""
    folder = resolve_checkpoint(checkpoint)
    config = load_config_from(folder)
    return prepare_data(config.data, config.model, config.train.seed, tokenizer)[1]


def cost_model(args, cfg: ModelConfig) -> dict:
    if args.claims:
        rows = claims(load_config("gpt4").model)
        for i, row in enumerate(rows, 1):
            print(f"{i}. {row['claim']}\n   ours: {row['figure']}\n   verdict: {row['verdict']}")
        return {"benchmark": "claims", "rows": rows}
    hw = this_cpu(args.device) if args.hardware == "cpu" else costmodel.HARDWARE[args.hardware]
    if args.dollars_per_hour is not None:
        hw = dataclasses.replace(hw, dollars_per_hour=args.dollars_per_hour)
    context = args.context or cfg.max_seq_len
    width = args.bytes_per_param or (4 if args.hardware == "cpu" else 2)
    result = {"benchmark": "costmodel", **costmodel.report(cfg, hw, args.batch, context, args.tp, args.pp, width)}
    p, step = costmodel.param_counts(cfg), result["decode"]
    print(f"{args.config} on {args.tp * args.pp} x {hw.name} (tensor {args.tp} x pipeline {args.pp}; each "
          f"{hw.flops / 1e9:,.0f} GFLOP/s, {hw.bandwidth / 1e9:,.1f} GB/s, {hw.memory / 1e9:,.0f} GB, "
          f"${hw.dollars_per_hour:g}/h), batch {args.batch}, context {context}, {width:g} bytes per value")
    print(f"parameters: {p.total:,} total, {p.active:,} active per token "
          f"(attention {p.attention:,}, experts {p.experts:,}, embeddings {p.embedding:,})")
    print(f"FLOPs per token: {costmodel.flops_per_token(cfg, context):,} forward at context {context} "
          f"(x3 = {result['flops_per_token']['training']:,} training)")
    print(f"decode step: {step['flops']:.3g} FLOP, {step['weight_bytes']:.3g} weight bytes + {step['kv_bytes']:.3g} "
          f"KV-cache bytes ({step['intensity']:.1f} FLOP/byte against a ridge of {hw.ridge:.0f}: {step['bound']}-bound)")
    print(f"roofline: {step['step_s'] * 1e3:.3f} ms per step, {step['tokens_per_s_per_user']:,.1f} tokens/s per "
          f"user, {step['tokens_per_s']:,.0f} tokens/s in all, MFU {step['mfu']:.1%}; "
          f"${step['dollars_per_1k_tokens']:.6f} per 1k tokens")
    if step["devices_for_memory"] > args.tp * args.pp:
        print(f"note: weights and KV cache need {step['devices_for_memory']} such devices' memory, not "
              f"{args.tp * args.pp}: raise --tp / --pp or lower --bytes-per-param")
    if args.microbatches:
        step = costmodel.training_step(cfg, hw, args.batch * context, args.tp, args.pp, args.microbatches,
                                       args.mfu, width, context)
        result["training_step"] = step
        link = f"{step['comm_s'] * 1e3:.2f} ms at {hw.link / 1e9:,.0f} GB/s" if hw.link else "no link bandwidth known"
        print(f"training step of {args.batch} x {context} tokens per replica on tensor {args.tp} x pipeline {args.pp}: "
              f"compute {step['compute_s'] * 1e3:.2f} ms at {args.mfu:.0%} MFU; tensor-parallel all-reduces "
              f"{step['tp_bytes'] / 1e9:.3g} GB and stage activations {step['pp_bytes'] / 1e9:.3g} GB a device ({link}); "
              f"bubble {step['bubble']:.1%} with {args.microbatches} micro-batches; {step['step_s'] * 1e3:.2f} ms a step")
    if args.train_tokens:
        devices = args.devices or args.tp * args.pp
        train = costmodel.training_cost(cfg, args.train_tokens, hw, devices, args.mfu, context)
        result["training"] = train
        print(f"training on {args.train_tokens:.3g} tokens: {train['flops']:.3g} FLOP, {train['device_days']:,.0f} "
              f"device-days at {args.mfu:.0%} MFU ({train['days']:,.1f} days on {devices}), "
              f"${train['dollars']:,.0f}")
    return result


def this_cpu(device) -> costmodel.Hardware:
    measured = hardware.machine(device, torch.float32)  # as inference runs on a CPU
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return costmodel.Hardware(f"this {device} (measured)", measured["matmul_flops"], measured["bandwidth"], memory, 0.0)


def moe_layer(args, cfg: ModelConfig) -> dict:
    result = benchmarks.moe_layer(cfg, args.tokens, args.iters, args.device, args.impls, precisions=args.precision)
    shape = result["shape"]
    print(f"MoE layer fwd+bwd on {args.device} ({result['threads']} threads): {shape['tokens']} tokens, "
          f"D={shape['d_model']} F={shape['d_ff']} E={shape['n_experts']} k={shape['top_k']}, "
          f"{result['expert_gflop_per_step']:.2f} GFLOP of expert matmuls; the floor in the same precision")
    print_table(result["rows"], [("precision", "precision", "s"), ("dtype", "dtype", "s"), ("name", "run", "s"),
                                 ("ms", "ms", ".1f"), ("gflops", "GFLOP/s", ".1f"), ("ratio_to_floor", "x floor", ".3f")])
    for precision, ratio in result["ratio_to_floor"].items():
        print(f"ratio_to_floor, {precision} ({args.impls[0]} -> {result['impl'][precision]}): {ratio:.3f}")
    return result


def train_step(args, cfg: ModelConfig) -> dict:
    result = benchmarks.train_step(cfg, args.batch_size, args.seq_len, args.iters, args.device,
                                   precisions=args.precision, hf=args.hf)
    print(f"train step on {args.device} ({result['threads']} threads): batch {result['batch_size']} x "
          f"{result['seq_len']}, {result['params_total'] / 1e6:.1f} M params "
          f"({result['params_active'] / 1e6:.1f} M active); the contenders take turns step by step")
    print_table(result["rows"], [("model", "model", "s"), ("precision", "precision", "s"), ("dtype", "dtype", "s"),
                                 ("step_ms", "ms/step", ".0f"), ("tokens_per_s", "tokens/s", ",.0f"),
                                 ("achieved_gflops", "GFLOP/s", ".1f"), ("peak_gflops", "its peak", ".0f"),
                                 ("mfu", "MFU", ".1%"), ("speedup", "x first", ".2f")])
    return result


def parallel(args, config) -> dict:
    train = config.train
    if args.expert_split:
        tp = max(train.tp, 2)
        result = {"benchmark": "expert-split", **expert_split(config.model, args.expert_split, tp, 4 * args.iters, args.device)}
        print(f"{args.config}: one of {tp} tensor-parallel ranks' expert work, forward + backward, {args.expert_split} "
              f"tokens routed uniformly (the two take turns, median of {4 * args.iters})")
        print(f"experts divided (E/{tp} whole experts, {result['rows_divided']} rows): {result['divided_ms']:.1f} ms; "
              f"each expert split (F/{tp} of every expert, {result['rows_split']} rows): {result['split_ms']:.1f} ms; "
              f"split / divided = {result['split_over_divided']:.2f}")
        return result
    rows = sweep(config, args.device, args.microbatches, args.schedules, args.seqs_per_microbatch, args.iters)
    result = {"benchmark": "parallel", "tp": train.tp, "pp": train.pp, "rows": rows}
    if int(os.environ.get("RANK", "0")) != 0:
        args.json = None  # rank 0 writes for all
        return result
    for row in rows:
        row["step_ms"], row["comm_ms"] = row["step_s"] * 1e3, row["comm_s"] * 1e3
        row["comm_share"] = row["comm_s"] / row["step_s"]
        row["link_gbs"] = row["tp_bytes"] / row["comm_s"] / 1e9 if train.tp > 1 and row["comm_s"] else 0.0
    print(f"{args.config}: {int(os.environ.get('WORLD_SIZE', '1'))} processes, tensor {train.tp} x pipeline {train.pp} "
          f"(forward + backward on random tokens, {args.iters} steps a layout, on {args.device})")
    columns = [("schedule", "schedule", "s"), ("microbatches", "m", "d"), ("tokens", "tokens", "d"),
               ("step_ms", "step ms", ".1f"), ("comm_ms", "in collectives ms", ".1f"), ("comm_share", "share", ".0%")]
    if train.tp > 1:
        columns += [("tp_bytes", "tp all-reduce bytes (model)", ".3g"), ("link_gbs", "achieved GB/s", ".2f")]
    if train.pp > 1:
        columns += [("bubble", "bubble", ".1%"), ("bubble_model", "(p-1)/(m+p-1)", ".1%"), ("imbalance", "imbalance", ".2f")]
    print_table(rows, columns)
    return result


COMMANDS = {"machine": machine, "decode": decode, "experts": experts, "batching": batching,
            "speculative": speculative, "quality": quality, "costmodel": cost_model, "moe-layer": moe_layer, "train-step": train_step,
            "parallel": parallel, "serve": serve}

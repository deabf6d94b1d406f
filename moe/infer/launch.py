"""Generation from the command line's choices: one prompt streamed (plain, compiled or speculative),
or a prompt file served by continuous batching. What `generate.py` calls."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from ..checkpoint import load_draft_for_inference, load_for_inference
from ..config import ConfigError, check_tensor_parallel
from ..hardware import inference_dtype
from ..model.tensor_parallel import join_process_group, parallelize
from ..tokenizer import EOT
from .engine import Engine
from .prompts import TextStream, prompt_with_images, read_prompt_file
from .sampling import SamplingParams, batch1_decode_step, compile_decode_step, generate
from .speculative import SpeculativeStats, speculative_generate


def launch(args: argparse.Namespace) -> None:
    """Print the generated text, then a one-line report (requests, tokens, tokens/s) on stderr;
    under torchrun, the model's layers divided among the processes (tensor parallelism), rank 0
    printing for all."""
    dtype = inference_dtype(args.dtype, args.device)
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    if tp > 1:
        launch_tensor_parallel(args, dtype, tp)
        return
    model, tokenizer = load_for_inference(args.checkpoint, args.device, dtype, packed=True)
    run(args, model, tokenizer)


def launch_tensor_parallel(args: argparse.Namespace, dtype: torch.dtype, tp: int) -> None:
    """One prompt, its model divided among the torchrun processes as gpt-fast does: every rank
    runs the same generation on its share of each layer; greedy output is one process's."""
    for flag, given in (("--prompt-file", args.prompt_file), ("--draft-checkpoint", args.draft_checkpoint),
                        ("--compile", args.compile), ("--kv-int8", args.kv_int8), ("--dtype int8", dtype == torch.int8)):
        if given:
            raise ConfigError(f"{flag} does not combine with tensor parallelism (generate.py under torchrun) yet")
    device = join_process_group(torch.device(args.device))
    model, tokenizer = load_for_inference(args.checkpoint, device, dtype)
    check_tensor_parallel(model.cfg, tp, "torchrun --nproc_per_node")
    if model.cfg.n_kv_heads > 1:
        raise ConfigError(f"generate.py under torchrun divides multi-query models only (the checkpoint has "
                          f"model.n_kv_heads={model.cfg.n_kv_heads}, whose cache would be divided too)")
    parallelize(model, init_device_mesh(device.type, (tp,), mesh_dim_names=("tp",)))
    with contextlib.ExitStack() as stack:
        if dist.get_rank() != 0:  # rank 0 speaks for all
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
        run(args, model, tokenizer)
    # Every rank done before any leaves; the process group is left to the process's exit, which
    # `cli.leave` makes without finalizing Python (it says why).
    dist.barrier()


def run(args: argparse.Namespace, model, tokenizer) -> None:
    dtype = inference_dtype(args.dtype, args.device)
    eot = tokenizer.token_to_id(EOT)
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, (eot,), args.seed)
    started, built = time.perf_counter(), ""
    if args.prompt_file:
        texts, requests = read_prompt_file(args.prompt_file, tokenizer, model.cfg.vision, params)
        engine = Engine(model, args.slots, kv_int8=args.kv_int8,
                        decode_step=compile_decode_step(model) if args.compile else None)
        if args.compile:  # built before the clock starts: the report times generation
            built, started = f", the steps compiled in {engine.warm_up():.0f} s", time.perf_counter()
        results = engine.run(requests)
        for result in sorted(results, key=lambda r: r.id):
            print(f"--- {result.id}: {texts[result.id]}\n{texts[result.id]}{tokenizer.decode(result.tokens)}")
        n_tokens, report = sum(len(r.tokens) for r in results), f"{len(results)} requests"
    else:
        prompt, images = prompt_with_images(tokenizer, args.prompt, args.image, model.cfg.vision)
        stats = SpeculativeStats()
        if args.draft_checkpoint:
            draft = load_draft_for_inference(args.draft_checkpoint, tokenizer, args.device, dtype, packed=True)
            tokens = speculative_generate(model, draft, prompt, params, args.speculate_k, stats, args.kv_int8)
        else:
            decode_step = None
            if args.compile:  # built before the clock starts: the report times generation
                decode_step = batch1_decode_step(model, args.kv_int8)
                built, started = f", the step compiled in {time.perf_counter() - started:.0f} s", time.perf_counter()
            tokens = generate(model, prompt, params, decode_step, images=images, kv_int8=args.kv_int8)
        stream = TextStream(tokenizer)
        print(args.prompt, end="", flush=True)  # the prompt was checked above, as `tokens` was made
        for token in tokens:
            text = stream.add(token)
            if args.stream:
                print(text, end="", flush=True)
        print(stream.rest() if args.stream else tokenizer.decode(stream.tokens))
        n_tokens, report = len(stream.tokens), "1 request"
        if args.draft_checkpoint:
            report += (f", speculative k={args.speculate_k}: acceptance {stats.acceptance_rate:.0%}, "
                       f"{stats.tokens_per_target_forward:.2f} tokens per target forward")
    seconds = time.perf_counter() - started
    print(f"[{report}, {n_tokens} tokens in {seconds:.2f} s, {n_tokens / seconds:.0f} tokens/s{built}]", file=sys.stderr)

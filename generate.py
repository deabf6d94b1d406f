"""Generate text from a trained MoE transformer.

Examples:
  python generate.py --prompt "def fibonacci(n):"                  from runs/small
  python generate.py --checkpoint runs/small --prompt "import" --temperature 0 --max-new-tokens 50
  python generate.py --prompt-file prompts.txt --slots 8           one prompt a line, continuous batching
  python generate.py --prompt-file prompts.txt --compile           the same, its decode steps compiled
  python generate.py --prompt "class" --draft-checkpoint runs/draft --speculate-k 4
  python generate.py --prompt "import" --dtype int8 --kv-int8 --compile   int8 weights and cache, compiled step
  OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 generate.py --prompt "def" --temperature 0
      the model's layers divided among 2 processes (tensor parallelism; one prompt, fp32 or bf16)
  python generate.py --checkpoint runs/vision_small --image digits.png --temperature 0   caption an image
  python generate.py --checkpoint runs/vision_small --prompt-file prompts.jsonl
      one JSON object a line: {"prompt": "...", "images": ["a.png", ...]} (paths relative to the file)
"""

from __future__ import annotations

import argparse

from moe.cli import device_arg, run
from moe.hardware import INFERENCE_DTYPES
from moe.infer.launch import launch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/small", help="a run directory or checkpoint (default runs/small)")
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    prompts.add_argument("--prompt-file", help="a file with one prompt per line (or a .jsonl file of "
                         "{\"prompt\", \"images\"} objects), served by continuous batching")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="an image for the prompt (repeatable): at each <|image|> in it, or before the text")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=50, help="0 = no top-k filter (default 50)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    parser.add_argument("--slots", type=int, default=8, help="concurrent sequences for --prompt-file (default 8)")
    parser.add_argument("--draft-checkpoint", help="a smaller model with the same tokenizer: speculative decoding")
    parser.add_argument("--speculate-k", type=int, default=4, help="tokens the draft proposes per round (default 4)")
    parser.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--dtype", choices=list(INFERENCE_DTYPES), default=None,
                        help="the weights' dtype: fp32, bf16, or int8 (one scale per output channel, fp32 "
                             "activations and cache); default bf16 on CUDA, fp32 on a CPU")
    parser.add_argument("--kv-int8", action="store_true",
                        help="keep the KV cache in int8, one scale per token and head (3.6x smaller at head dim 32)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step: for --prompt, ahead of time on a CPU (AOTInductor; ~15-30 s "
                             "to build, then 5-10x faster per token), with torch.compile on CUDA (~40 s for "
                             "base on an H200, then ~10x); for --prompt-file, the continuous-"
                             "batching steps of up to 16 rows (torch.compile; ~15 s, then ~2x the requests' "
                             "tokens/s): docs/benchmarks.md")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on error")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.image and args.prompt_file:
        parser.error("--image goes with --prompt; a prompt file names its images itself")
    if args.image and args.draft_checkpoint:
        parser.error("speculative decoding reads text only: --image and --draft-checkpoint exclude each other")
    launch(args)
    return 0


if __name__ == "__main__":
    run(main)

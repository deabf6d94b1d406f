"""Generate text from a trained MoE transformer.

Examples:
  python generate.py --prompt "def fibonacci(n):"                  from runs/small, streamed
  python generate.py --checkpoint runs/small --prompt "import" --temperature 0 --max-new-tokens 50
  python generate.py --prompt-file prompts.txt --slots 8           one prompt a line, continuous batching
  python generate.py --prompt "class" --draft-checkpoint runs/draft --speculate-k 4
  python generate.py --checkpoint runs/vision_small --image digits.png --temperature 0   caption an image
  python generate.py --checkpoint runs/vision_small --prompt-file prompts.jsonl
      one JSON object a line: {"prompt": "...", "images": ["a.png", ...]} (paths relative to the file)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


from moe.checkpoint import load_draft_for_inference, load_for_inference
from moe.cli import device_arg, run
from moe.engine import Engine, Request
from moe.image_data import prompt_with_images
from moe.sampling import SamplingParams, compile_decode_step, generate
from moe.speculative import SpeculativeStats, speculative_generate
from moe.tokenizer import EOT


def main(argv: list[str] | None = None) -> int:
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
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the one-token decode step (single prompts; slow to compile on a CPU)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on error")
    args = parser.parse_args(argv)

    if args.image and args.prompt_file:
        parser.error("--image goes with --prompt; a prompt file names its images itself")
    if args.image and args.draft_checkpoint:
        parser.error("speculative decoding reads text only: --image and --draft-checkpoint exclude each other")
    model, tokenizer = load_for_inference(args.checkpoint, args.device)
    decode_step = compile_decode_step(model) if args.compile else None
    eot = tokenizer.token_to_id(EOT)
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, (eot,), args.seed)
    encode = lambda text, images=(): prompt_with_images(tokenizer, text, list(images), model.cfg.vision)  # noqa: E731
    started = time.perf_counter()

    if args.prompt_file:
        texts, requests = read_prompt_file(Path(args.prompt_file), encode, params)
        results = Engine(model, args.slots).run(requests)
        for result in sorted(results, key=lambda r: r.id):
            print(f"--- {result.id}: {texts[result.id]}\n{texts[result.id]}{tokenizer.decode(result.tokens)}")
        n_tokens = sum(len(r.tokens) for r in results)
        report = f"{len(results)} requests"
    else:
        prompt, images = encode(args.prompt, args.image)
        stats = SpeculativeStats()
        if args.draft_checkpoint:
            draft = load_draft_for_inference(args.draft_checkpoint, tokenizer, args.device)
            tokens = speculative_generate(model, draft, prompt, params, args.speculate_k, stats)
        else:
            tokens = generate(model, prompt, params, decode_step, images=images)
        out, shown = [], ""
        print(args.prompt, end="", flush=True)
        for token in tokens:
            out.append(token)
            if args.stream:  # print the newly complete text; a split UTF-8 character waits for its rest
                text = tokenizer.decode(out)
                if not text.endswith("\ufffd"):
                    print(text[len(shown):], end="", flush=True)
                    shown = text
        print(tokenizer.decode(out)[len(shown):])
        n_tokens = len(out)
        report = "1 request"
        if args.draft_checkpoint:
            report += (f", speculative k={args.speculate_k}: acceptance {stats.acceptance_rate:.0%}, "
                       f"{stats.tokens_per_target_forward:.2f} tokens per target forward")
    seconds = time.perf_counter() - started
    print(f"[{report}, {n_tokens} tokens in {seconds:.2f} s, {n_tokens / seconds:.0f} tokens/s]", file=sys.stderr)
    return 0


def read_prompt_file(path: Path, encode, params: SamplingParams) -> tuple[list[str], list[Request]]:
    """Prompts as text, one a line; or, in a .jsonl file, {"prompt": text, "images": [paths]} a line."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts, requests = [], []
    for i, line in enumerate(lines):
        text, images = line, []
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
                text, images = str(record.get("prompt", "")), [path.parent / p for p in record.get("images", [])]
            except (json.JSONDecodeError, AttributeError, TypeError):
                raise ValueError(f"{path}:{i + 1}: expected a JSON object with \"prompt\" and optional \"images\"") from None
        prompt, pixels = encode(text, images)
        texts.append(text)
        requests.append(Request(prompt, params, id=i, images=pixels))
    return texts, requests


if __name__ == "__main__":
    run(main)

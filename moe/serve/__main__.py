"""python -m moe.serve --checkpoint RUN: an OpenAI-compatible server (moe/serve/api.py)."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from ..checkpoint import load_for_inference, resolve_checkpoint
from ..cli import device_arg, positive_int, run
from ..hardware import INFERENCE_DTYPES, inference_dtype
from ..infer.sampling import compile_decode_step

try:
    import uvicorn

    from .api import create_app
except ImportError as e:
    raise SystemExit(f"error: python -m moe.serve needs the serve extra ({e.name} is missing): "
                     f"pip install -e '.[serve]'") from None

EPILOG = """\
Any OpenAI client can talk to it:
  python -m moe.serve --checkpoint runs/small --port 8000
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "small", "prompt": "def f(x):", "max_tokens": 32, "temperature": 0}'
  python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-'); \\
print(c.chat.completions.create(model='small', messages=[{'role': 'user', 'content': 'Hi'}]).choices[0].message)"

SIGTERM (or Ctrl-C) stops accepting connections, finishes the requests in flight, then exits.
"""


def port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a port number, 0-65535")
    return int(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moe.serve", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run directory or checkpoint folder")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port, default=8000, help="default 8000; 0 = any free port (the log says which)")
    p.add_argument("--model-name", default=None, help="the name clients ask for (default: the run directory's name)")
    p.add_argument("--slots", type=positive_int, default=16, help="requests decoded together at most (default 16)")
    p.add_argument("--max-queue", type=positive_int, default=256,
                   help="requests that may wait for a slot; more are answered 429 with Retry-After (default 256)")
    p.add_argument("--step-tokens", type=positive_int, default=512,
                   help="tokens one engine step may process: a decoding row takes one, prompts are prefilled in "
                        "chunks within the rest (default 512)")
    p.add_argument("--static", action="store_true",
                   help="static batching (admit a new batch only when the whole last one has finished): the "
                        "baseline bench.py serve measures continuous batching against")
    p.add_argument("--dtype", choices=list(INFERENCE_DTYPES), default=None,
                   help="the weights' dtype: fp32, bf16, or int8 (fp32 activations); default bf16 on CUDA, fp32 on a CPU")
    p.add_argument("--kv-int8", action="store_true", help="keep the KV cache in int8")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode steps of up to 16 rows (torch.compile, built before the server "
                        "listens: ~15-30 s on a CPU; then ~2x the tokens/s at those batch sizes)")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="PyTorch's CPU threads (default: PyTorch's, one a core); fewer when clients share the machine")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = resolve_checkpoint(args.checkpoint)
    name = args.model_name or (folder.parent.parent.name if folder.parent.name == "checkpoints" else folder.name)
    model, tokenizer = load_for_inference(folder, args.device, inference_dtype(args.dtype, args.device), packed=True)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s", stream=sys.stderr)
    app = create_app(model, tokenizer, name, args.slots, args.max_queue, args.static, args.kv_int8, args.step_tokens,
                     compile_decode_step(model) if args.compile else None)
    logging.getLogger("moe.serve").info(
        "serving %s as %r: %d slots, queue %d, %s batching, step budget %d tokens, weights %s", folder, name,
        args.slots, args.max_queue, "static" if args.static else "continuous", args.step_tokens,
        str(next(model.parameters()).dtype).removeprefix("torch."))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)
    sock = config.bind_socket()  # bound here, so the port (with --port 0, any free one) is known and said
    print(f"moe.serve: listening on http://{args.host}:{sock.getsockname()[1]}", file=sys.stderr, flush=True)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    run(main)

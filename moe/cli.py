"""Shared command-line plumbing: config flags, dotted overrides, one-line errors."""

from __future__ import annotations

import argparse
import ctypes
import difflib
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path

import torch

from .config import Config, ConfigError, ModelConfig, load_config
from .model import MoETransformer

SECTIONS = tuple(f.name for f in fields(Config))


def add_config_args(parser: argparse.ArgumentParser, default: str = "small") -> None:
    parser.add_argument("--config", default=default,
                        help=f"a TOML file or a preset in configs/ (default: {default})")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on error")
    parser.epilog = ((parser.epilog or "") + " Any config field can be overridden with "
                     "--SECTION.KEY=VALUE, e.g. --model.n_layers=2 --model.dispatch=capacity.").strip()


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Config]:
    """Parse flags and load `--config` with the `--section.key=value` overrides applied."""
    args, overrides = split_overrides(parser, argv)
    return args, load_config(args.config, overrides)


def split_overrides(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Parse flags; `--section.key=value` (or `--section.key value`) come back as `section.key=value`."""
    args, rest = parser.parse_known_args(argv)
    overrides, unknown = [], []
    items = iter(rest)
    for item in items:
        key = item.removeprefix("--").split("=", 1)[0]
        section = key.split(".", 1)[0]
        if item.startswith("--") and section in SECTIONS and "." in key:
            overrides.append(item.removeprefix("--") if "=" in item else f"{key}={next(items, '')}")
        elif item.startswith("--") and "." in key and difflib.get_close_matches(section, SECTIONS, n=1):
            close = difflib.get_close_matches(section, SECTIONS, n=1)[0]
            raise ConfigError(f"unknown section {section} in --{key}; did you mean --{close}.{key.split('.', 1)[1]}?")
        else:
            unknown.append(item)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, overrides


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run `main`, turning expected failures into one line on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    keep_freed_memory()
    try:
        sys.exit(main(argv) or 0)
    except (ConfigError, ValueError, FileNotFoundError, OSError) as e:
        if "--debug" in argv:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def keep_freed_memory() -> bool:
    """Keep freed tensor memory in the process instead of handing it back to the kernel.

    Each training step frees and re-allocates the same large activations (the logits alone are
    B x T x V floats). With glibc's defaults big blocks go back to the kernel at once, and every
    re-allocation page-faults freshly zeroed pages: measured on the `small` model, cross-entropy
    ran 3x slower and a whole training step 15 % slower. As jemalloc or tcmalloc would, keep the
    memory (no mmap for large blocks, trim only above 1 GiB free). Returns False where glibc is
    not the allocator; MOE_KEEP_FREED_MEMORY=0 turns it off.
    """
    if os.environ.get("MOE_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    return bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) and libc.mallopt(M_MMAP_MAX, 0))


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec) per column."""
    header = [h for _, h, _ in columns]
    body = [[format(row[k], spec) for k, _, spec in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in body:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


def describe_model(cfg: ModelConfig) -> str:
    """One line: size, active size and FLOPs per token, from shapes only (built on `meta`)."""
    with torch.device("meta"):
        model = MoETransformer(cfg)
    counts = model.param_counts()
    line = (f"model: {_count(counts.total)} parameters, {_count(counts.active)} active per token "
            f"({cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads / {cfg.n_kv_heads} KV, "
            f"top-{cfg.top_k} of {cfg.n_experts} experts), "
            f"{_count(model.flops_per_token(), 'G', 'M')}FLOP per token forward at context {cfg.max_seq_len}")
    if cfg.vision is not None:
        line += (f"; vision branch {_count(counts.vision)} parameters ({len(model.vision.xattn)} gated "
                 f"cross-attention blocks, {cfg.vision.n_latents} visual tokens per image), "
                 f"{_count(model.flops_per_image(), 'G', 'M')}FLOP per image")
    return line


def _count(n: int, billion: str = "B", million: str = "M") -> str:
    return f"{n / 1e9:,.1f} {billion}" if n >= 1e9 else f"{n / 1e6:,.2f} {million}"


def device_arg(text: str) -> torch.device:
    """argparse type for --device: cpu, cuda or cuda:N, checked against this machine."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (expected cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} requested but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r} (expected cpu, cuda or cuda:N)")
    return device

"""Shared command-line plumbing: config flags, dotted overrides, argument types, one-line errors, tables."""

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
from typing import NoReturn

import torch
import torch.distributed as dist

from .config import Config, ConfigError, load_config

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


class Interrupted(Exception):
    """An orderly stop asked for by a signal (its work saved first); exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run `main`, turning expected failures into one line on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    keep_freed_memory()
    try:
        code = main(argv) or 0
    except Interrupted as e:
        print(e, file=sys.stderr)
        code = e.exit_code
    except (ConfigError, ValueError, FileNotFoundError, OSError) as e:
        if "--debug" in argv:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    leave(code)


def leave(code: int) -> NoReturn:
    """Exit with `code`; a process still in a gloo process group (torchrun on CPUs) without
    finalizing Python.

    gloo's worker threads release a collective's tensors a moment after the collective has
    returned, and releasing one that Python has let go of takes the GIL. If Python is finalizing
    by then, the thread is ended inside a destructor that may not throw and the process aborts
    ("terminate called without an active exception"): in 2 of 40 runs of `bench.py parallel`
    with a busy core beside it, 7 of 10 of a two-rank loop of all_gather_object. Destroying the
    group first helps only if nothing else holds it (DDP, FSDP, a DeviceMesh do). So such a
    process flushes its output and leaves at once: it holds nothing else to finalize (the
    checkpoints and metrics are closed, there are no threads of ours).
    """
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


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


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 1")
    return value


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: `1,2,4` -> (1, 2, 4), each >= 1."""
    return tuple(positive_int(x) for x in text.split(","))


def positive_float_list(text: str) -> tuple[float, ...]:
    """argparse type: `0.5,2` -> (0.5, 2.0), each > 0."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers") from None
    if min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: each must be > 0")
    return values


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

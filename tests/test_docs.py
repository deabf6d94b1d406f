"""The manual cannot drift: every flag, config key and file that README.md and docs/*.md mention exists."""

import argparse
import importlib.util
import re
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from moe.config import Config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TORCHRUN = {"--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_backend", "--rdzv_endpoint"}
TENSORBOARD = {"--logdir"}


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    found = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= option_strings(sub)
    return found


@pytest.fixture(scope="module")
def known_flags() -> set[str]:
    from moe.bench.commands import build_parser as bench
    from moe.experiments import build_parser as experiments
    from moe.hf import build_parser as hf
    from moe.serve.__main__ import parser as serve

    parsers = [load_script("train.py").build_parser(), load_script("generate.py").build_parser(), bench(), hf(),
               serve(), experiments()]
    return set().union(*map(option_strings, parsers)) | TORCHRUN | TENSORBOARD


def config_key_exists(dotted: str) -> bool:
    """`train.max_steps`, `model.vision.max_images`, `data.sources`: a field of the config dataclasses."""
    node = Config
    for part in dotted.split("."):
        if not is_dataclass(node):
            return False
        hints = typing.get_type_hints(node)
        if part not in {f.name for f in fields(node)}:
            return False
        node = next((t for t in typing.get_args(hints[part]) if is_dataclass(t)), hints[part])
    return True


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*(?:\.[a-z_][a-z0-9_.]*)?(?![\w.])")
FILES = r"(?!(?:py|md|json|safetensors|pt|npy|jsonl|toml)\b)"  # model.safetensors is a file, not a key
DOTTED = re.compile(rf"(?<![\w./-])(model|data|train)\.{FILES}([a-z_]+(?:\.[a-z_]+)*)(?![\w(])")
LINK = re.compile(r"\]\((?!https?://|#|mailto:)([^)#\s]+)[^)]*\)")  # [text](path#anchor), ![alt](path)
DELIBERATE = {"--model.n_layer", "model.n_layer"}  # the misspelled key of the error-message example


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_flag_the_manual_mentions_exists(page, known_flags):
    unknown = []
    for flag in FLAG.findall(page.read_text()):
        section = flag[2:].split(".", 1)[0]
        if "." in flag and section in ("model", "data", "train"):
            ok = config_key_exists(flag[2:])
        else:
            ok = flag in known_flags
        if not ok and flag not in DELIBERATE:
            unknown.append(flag)
    assert not unknown, f"{page.name} mentions flags that no command has: {sorted(set(unknown))}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_config_key_the_manual_mentions_exists(page):
    text = page.read_text()
    unknown = {".".join(m) for m in DOTTED.findall(text) if not config_key_exists(".".join(m))}
    # the reference tables: a `[section]`: line (or a `| `[section]` key |` header) and rows of keys;
    # a table headed `| key |` with no section named is [model]'s
    section = None
    for line in text.splitlines():
        named = re.match(r"^`\[(\w+(?:\.\w+)?)\]`:", line) or re.match(r"^\| `\[(\w+(?:\.\w+)?)\]` key \|", line)
        if named:
            section = named.group(1)
        elif line.startswith("| key |"):
            section = section or "model"
        elif line.startswith("#"):
            section = None
        row = re.match(r"^\| (`[a-z_]+`(?:, `[a-z_]+`)*) \|", line)
        if row and section:
            unknown |= {f"{section}.{key}" for key in re.findall(r"`([a-z_]+)`", row.group(1))
                        if not config_key_exists(f"{section}.{key}")}
    unknown -= DELIBERATE
    assert not unknown, f"{page.name} mentions config keys that do not exist: {sorted(unknown)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_file_the_manual_links_exists(page):
    missing = [target for target in LINK.findall(page.read_text()) if not (page.parent / target).exists()]
    assert not missing, f"{page.name} links to files that do not exist: {missing}"


def test_the_checks_can_fail():
    assert config_key_exists("model.vision.max_images") and config_key_exists("train.max_steps")
    assert not config_key_exists("model.n_layer") and not config_key_exists("train.max_steps.x")
    assert FLAG.findall("python train.py --model.n_layers=2 --resume") == ["--model.n_layers", "--resume"]
    assert LINK.findall("[a](docs/a.md#b), [c](https://d.org/e), ![f](img/f.png), [g](#h)") == ["docs/a.md", "img/f.png"]

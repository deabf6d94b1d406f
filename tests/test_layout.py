"""The package's shape: floors without upward imports or cycles, one kind per parameter, one
shape-letter legend."""

import ast
import re
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moe import MoETransformer, load_config
from moe.model.params import VISION, Kind, param_kind
from moe.shapes import LETTERS

PACKAGE = Path(__file__).resolve().parent.parent / "moe"

# What moe/__init__.py's docstring says, as data: a module imports only from its own floor or below.
FLOORS = {
    "moe.config": 0, "moe.costmodel": 0, "moe.tokenizer": 0, "moe.files": 0, "moe.shapes": 0, "moe.cli": 0,
    "moe.hardware": 0, "moe.model": 1, "moe.data": 2, "moe.checkpoint": 2, "moe.infer": 3, "moe.train": 4, "moe.serve": 4, "moe.bench": 5, "moe.hf": 5, "moe.plot": 5, "moe.experiments": 5,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> int:
    homes = [home for home in FLOORS if module == home or module.startswith(home + ".")]
    assert homes, f"{module} has no floor in tests/test_layout.py"
    return FLOORS[max(homes, key=len)]


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported moe module, line, whether inside a function) for every import of the package."""
    name, found = module_name(path), []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    local_lines = {n.lineno for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base == "moe" or base.startswith("moe."):
                for alias in node.names:  # `from . import checkpoint` imports a module
                    sub = f"{base}.{alias.name}"
                    target = sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() else base
                    found.append((target, node.lineno, node.lineno in local_lines))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno, node.lineno in local_lines) for a in node.names if a.name.startswith("moe.")]
    return found


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_from_a_floor_above_its_own(path):
    here = module_name(path)
    for target, line, _ in imports(path):
        assert floor(target) <= floor(here), f"{here}:{line} imports {target} from floor {floor(target)} above {floor(here)}"


def test_the_import_graph_has_no_cycle_and_no_hidden_import():
    graph = {module_name(p): {t for t, _, _ in imports(p)} for p in SOURCES}
    hidden = [f"{module_name(p)}:{line} {t}" for p in SOURCES for t, line, local in imports(p) if local]
    assert not hidden, f"imports of the package inside functions hide the graph: {hidden}"
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(path + [nxt])}"
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def presets():
    tiny = load_config("tiny").model
    yield from ((name, load_config(name).model) for name in ("tiny", "small", "dense_small", "base", "gpt4",
                                                               "vision_small"))
    yield "tiny, tied, moe_every=2", replace(tiny, tie_embeddings=True, moe_every=2)


@pytest.mark.parametrize("name, cfg", list(presets()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_parameter_of_every_preset_has_exactly_one_kind(name, cfg):
    with torch.device("meta"):
        model = MoETransformer(cfg)
    kinds = {param_kind(n) for n, _ in model.named_parameters()}  # raises unless exactly one rule matches
    assert Kind.EMBEDDING in kinds and Kind.ATTENTION in kinds and Kind.NORM in kinds
    assert (Kind.EXPERTS in kinds) == (cfg.n_experts > 1)
    assert bool(kinds & VISION) == (cfg.vision is not None)


def test_a_parameter_no_rule_knows_is_an_error_not_a_silent_default():
    assert param_kind("vision.xattn.0.attn_gate") == Kind.VISION_GATE
    assert param_kind("module.blocks.3.ffn.experts.w2") == Kind.EXPERTS  # inside DDP's wrapper
    for renamed in ("vision.xattn.0.attn_alpha", "blocks.0.attn.wqkv.weight", "blocks.0.ffn.shared.w1.weight"):
        with pytest.raises(KeyError, match="matches 0 rules"):
            param_kind(renamed)


SUFFIX = re.compile(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)*_([A-Z][A-Za-z0-9]*)\b")
TOKENS = re.compile("|".join(sorted(map(re.escape, LETTERS), key=len, reverse=True)))


def test_every_shape_suffix_is_spelled_from_the_one_legend():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for suffix in SUFFIX.findall(line):
                if TOKENS.sub("", suffix):
                    bad.append(f"{path.relative_to(PACKAGE)}:{number}: {suffix}")
    assert not bad, "shape letters not in moe/shapes.py: " + "; ".join(bad)


def test_the_install_ships_every_subpackage():
    setuptools = pytest.importorskip("setuptools")
    find = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    shipped = set(setuptools.find_packages(str(PACKAGE.parent), include=find["include"]))
    assert shipped == {module_name(p) for p in PACKAGE.rglob("__init__.py")}

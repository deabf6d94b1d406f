"""Checkpoints: self-contained folders, written atomically, verified before use.

    RUN_DIR/checkpoints/step-0000250/
        model.safetensors   weights (safetensors: loading runs no code)
        trainer.pt          step, token and sequence counters, optimizer state, RNG state
                            (tensors and plain containers only: loaded with weights_only=True)
        config.json         the resolved config of the run
        tokenizer.json
        manifest.json       size and sha256 of every file above, written last

A checkpoint is written into a hidden temporary folder, every file fsynced, then renamed into
place in one step, so a crash at any moment leaves either the whole new checkpoint or none of
it. Readers take the newest checkpoint whose files match its manifest and skip any other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from tokenizers import Tokenizer

from .config import Config, ConfigError, config_from_dict
from .files import atomic_folder
from .model import MoETransformer, activation_dtype, pack_for_inference
from .tokenizer import load_tokenizer

FILES = ("model.safetensors", "trainer.pt", "config.json", "tokenizer.json")
# Fault injection for the tests: a process that saves this step's checkpoint kills itself with
# SIGKILL halfway through writing it (the weights written, nothing else).
CRASH_ENV = "MOE_CRASH_DURING_CHECKPOINT"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupt; the message is one line."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, trainer_state: dict,
                    config: Config, tokenizer: Tokenizer, keep: int) -> Path:
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"  # a step saved again after a resume is replaced whole
    try:
        with atomic_folder(final) as tmp:
            save_model(model, str(tmp / "model.safetensors"))
            if os.environ.get(CRASH_ENV) == str(step):
                os.kill(os.getpid(), signal.SIGKILL)
            torch.save(trainer_state, tmp / "trainer.pt")
            (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
            (tmp / "tokenizer.json").write_text(tokenizer.to_str())
            manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in FILES}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    except OSError as e:  # a full disk, a quota, a vanished mount: stop, and say what is still good
        kept = latest_checkpoint(run_dir, warn=lambda _: None)
        raise CheckpointError(f"could not write checkpoint {final} ({e.strerror or e}); "
                              + (f"the last good one, {kept}, is intact" if kept else "no earlier checkpoint exists")
                              ) from None
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first (temporary folders excluded)."""
    root = checkpoint_dir(run_dir)
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def verify(folder: Path) -> str | None:
    """None if every file matches the manifest, else what is wrong."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "no readable manifest.json"
    for name in FILES:
        path, expected = folder / name, manifest.get(name)
        if expected is None or not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, expected {expected['bytes']}"
        if _sha256(path) != expected["sha256"]:
            return f"{name} checksum mismatch"
    return None


def latest_checkpoint(run_dir: Path, warn=print) -> Path | None:
    """The newest checkpoint that verifies; broken ones are reported and skipped."""
    for folder in reversed(list_checkpoints(run_dir)):
        problem = verify(folder)
        if problem is None:
            return folder
        warn(f"skipping checkpoint {folder}: {problem}")
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder meaning its newest good checkpoint."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        problem = verify(path)
        if problem:
            raise CheckpointError(f"checkpoint {path}: {problem}")
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file or directory")
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path}: no usable checkpoint in {checkpoint_dir(path)}")
    return found


def load_config_from(folder: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    try:
        return config_from_dict(json.loads((folder / "config.json").read_text()), overrides)
    except (ConfigError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None


def load_weights(folder: Path, model: torch.nn.Module, may_lack: Callable[[str], bool] | None = None) -> None:
    """The checkpoint's weights into `model`, every one of them, shapes checked.

    `may_lack(name)`: parameters the checkpoint need not hold; they keep their initial values
    (a text model's weights into a model with a new vision branch: `params.is_vision`).
    """
    try:
        missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False)
    except RuntimeError as e:  # shape mismatch, reported by torch on several lines
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{folder}: weights do not fit this model ({' '.join(l.strip() for l in first[:3])})") from None
    missing = sorted(k for k in missing if not (may_lack and may_lack(k)))
    if missing or unexpected:
        problems = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)} in all)"
                    for label, keys in (("missing", missing), ("unexpected", sorted(unexpected))) if keys]
        raise CheckpointError(f"{folder}: weights do not fit this model ({'; '.join(problems)})")


def load_trainer_state(folder: Path) -> dict:
    return torch.load(folder / "trainer.pt", weights_only=True)


def load_checkpoint_tokenizer(folder: Path) -> Tokenizer:
    return load_tokenizer(folder / "tokenizer.json")


def load_for_inference(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       packed: bool = False):
    """(model in eval mode, tokenizer) from a checkpoint folder or a run directory, for inference, its
    weights in `dtype` (the router and the norms still compute in fp32).

    `packed=True` lays the weights out for decoding (`model.packed`: fused w1/w3, int8 with scales,
    fast when compiled); int8 weights are always packed, with fp32 activations. Unpacked, the
    model holds exactly the checkpoint's parameters."""
    folder = resolve_checkpoint(path)
    model = MoETransformer(load_config_from(folder).model)
    load_weights(folder, model)
    model = model.to(device, activation_dtype(dtype)).eval()
    if packed or dtype == torch.int8:
        pack_for_inference(model, dtype)
    return model, load_checkpoint_tokenizer(folder)


def load_draft_for_inference(path: str | Path, tokenizer: Tokenizer, device: torch.device | str = "cpu",
                             dtype: torch.dtype = torch.float32, packed: bool = False):
    """A draft model for speculative decoding: refused unless it shares the target's tokenizer."""
    draft, draft_tokenizer = load_for_inference(path, device, dtype, packed)
    if draft_tokenizer.to_str() != tokenizer.to_str():
        raise CheckpointError(f"{path}: its tokenizer differs from the target's (a draft must share it)")
    return draft


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

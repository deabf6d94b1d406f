import io
import json
import runpy
import signal
import sys
import traceback
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from moe import ModelConfig, MoETransformer, load_config
from moe.train.trainer import RunOptions, Trainer

ROOT = Path(__file__).resolve().parent.parent


class Ran(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def entry_point(monkeypatch):
    """entry_point(*args): what `python *args` in the repository does (a script, or `-m MODULE`),
    run in this process: argv, working directory, stdout, stderr and the exit status as a child
    process would have them, without a second Python's start-up (most of a bad-input test's time).
    An exception that escapes prints its traceback and exits 1, as Python would."""
    def call(*args) -> Ran:
        args = [str(a) for a in args]
        module = args[1] if args[0] == "-m" else None
        monkeypatch.chdir(ROOT)
        monkeypatch.setenv("MOE_KEEP_FREED_MEMORY", "0")  # leave this process's allocator alone
        monkeypatch.setattr(sys, "argv", [module or args[0], *args[2 if module else 1:]])
        handlers, threads = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}, torch.get_num_threads()
        out, err, code = io.StringIO(), io.StringIO(), 0
        with redirect_stdout(out), redirect_stderr(err):
            try:
                if module:
                    with warnings.catch_warnings():  # that this process imported the module before is expected
                        warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
                        runpy.run_module(module, run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(str(ROOT / args[0]), run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except Exception:  # noqa: BLE001 - what an uncaught exception does to a process
                traceback.print_exc()
                code = 1
        for number, handler in handlers.items():
            signal.signal(number, handler)
        torch.set_num_threads(threads)
        return Ran(code, out.getvalue(), err.getvalue())

    return call


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny() -> ModelConfig:
    return load_config("tiny").model


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run directory: the tiny model trained for 3 steps, with its tokenizer (for the commands' tests)."""
    out = tmp_path_factory.mktemp("tiny_run")
    cfg = load_config("tiny", [f"data.cache_dir={json.dumps(str(out / 'cache'))}", "data.sources={docs = 1}",
                               "train.max_steps=3", "train.sample_tokens=0", "train.eval_batches=1"])
    Trainer(cfg, RunOptions(out / "run", torch.device("cpu"), peak_flops=1e11, quiet=True)).train()
    return out / "run"


@pytest.fixture
def noisy_copy():
    """noisy_copy(model, scale): a draft that agrees with the target often but not always (its
    weights plus noise of `scale` times each tensor's std; 0 = an exact copy)."""
    def make(model, scale: float) -> MoETransformer:
        copy = MoETransformer(model.cfg).eval()
        copy.load_state_dict(model.state_dict())
        with torch.no_grad():
            for p in copy.parameters():
                p.add_(torch.randn_like(p) * scale * p.std())
        return copy

    return make

import json
from pathlib import Path

import pytest
import torch

from moe import ModelConfig, MoETransformer, load_config
from moe.train.trainer import RunOptions, Trainer


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

import pytest
import torch

from moe import ModelConfig, MoETransformer, load_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny() -> ModelConfig:
    return load_config("tiny").model



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

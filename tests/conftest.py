import pytest
import torch

from moe import ModelConfig, load_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny() -> ModelConfig:
    return load_config("tiny").model


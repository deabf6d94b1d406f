"""moe: a small, readable GPT-4-style Mixture-of-Experts transformer.

The package reads floor by floor; each floor imports only from the floors below it:

    0  config, costmodel, tokenizer, files, shapes   plain Python (costmodel and config need no torch)
       cli, hardware                                 command-line plumbing, the machine's roofline
    1  model/                                        the transformer, routing, dispatch, experts, vision
    2  data/, checkpoint                             text and image-caption data; checkpoints on disk
    3  infer/                                        sampling, continuous batching, speculative decoding
    4  train/                                        the trainer, distributed layouts
       serve/                                        the OpenAI-compatible server (python -m moe.serve)
    5  bench/, hf, plot, experiments                 benchmarks and claims, Hugging Face interop, run plots,
                                                     experiments

The public API below is imported on first use, so `import moe.costmodel` works without torch.
"""

import importlib

from .config import Config, ConfigError, ModelConfig, load_config

_LAZY = {
    "model": ("KVCache", "MoE", "MoEOutput", "ModelOutput", "MoETransformer", "ParamCounts", "RouterStats", "SwiGLU",
              "moe_reference"),
    "model.routing": ("Dispatch", "Routing", "expert_capacity", "load_balancing_loss", "plan_dispatch", "route",
                      "router_z_loss"),
}
_HOME = {name: module for module, names in _LAZY.items() for name in names}

__all__ = ["Config", "ConfigError", "ModelConfig", "load_config", *_HOME]


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module 'moe' has no attribute {name!r}")

"""moe: a small, readable GPT-4-style Mixture-of-Experts transformer.

The configs and the cost model (`moe.config`, `moe.costmodel`) are plain Python; everything that
needs torch is imported on first use, so `import moe.costmodel` works on a machine without it.
"""

import importlib

from .config import Config, ConfigError, ModelConfig, load_config

_LAZY = {
    "experts": ("MoE", "MoEOutput", "RouterStats", "SwiGLU", "moe_reference"),
    "model": ("ModelOutput", "MoETransformer", "ParamCounts"),
    "routing": ("Dispatch", "Routing", "expert_capacity", "load_balancing_loss", "plan_dispatch", "route",
                "router_z_loss"),
}
_HOME = {name: module for module, names in _LAZY.items() for name in names}

__all__ = ["Config", "ConfigError", "ModelConfig", "load_config", *_HOME]


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module 'moe' has no attribute {name!r}")

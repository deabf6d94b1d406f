"""moe: a small, readable GPT-4-style Mixture-of-Experts transformer."""

from .config import Config, ConfigError, ModelConfig, load_config
from .experts import MoE, MoEOutput, RouterStats, SwiGLU, moe_reference
from .model import ModelOutput, MoETransformer, ParamCounts
from .routing import Dispatch, Routing, expert_capacity, load_balancing_loss, plan_dispatch, route, router_z_loss

__all__ = [
    "Config", "ConfigError", "ModelConfig", "load_config",
    "MoE", "MoEOutput", "RouterStats", "SwiGLU", "moe_reference",
    "ModelOutput", "MoETransformer", "ParamCounts",
    "Dispatch", "Routing", "expert_capacity", "load_balancing_loss", "plan_dispatch", "route", "router_z_loss",
]

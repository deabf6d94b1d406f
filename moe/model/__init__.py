"""The model, floor 1: built from configs, knows nothing of data, training or inference loops.

    norm, attention, kv_cache       RMSNorm, rotary multi-query attention, the key/value cache
    routing                         the router math and its losses (pure functions)
    experts, dispatch, moe_layer    the experts, taking tokens to them and back, the MoE layer
    vision                          the Flamingo-style branch
    packed                          weights laid out for inference (fp32, bf16, int8) and fast decoding
    tensor_parallel                 every layer divided among the ranks of a DeviceMesh (Megatron-style)
    params                          what each parameter is (init, counts, freezing, groups)
    transformer                     the whole model
"""

from .dispatch import RouterStats
from .experts import SwiGLU, moe_reference
from .kv_cache import KVCache
from .moe_layer import MoE, MoEOutput
from .packed import activation_dtype, pack_for_inference
from .transformer import ModelOutput, MoETransformer, ParamCounts, describe

__all__ = ["KVCache", "ModelOutput", "MoE", "MoEOutput", "MoETransformer", "ParamCounts", "RouterStats", "SwiGLU",
           "activation_dtype", "describe", "moe_reference", "pack_for_inference"]

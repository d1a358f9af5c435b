"""gpt-oss (20b, 120b): grouped-query attention with bias on q/k/v/o and a learned sink logit per head, a sliding
window on alternate layers (`layer_types`), YaRN RoPE; every layer MoE: softmax over the top-k of the router's
biased logits, experts stored as whole-layer transposed tensors with gate and up interleaved along 2I, biases on
all three projections, and the clamped SwiGLU ((clamp(up, +-limit) + 1) * g * sigmoid(alpha * g), g clamped
from above) as the experts' activation.

Missing keys take transformers' GptOssConfig defaults, so a config.json means what it means there.
"""
from __future__ import annotations

from typing import Any

from ..config import ExpertActivation, ModelConfig, RouterConfig
from . import Architecture, CheckpointNames
from .common import common_fields, first_present, sliding_windows

# GptOssConfig's rope when config.json gives none.
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}


def layer_types(hf: dict[str, Any], num_layers: int) -> list[str]:
    """`layer_types` as given, else as GptOssConfig derives them: sliding on even layers, full on odd ones."""
    return hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                     for i in range(num_layers)]


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    if not (hf.get("rope_parameters") or hf.get("rope_scaling")):
        hf = {**hf, "rope_parameters": {**DEFAULT_ROPE, "rope_theta": hf.get("rope_theta", 150000.0)}}
    defaults = {"hidden_size": 2880, "num_attention_heads": 64, "num_hidden_layers": 36, "vocab_size": 201088}
    fields = common_fields({**defaults, **hf}, rms_norm_eps=1e-5, max_position_embeddings=131072,
                           rope_theta=150000.0)
    fields["head_dim"] = hf.get("head_dim") or 64
    fields["num_key_value_heads"] = hf.get("num_key_value_heads") or 8
    layers = fields["num_hidden_layers"]
    intermediate = first_present(hf, "intermediate_size", default=2880)
    windowed = {"sliding_window": hf.get("sliding_window", 128), "layer_types": layer_types(hf, layers)}
    bias = bool(hf.get("attention_bias", True))
    return ModelConfig(
        **fields,
        model_type="gpt_oss",
        router=RouterConfig(num_experts=first_present(hf, "num_local_experts", "num_experts", default=128),
                            top_k=first_present(hf, "num_experts_per_tok", default=4), norm_topk_prob=True),
        moe_intermediate_size=intermediate,
        intermediate_size=intermediate,
        moe_layers=(True,) * layers,
        attention_bias=bias,
        attention_output_bias=bias,
        attention_sinks=True,
        sliding_windows=sliding_windows(windowed, layers),
        router_bias=True,
        expert_bias=True,
        expert_activation=ExpertActivation("clamped_swiglu", alpha=float(hf.get("swiglu_alpha", 1.702)),
                                           limit=float(hf.get("swiglu_limit", 7.0))),
    )


ARCH = Architecture("gpt_oss", config_from_hf, CheckpointNames(router="router", fused_experts="interleaved"))

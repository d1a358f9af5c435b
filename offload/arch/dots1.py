"""dots.llm1 (dots1): Qwen3's attention (per-head q/k RMSNorm, full RoPE) with DeepSeek-V3's MoE (sigmoid scores,
e_score_correction_bias for selection, top-2-sum group limit, weights x routed_scaling_factor, shared experts), the
first `first_k_dense_replace` layers dense, and Qwen2's sliding window on the layers from `max_window_layers` on.

Missing keys take transformers' Dots1Config defaults, so a config.json means what it means there.
"""
from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from . import Architecture, CheckpointNames
from .common import common_fields, require, sigmoid_group_router, sliding_windows


def layer_types(hf: dict[str, Any], num_layers: int) -> list[str]:
    """`layer_types` as given, else as Dots1Config derives it: sliding from `max_window_layers` on, when there is a
    window (published configs give `sliding_window: null`)."""
    if hf.get("layer_types"):
        return hf["layer_types"]
    window = hf.get("sliding_window", 4096)
    first_sliding = hf.get("max_window_layers", 62)
    return ["sliding_attention" if window is not None and i >= first_sliding else "full_attention"
            for i in range(num_layers)]


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    fields = common_fields(hf, rms_norm_eps=1e-6, max_position_embeddings=2048)
    layers = fields["num_hidden_layers"]
    dense = hf.get("first_k_dense_replace") or 0
    moe_intermediate = require(hf, "moe_intermediate_size")
    windowed = {"sliding_window": hf.get("sliding_window", 4096), "layer_types": layer_types(hf, layers)}
    return ModelConfig(
        **fields,
        model_type="dots1",
        router=sigmoid_group_router(hf, norm_topk_prob=False),
        moe_intermediate_size=moe_intermediate,
        intermediate_size=require(hf, "intermediate_size"),
        moe_layers=tuple(i >= dense for i in range(layers)),
        attention_bias=hf.get("attention_bias", False),
        attention_output_bias=hf.get("attention_bias", False),  # Qwen3's attention puts it on o_proj as well
        qk_norm="head",
        sliding_windows=sliding_windows(windowed, layers),
        shared_intermediate_size=moe_intermediate * require(hf, "n_shared_experts"),
    )


ARCH = Architecture("dots1", config_from_hf, CheckpointNames(shared="shared_experts"))

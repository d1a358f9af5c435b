"""Qwen2-MoE: q/k/v bias, a shared expert scaled by sigmoid(shared_expert_gate(x)), sparse-layer spacing."""
from __future__ import annotations

from typing import Any

from ..config import ModelConfig, RouterConfig
from . import Architecture, CheckpointNames
from .common import common_fields, require, require_first, sliding_windows


def qwen_moe_layers(hf: dict[str, Any], num_layers: int, num_experts: int) -> tuple[bool, ...]:
    """A layer is sparse unless listed in `mlp_only_layers` or off the `decoder_sparse_step` grid."""
    dense = set(hf.get("mlp_only_layers") or [])
    step = hf.get("decoder_sparse_step", 1) or 1
    return tuple(i not in dense and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers))


def qwen_moe_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """What Qwen2-MoE and Qwen3-MoE share: routing, expert sizes and the sparse-layer rules."""
    fields = common_fields(hf, rms_norm_eps=1e-6, max_position_embeddings=32768)
    layers = fields["num_hidden_layers"]
    experts = require_first(hf, "num_experts", "num_local_experts")
    return dict(
        **fields,
        router=RouterConfig(
            num_experts=experts,
            top_k=require(hf, "num_experts_per_tok"),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        ),
        moe_intermediate_size=require(hf, "moe_intermediate_size"),
        intermediate_size=require(hf, "intermediate_size"),
        moe_layers=qwen_moe_layers(hf, layers, experts),
        sliding_windows=sliding_windows(hf, layers),
    )


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    return ModelConfig(
        **qwen_moe_fields(hf),
        model_type="qwen2_moe",
        attention_bias=hf.get("qkv_bias", True),
        shared_intermediate_size=hf.get("shared_expert_intermediate_size") or 0,
        shared_expert_gate=True,
    )


ARCH = Architecture("qwen2_moe", config_from_hf, CheckpointNames(shared="shared_expert"))

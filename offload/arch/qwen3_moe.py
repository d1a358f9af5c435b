"""Qwen3-MoE: per-head q/k RMSNorm, an explicit head_dim, no shared expert."""
from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from . import Architecture, CheckpointNames
from .qwen2_moe import qwen_moe_fields


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    return ModelConfig(
        **qwen_moe_fields(hf),
        model_type="qwen3_moe",
        attention_bias=hf.get("attention_bias", False),
        attention_output_bias=hf.get("attention_bias", False),  # transformers' Qwen3 attention biases o_proj too
        qk_norm="head",
    )


ARCH = Architecture("qwen3_moe", config_from_hf, CheckpointNames())

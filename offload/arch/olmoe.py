"""OLMoE: q/k RMSNorm over the full projection width, optional clip_qkv, no renormalisation by default."""
from __future__ import annotations

from typing import Any

from ..config import ModelConfig, RouterConfig
from . import Architecture, CheckpointNames
from .common import common_fields, require, require_first


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    fields = common_fields(hf, rms_norm_eps=1e-5, max_position_embeddings=4096)
    layers = fields["num_hidden_layers"]
    return ModelConfig(
        **fields,
        model_type="olmoe",
        router=RouterConfig(
            num_experts=require_first(hf, "num_experts", "num_local_experts"),
            top_k=require(hf, "num_experts_per_tok"),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        ),
        moe_intermediate_size=require(hf, "intermediate_size"),
        intermediate_size=require(hf, "intermediate_size"),
        moe_layers=(True,) * layers,
        attention_bias=hf.get("attention_bias", False),
        qk_norm="full",
        clip_qkv=hf.get("clip_qkv"),
        sliding_windows=(None,) * layers,
    )


ARCH = Architecture("olmoe", config_from_hf, CheckpointNames())

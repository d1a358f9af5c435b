"""GLM-4.5 / 4.5-Air / 4.6 / 4.7: grouped-query attention with q/k/v bias, optional per-head q/k RMSNorm and
partial RoPE (half of each head by default), DeepSeek-V3 routing (sigmoid scores, e_score_correction_bias for
selection, top-2-sum group limit, normalised weights x routed_scaling_factor), shared experts, the first
`first_k_dense_replace` layers dense, and multi-token-prediction layers after the last layer, skipped.

Missing keys take transformers' Glm4MoeConfig defaults, so a config.json means what it means there.
"""
from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from . import Architecture, CheckpointNames
from .common import common_fields, first_present, partial_rotary_dim, require, sigmoid_group_router


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    fields = common_fields(hf, rms_norm_eps=1e-5, max_position_embeddings=131072)
    layers = fields["num_hidden_layers"]
    dense = hf.get("first_k_dense_replace", 1)
    moe_intermediate = require(hf, "moe_intermediate_size")
    return ModelConfig(
        **fields,
        model_type="glm4_moe",
        router=sigmoid_group_router(hf),
        moe_intermediate_size=moe_intermediate,
        intermediate_size=require(hf, "intermediate_size"),
        moe_layers=tuple(i >= dense for i in range(layers)),
        attention_bias=hf.get("attention_bias", False),
        qk_norm="head" if hf.get("use_qk_norm") else None,
        sliding_windows=(None,) * layers,
        rotary_dim=partial_rotary_dim(hf, fields["head_dim"], default_factor=0.5),
        shared_intermediate_size=moe_intermediate * hf.get("n_shared_experts", 1),
        num_extra_layers=first_present(hf, "num_nextn_predict_layers", "num_mtp_layers", default=1),
    )


ARCH = Architecture("glm4_moe", config_from_hf, CheckpointNames(shared="shared_experts"))

"""Mixtral: softmax router over all experts, top-k, renormalised; experts named w1 (gate), w3 (up), w2 (down)."""
from __future__ import annotations

from typing import Any

from ..config import ModelConfig, RouterConfig
from . import Architecture, CheckpointNames
from .common import common_fields, require, require_first, sliding_windows


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    fields = common_fields(hf, rms_norm_eps=1e-5, max_position_embeddings=32768)
    layers = fields["num_hidden_layers"]
    return ModelConfig(
        **fields,
        model_type="mixtral",
        router=RouterConfig(
            num_experts=require_first(hf, "num_local_experts", "num_experts"),
            top_k=require(hf, "num_experts_per_tok"),
            norm_topk_prob=True,
        ),
        moe_intermediate_size=require(hf, "intermediate_size"),
        intermediate_size=require(hf, "intermediate_size"),
        moe_layers=(True,) * layers,
        sliding_windows=sliding_windows(hf, layers),
    )


ARCH = Architecture("mixtral", config_from_hf, CheckpointNames(moe="block_sparse_moe", expert_proj=("w1", "w3", "w2")))

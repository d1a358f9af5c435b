"""MiniMax-M2 / M2.1 / M2.5: grouped-query attention with q/k RMSNorm over the full projection width and partial
RoPE (`rotary_dim` of each head), Mixtral's `block_sparse_moe` with w1/w3/w2 experts, routed by sigmoid scores
with an `e_score_correction_bias` (kept beside the gate) that steers selection only, weights renormalised.
Multi-token-prediction modules after the last layer are skipped.

Missing keys take transformers' MiniMaxM2Config defaults, so a config.json means what it means there.
"""
from __future__ import annotations

from typing import Any

from ..config import ModelConfig, RouterConfig
from ..errors import CheckpointError
from . import Architecture, CheckpointNames
from .common import common_fields, partial_rotary_dim, require, require_first

FULL_ATTENTION = 1  # attn_type_list: 1 full softmax attention, 0 MiniMax-Text-01's lightning (linear) attention


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    check_published_fields(hf)
    fields = common_fields(hf, rms_norm_eps=1e-6, max_position_embeddings=196608, rope_theta=5e6)
    layers, head_dim = fields["num_hidden_layers"], fields["head_dim"]
    # transformers reads partial_rotary_factor first (rope_parameters, then top level); the published files give
    # only the older `rotary_dim`, which it turns into that factor.
    rotary = hf.get("rotary_dim")
    return ModelConfig(
        **fields,
        model_type="minimax_m2",
        router=RouterConfig(
            num_experts=require_first(hf, "num_local_experts", "num_experts"),
            top_k=require(hf, "num_experts_per_tok"),
            scoring="sigmoid",
            norm_topk_prob=True,
            has_correction_bias=True,
        ),
        moe_intermediate_size=require(hf, "intermediate_size"),
        intermediate_size=require(hf, "intermediate_size"),
        moe_layers=(True,) * layers,
        qk_norm="full",  # transformers normalises q and k whatever `use_qk_norm` says
        sliding_windows=(None,) * layers,
        rotary_dim=partial_rotary_dim(hf, head_dim, default_factor=rotary / head_dim if rotary else 1.0),
        num_extra_layers=hf.get("num_mtp_modules") or 0,
    )


def check_published_fields(hf: dict[str, Any]) -> None:
    """Keys of the published config.json that transformers' MiniMax-M2 does not read: each must have the value
    the model it builds assumes, else running it would silently be a different model."""
    attn_types = hf.get("attn_type_list") or []
    if any(kind != FULL_ATTENTION for kind in attn_types):
        linear = [i for i, kind in enumerate(attn_types) if kind != FULL_ATTENTION]
        raise CheckpointError(f"attn_type_list marks layers {linear} as linear (lightning) attention; minimax_m2 "
                              "runs full attention only (all entries 1)")
    for key, expected in (("scoring_func", "sigmoid"), ("qk_norm_type", "per_layer"), ("shared_intermediate_size", 0)):
        if hf.get(key) not in (None, expected):
            raise CheckpointError(f"config.json has {key} {hf[key]!r}; minimax_m2 supports only {expected!r} "
                                  "(as transformers' MiniMaxM2 model)")


ARCH = Architecture("minimax_m2", config_from_hf,
                    CheckpointNames(moe="block_sparse_moe", expert_proj=("w1", "w3", "w2"),
                                    correction_bias="e_score_correction_bias"))

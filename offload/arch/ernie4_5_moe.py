"""ERNIE-4.5 MoE (21B-A3B, 300B-A47B): grouped-query attention with RoPE over adjacent channel pairs, `use_bias` on
the attention, dense/shared MLP and LM-head projections (never on the routed experts), MoE layers from
`moe_layer_start_index` to `moe_layer_end_index` every `moe_layer_interval`, softmax routing whose statistics bias
(`moe_statics.e_score_correction_bias`, stored [1, E]) steers selection only, weights renormalised with the
`moe_norm_min` floor, and shared experts. Multi-token-prediction tensors (`mtp_*`) are skipped.

Missing keys take transformers' Ernie4_5_MoeConfig defaults, so a config.json means what it means there.
"""
from __future__ import annotations

from typing import Any

from ..config import ModelConfig, RouterConfig
from ..errors import CheckpointError
from . import Architecture, CheckpointNames
from .common import common_fields, first_present


def moe_layers(hf: dict[str, Any], num_layers: int) -> tuple[bool, ...]:
    """Layer i is sparse when start <= i <= end and (i + 1) % interval == 0 (end -1: the last layer)."""
    start = first_present(hf, "moe_layer_start_index", default=1)
    end = first_present(hf, "moe_layer_end_index", default=-1)
    interval = first_present(hf, "moe_layer_interval", default=1)
    if isinstance(start, list) or isinstance(end, list):
        raise CheckpointError("moe_layer_start_index / moe_layer_end_index lists (ERNIE-4.5-VL's two expert sets) "
                              "are not supported; ernie4_5_moe takes one index each")
    end = num_layers - 1 if end == -1 else end
    return tuple(start <= i <= end and (i + 1) % interval == 0 for i in range(num_layers))


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    fields = common_fields(hf, rms_norm_eps=1e-5, max_position_embeddings=131072, rope_theta=500000.0)
    fields["tie_word_embeddings"] = hf.get("tie_word_embeddings", True)
    layers = fields["num_hidden_layers"]
    moe_intermediate = first_present(hf, "moe_intermediate_size", default=1536)
    use_bias = bool(hf.get("use_bias", False))
    return ModelConfig(
        **fields,
        model_type="ernie4_5_moe",
        router=RouterConfig(
            num_experts=first_present(hf, "moe_num_experts", "num_experts", default=64),
            top_k=first_present(hf, "moe_k", "num_experts_per_tok", default=6),
            norm_topk_prob=True,
            has_correction_bias=True,
            norm_min=float(first_present(hf, "moe_norm_min", default=1e-12)),
        ),
        moe_intermediate_size=moe_intermediate,
        intermediate_size=first_present(hf, "intermediate_size", default=12288),
        moe_layers=moe_layers(hf, layers),
        attention_bias=use_bias,
        attention_output_bias=use_bias,
        mlp_bias=use_bias,
        lm_head_bias=use_bias,
        sliding_windows=(None,) * layers,
        rope_interleaved=True,
        shared_intermediate_size=moe_intermediate * first_present(hf, "moe_num_shared_experts", default=2),
    )


ARCH = Architecture("ernie4_5_moe", config_from_hf,
                    CheckpointNames(shared="shared_experts", correction_bias="moe_statics.e_score_correction_bias",
                                    correction_bias_rows=1),
                    unused=("model.mtp_",))

"""Hunyuan-A13B (hunyuan_v1_moe): grouped-query attention whose per-head q/k RMSNorms (`query_layernorm`,
`key_layernorm`) apply to the rotated q and k, optional bias on q/k/v/o, RoPE stretched by a fixed NTK `alpha`,
every layer MoE: softmax top-k routing by `gate.wg`, renormalised, plus a shared MLP (`shared_mlp`) of the same
`intermediate_size` as each routed expert.

Missing keys take transformers' HunYuanMoEV1Config defaults, so a config.json means what it means there; like
transformers, the published per-layer lists (`moe_intermediate_size`, `num_shared_expert`) are not read, while a
`moe_topk` list gives each layer its own top-k.
"""
from __future__ import annotations

from typing import Any

from ..config import ModelConfig, RouterConfig
from ..errors import CheckpointError
from . import Architecture, CheckpointNames
from .common import common_fields, first_present, require


def ntk_alpha_theta(hf: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """config.json with a `dynamic` rope that gives a fixed `alpha` rewritten as the default rope it is: transformers'
    ntk_alpha scaling only stretches the base, theta * alpha ** (d / (d - 2)), whatever the sequence length."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = params.get("rope_type") or params.get("type")
    if kind != "dynamic" or not params.get("alpha"):
        return hf
    theta = float(first_present(params, "rope_theta", default=hf.get("rope_theta", 10000.0)))
    stretched = theta * float(params["alpha"]) ** (head_dim / (head_dim - 2))
    return {**hf, "rope_parameters": {"rope_type": "default", "rope_theta": stretched}, "rope_scaling": None}


def one_per_model(hf: dict[str, Any], key: str, default: Any) -> int:
    """A count config.json may give per layer (a list): one value for every layer, else an error."""
    value = first_present(hf, key, default=default)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise CheckpointError(f"config.json's {key} differs between layers ({sorted(set(value))}); "
                                  "hunyuan_v1_moe supports one value for every layer")
        value = value[0]
    return int(value)


def top_k_by_layer(hf: dict[str, Any], layers: int) -> tuple[int, ...]:
    """`moe_topk` for every layer: one value, or a list of one per layer (as HunYuanMoEV1Gate reads it)."""
    value = first_present(hf, "moe_topk", default=1)
    if not isinstance(value, list):
        return (int(value),) * layers
    if len(value) != layers:
        raise CheckpointError(f"config.json's moe_topk lists {len(value)} values for {layers} layers; give one per "
                              "layer or a single number")
    return tuple(int(k) for k in value)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("use_cla"):
        raise CheckpointError("config.json sets use_cla (cross-layer KV sharing), which hunyuan_v1_moe does not run; "
                              "as in transformers, every layer must have its own K/V (use_cla false)")
    head_dim = hf.get("head_dim") or require(hf, "hidden_size") // require(hf, "num_attention_heads")
    fields = common_fields(ntk_alpha_theta(hf, head_dim), rms_norm_eps=1e-5, max_position_embeddings=2048)
    layers = fields["num_hidden_layers"]
    intermediate = first_present(hf, "intermediate_size", default=11008)
    bias = bool(hf.get("attention_bias", False))
    top_k = top_k_by_layer(hf, layers)
    return ModelConfig(
        **fields,
        model_type="hunyuan_v1_moe",
        router=RouterConfig(num_experts=one_per_model(hf, "num_experts", 1), top_k=max(top_k), norm_topk_prob=True),
        layer_top_k=top_k if len(set(top_k)) > 1 else (),
        moe_intermediate_size=intermediate,  # transformers sizes the routed experts by intermediate_size
        intermediate_size=intermediate,
        moe_layers=(True,) * layers,
        attention_bias=bias,
        attention_output_bias=bias,
        qk_norm="head",
        qk_norm_after_rope=True,
        sliding_windows=(None,) * layers,
        shared_intermediate_size=intermediate,
    )


ARCH = Architecture("hunyuan_v1_moe", config_from_hf,
                    CheckpointNames(router="gate.wg", shared="shared_mlp",
                                    qk_norm=("query_layernorm", "key_layernorm")))

"""Qwen3-Next: Gated DeltaNet linear-attention layers interleaved with full attention (`layer_types`, or every
`full_attention_interval`-th layer), whose q_proj also yields an output gate; partial RoPE (a quarter of each head
by default), per-head q/k norm, zero-centred (1 + w) RMSNorm, a sigmoid-gated shared expert. Qwen3.5's text model
(arch/qwen3_5_moe.py) shares all of it but the projections' layout and the routing switches."""
from __future__ import annotations

from typing import Any

from ..config import LinearAttentionConfig, ModelConfig, RouterConfig
from ..errors import CheckpointError
from . import Architecture, CheckpointNames
from .common import common_fields, partial_rotary_dim, require
from .qwen2_moe import qwen_moe_layers

LAYER_KINDS = ("linear_attention", "full_attention")
NAMES = CheckpointNames(shared="shared_expert")
UNUSED = ("mtp.",)  # the multi-token-prediction module published checkpoints ship


def layer_kinds(hf: dict[str, Any], num_layers: int) -> tuple[str, ...]:
    """Per layer "linear_attention" or "attention": `layer_types`, else full attention every
    `full_attention_interval`-th layer (4 when config.json gives neither, as transformers does)."""
    types = hf.get("layer_types")
    if types is None:
        interval = hf.get("full_attention_interval") or 4
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)]
    if len(types) != num_layers or any(kind not in LAYER_KINDS for kind in types):
        raise CheckpointError(f"config.json layer_types must give 'linear_attention' or 'full_attention' for each of "
                              f"the {num_layers} layers, got {types!r}")
    return tuple("linear_attention" if kind == "linear_attention" else "attention" for kind in types)


def linear_attention(hf: dict[str, Any], projections: str) -> LinearAttentionConfig:
    cfg = LinearAttentionConfig(
        num_key_heads=require(hf, "linear_num_key_heads"), num_value_heads=require(hf, "linear_num_value_heads"),
        key_head_dim=require(hf, "linear_key_head_dim"), value_head_dim=require(hf, "linear_value_head_dim"),
        conv_kernel=hf.get("linear_conv_kernel_dim") or 4, projections=projections)
    if cfg.num_value_heads % cfg.num_key_heads:
        raise CheckpointError(f"linear_num_value_heads {cfg.num_value_heads} is not a multiple of "
                              f"linear_num_key_heads {cfg.num_key_heads}; the checkpoint's config.json is inconsistent")
    return cfg


def hybrid_fields(hf: dict[str, Any], projections: str) -> dict[str, Any]:
    """What Qwen3-Next and Qwen3.5 share: the hybrid stack, gated attention, norms, the gated shared expert."""
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json has hidden_act {hf['hidden_act']!r}; {hf.get('model_type')} supports "
                              "only 'silu'")
    fields = common_fields(hf, rms_norm_eps=1e-6, max_position_embeddings=32768)
    head_dim = hf.get("head_dim") or 256  # transformers' default for both families
    layers = fields["num_hidden_layers"]
    fields.update(head_dim=head_dim)
    return dict(
        **fields,
        layer_kinds=layer_kinds(hf, layers),
        linear_attention=linear_attention(hf, projections),
        attention_output_gate=True,
        zero_centred_norm=True,
        qk_norm="head",
        rotary_dim=partial_rotary_dim(hf, head_dim, default_factor=0.25),
        attention_bias=hf.get("attention_bias", False),
        attention_output_bias=hf.get("attention_bias", False),
        sliding_windows=(None,) * layers,
        moe_intermediate_size=require(hf, "moe_intermediate_size"),
        shared_intermediate_size=hf.get("shared_expert_intermediate_size") or 0,
        shared_expert_gate=True,
    )


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    fields = hybrid_fields(hf, projections="qkvz_ba")
    experts = require(hf, "num_experts")
    return ModelConfig(
        **fields,
        model_type="qwen3_next",
        router=RouterConfig(num_experts=experts, top_k=require(hf, "num_experts_per_tok"),
                            norm_topk_prob=bool(hf.get("norm_topk_prob", True))),
        intermediate_size=hf.get("intermediate_size") or 0,
        moe_layers=qwen_moe_layers(hf, fields["num_hidden_layers"], experts),
    )


ARCH = Architecture("qwen3_next", config_from_hf, NAMES, unused=UNUSED)

"""DeepSeek-V2 and V3 (and Kimi-K2, a V3 under model_type kimi_k2): MLA attention, shared experts, group routing.

V2 scores with softmax and picks greedily or by group max; V3 scores with sigmoid, adds
e_score_correction_bias for selection only, ranks groups by their top-2 sum and normalises the picked weights.
Both multiply the weights by routed_scaling_factor. The first `first_k_dense_replace` layers are dense.
"""
from __future__ import annotations

from typing import Any

from ..config import MLAConfig, ModelConfig, RouterConfig
from . import Architecture, CheckpointNames, TextModel
from .common import common_fields, group_counts, require, sigmoid_group_router


def _router(hf: dict[str, Any], v3: bool) -> RouterConfig:
    if v3:
        return sigmoid_group_router(hf)
    return RouterConfig(
        **group_counts(hf),
        scoring="softmax",
        topk_method=hf.get("topk_method") or "greedy",
        # The V2 reference never renormalises the picked weights, whatever norm_topk_prob says.
        norm_topk_prob=False,
    )


def _config_from_hf(hf: dict[str, Any], v3: bool) -> ModelConfig:
    fields = common_fields(hf, rms_norm_eps=1e-6, max_position_embeddings=4096)
    layers, heads = fields["num_hidden_layers"], fields["num_attention_heads"]
    dense = hf.get("first_k_dense_replace") or 0
    # V2 configs sometimes spell moe_layer_freq; every real checkpoint uses 1.
    freq = hf.get("moe_layer_freq", 1) or 1
    rope_dim = require(hf, "qk_rope_head_dim")
    fields.update(num_key_value_heads=heads, head_dim=rope_dim)  # MLA: one latent for all heads; rope on rope_dim
    return ModelConfig(
        **fields,
        model_type="deepseek_v3" if v3 else "deepseek_v2",
        router=_router(hf, v3),
        moe_intermediate_size=require(hf, "moe_intermediate_size"),
        intermediate_size=require(hf, "intermediate_size"),
        moe_layers=tuple(i >= dense and i % freq == 0 for i in range(layers)),
        attention_bias=hf.get("attention_bias", False),
        sliding_windows=(None,) * layers,
        mla=MLAConfig(
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=require(hf, "kv_lora_rank"),
            qk_nope_head_dim=require(hf, "qk_nope_head_dim"),
            qk_rope_head_dim=rope_dim,
            v_head_dim=require(hf, "v_head_dim"),
            rope_interleaved=(not v3) or bool(hf.get("rope_interleave", True)),
        ),
        shared_intermediate_size=require(hf, "moe_intermediate_size") * (hf.get("n_shared_experts") or 0),
        num_extra_layers=(hf.get("num_nextn_predict_layers") or 0) if v3 else 0,
    )


def v2_from_hf(hf: dict[str, Any]) -> ModelConfig:
    return _config_from_hf(hf, v3=False)


def v3_from_hf(hf: dict[str, Any]) -> ModelConfig:
    return _config_from_hf(hf, v3=True)


V2 = Architecture("deepseek_v2", v2_from_hf, CheckpointNames(shared="shared_experts"))
V3 = Architecture("deepseek_v3", v3_from_hf, CheckpointNames(shared="shared_experts"))
# Kimi-K2-Instruct's config.json: DeepSeek-V3's fields and tensor names, under its own model_type.
KIMI_K2 = Architecture("kimi_k2", v3_from_hf, V3.names)
# Kimi-K2.5 wraps a DeepSeek-V3 text model (`text_config`, tensors under `language_model.`) with a vision tower.
_KIMI_K25_TEXT = TextModel("text_config", "deepseek_v3", (("", "language_model."),), ("vision_tower.", "mm_projector."))
KIMI_K25 = Architecture("kimi_k25", lambda hf: v3_from_hf(_KIMI_K25_TEXT.config(hf)), V3.names, _KIMI_K25_TEXT)

"""Qwen2-MoE: q/k/v bias, a shared expert scaled by sigmoid(shared_expert_gate(x)), sparse-layer spacing."""
from __future__ import annotations

from typing import Any

from ..config import ModelConfig, RouterConfig
from . import Architecture, CheckpointNames
from .common import first_present, read_dtype, read_eos, read_rope, require, sliding_windows


def qwen_moe_layers(hf: dict[str, Any], num_layers: int, num_experts: int) -> tuple[bool, ...]:
    """A layer is sparse unless listed in `mlp_only_layers` or off the `decoder_sparse_step` grid."""
    dense = set(hf.get("mlp_only_layers") or [])
    step = hf.get("decoder_sparse_step", 1) or 1
    return tuple(i not in dense and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers))


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    hidden, heads = require(hf, "hidden_size"), require(hf, "num_attention_heads")
    layers = require(hf, "num_hidden_layers")
    experts = first_present(hf, "num_experts", "num_local_experts")
    return ModelConfig(
        model_type="qwen2_moe",
        vocab_size=require(hf, "vocab_size"),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        rope=read_rope(hf),
        router=RouterConfig(
            num_experts=experts,
            top_k=require(hf, "num_experts_per_tok"),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        ),
        moe_intermediate_size=require(hf, "moe_intermediate_size"),
        intermediate_size=require(hf, "intermediate_size"),
        moe_layers=qwen_moe_layers(hf, layers, experts),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("qkv_bias", True),
        sliding_windows=sliding_windows(hf, layers),
        shared_intermediate_size=hf.get("shared_expert_intermediate_size") or 0,
        shared_expert_gate=True,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=read_eos(hf),
        torch_dtype=read_dtype(hf),
        extra=hf,
    )


ARCH = Architecture("qwen2_moe", config_from_hf, CheckpointNames(shared="shared_expert"))

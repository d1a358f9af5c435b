"""Qwen3-MoE: per-head q/k RMSNorm, an explicit head_dim, no shared expert."""
from __future__ import annotations

from typing import Any

from ..config import ModelConfig, RouterConfig
from . import Architecture, CheckpointNames
from .common import first_present, read_dtype, read_eos, read_rope, require, sliding_windows
from .qwen2_moe import qwen_moe_layers


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    hidden, heads = require(hf, "hidden_size"), require(hf, "num_attention_heads")
    layers = require(hf, "num_hidden_layers")
    experts = first_present(hf, "num_experts", "num_local_experts")
    return ModelConfig(
        model_type="qwen3_moe",
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
        attention_bias=hf.get("attention_bias", False),
        qk_norm="head",
        sliding_windows=sliding_windows(hf, layers),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=read_eos(hf),
        torch_dtype=read_dtype(hf),
        extra=hf,
    )


ARCH = Architecture("qwen3_moe", config_from_hf, CheckpointNames())

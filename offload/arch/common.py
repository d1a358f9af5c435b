"""Config translation shared by the arch files: rope, dtype, eos ids, per-layer lists."""
from __future__ import annotations

from typing import Any

from ..config import RopeConfig, RouterConfig
from ..errors import CheckpointError

SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn", "llama3")


def require(hf: dict[str, Any], key: str) -> Any:
    if key not in hf or hf[key] is None:
        raise CheckpointError(f"config.json has no '{key}' (model_type {hf.get('model_type')!r}); the file is "
                              "incomplete")
    return hf[key]


def first_present(hf: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The first of several spellings of one field (current HF names first, older hub names after)."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    return default


def require_first(hf: dict[str, Any], *keys: str) -> Any:
    """first_present for a field the model cannot do without: missing under every spelling is an error."""
    value = first_present(hf, *keys)
    if value is None:
        spellings = " or ".join(f"'{key}'" for key in keys)
        raise CheckpointError(f"config.json has no {spellings} (model_type {hf.get('model_type')!r}); the file is "
                              "incomplete")
    return value


def read_rope(hf: dict[str, Any], default_theta: float = 10000.0) -> RopeConfig:
    """Current `rope_parameters` or the older `rope_theta` + `rope_scaling` (with `type` or `rope_type`); a config
    without a theta means its model type's default (transformers' `default_theta`)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    theta = params.get("rope_theta", hf.get("rope_theta", default_theta))
    original = hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    factor = params.get("factor")
    if rope_type == "yarn" and factor is None:
        # DeepSeek-style configs may give only the two lengths; their ratio is the factor.
        factor = hf["max_position_embeddings"] / original
    return RopeConfig(
        theta=float(theta),
        type=rope_type,
        factor=float(factor or 1.0),
        original_max_position_embeddings=int(original or hf.get("max_position_embeddings") or 0) or None,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        low_freq_factor=float(params.get("low_freq_factor") or 1.0),
        high_freq_factor=float(params.get("high_freq_factor") or 4.0),
    )


def partial_rotary_dim(hf: dict[str, Any], head_dim: int, default_factor: float = 1.0) -> int | None:
    """Channels per head that RoPE turns, from `partial_rotary_factor` (in `rope_parameters` today, top-level in
    older configs); None when it is the whole head."""
    params = hf.get("rope_parameters") or {}
    top_level = first_present(hf, "partial_rotary_factor", default=default_factor)
    factor = float(first_present(params, "partial_rotary_factor", default=top_level))
    dim = int(head_dim * factor)  # as transformers rounds it
    if not 0 < dim <= head_dim or dim % 2:
        raise CheckpointError(f"partial_rotary_factor {factor:g} of head_dim {head_dim} gives {dim} rotary "
                              "channels; it must give an even number from 2 to head_dim")
    return None if dim == head_dim else dim


def read_dtype(hf: dict[str, Any]) -> str:
    return str(first_present(hf, "dtype", "torch_dtype", default="float32")).replace("torch.", "")


def read_eos(hf: dict[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def sliding_windows(hf: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Per-layer attention window: `layer_types` when given, else one `sliding_window` for all layers."""
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if layer_types:
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    if hf.get("use_sliding_window") is False:
        return (None,) * num_layers
    return (window,) * num_layers


def common_fields(hf: dict[str, Any], rms_norm_eps: float, max_position_embeddings: int,
                  rope_theta: float = 10000.0) -> dict[str, Any]:
    """The ModelConfig fields every model type spells the same way in config.json (defaults differ per type)."""
    hidden, heads = require(hf, "hidden_size"), require(hf, "num_attention_heads")
    return dict(
        vocab_size=require(hf, "vocab_size"),
        hidden_size=hidden,
        num_hidden_layers=require(hf, "num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        rms_norm_eps=hf.get("rms_norm_eps", rms_norm_eps),
        max_position_embeddings=hf.get("max_position_embeddings", max_position_embeddings),
        rope=read_rope(hf, rope_theta),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=read_eos(hf),
        torch_dtype=read_dtype(hf),
        extra=hf,
    )


def group_counts(hf: dict[str, Any]) -> dict[str, Any]:
    """The router fields every DeepSeek-style family spells the same way: expert count, top-k, groups, scaling."""
    return dict(
        num_experts=require_first(hf, "n_routed_experts", "num_local_experts", "num_experts"),
        top_k=require(hf, "num_experts_per_tok"),
        n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1,
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
    )


def sigmoid_group_router(hf: dict[str, Any], norm_topk_prob: bool = True) -> RouterConfig:
    """DeepSeek-V3's routing, shared by Kimi-K2, GLM-4.x and dots.llm1: sigmoid scores, e_score_correction_bias for
    selection only, group top-k, picked weights optionally renormalised (`norm_topk_prob`, the family's default
    when config.json omits it) and scaled."""
    return RouterConfig(**group_counts(hf), scoring="sigmoid", topk_method="noaux_tc",
                        norm_topk_prob=bool(hf.get("norm_topk_prob", norm_topk_prob)), has_correction_bias=True)

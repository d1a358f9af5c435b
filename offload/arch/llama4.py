"""Llama-4 (Scout, Maverick): grouped-query attention whose RoPE layers rotate interleaved channel pairs (Llama-3
rope scaling), L2-normalise the rotated q/k (`use_qk_norm`) and attend within chunks of `attention_chunk_size`
positions, while every `no_rope_layer_interval`-th layer (`no_rope_layers[i] == 0`) has no RoPE, full attention
and a position-dependent query temperature; MoE on every `interleave_moe_layer_step`-th layer (`moe_layers`):
sigmoid top-k routing whose weight scales the expert's input, a shared expert of the experts' `intermediate_size`,
experts stored as whole-layer tensors `gate_up_proj` [E, H, 2I] (gate then up) and `down_proj` [E, I, H]; the other
layers a dense MLP of `intermediate_size_mlp`. Everything under `feed_forward.`.

`llama4` is the multimodal checkpoint (Llama4ForConditionalGeneration: `text_config`, the text model under
`language_model.`, vision tower and projector skipped); `llama4_text` a text-only Llama4ForCausalLM. Missing keys
take transformers' Llama4TextConfig defaults, so a config.json means what it means there.
"""
from __future__ import annotations

from typing import Any

from ..config import ModelConfig, RouterConfig
from . import Architecture, CheckpointNames, TextModel
from .common import common_fields, first_present

DEFAULTS = {"vocab_size": 202048, "hidden_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 40,
            "num_key_value_heads": 8, "head_dim": 128, "bos_token_id": 1, "eos_token_id": 2}


def rope_layers(hf: dict[str, Any], num_layers: int) -> tuple[bool, ...]:
    """Per layer whether RoPE applies: `no_rope_layers` (1 = RoPE, despite the name) when given, else every
    `no_rope_layer_interval`-th layer without, as Llama4TextConfig derives them."""
    given = hf.get("no_rope_layers")
    if given:
        return tuple(bool(flag) for flag in given)
    interval = int(first_present(hf, "no_rope_layer_interval", default=4))
    return tuple((i + 1) % interval != 0 for i in range(num_layers))


def moe_layers(hf: dict[str, Any], num_layers: int) -> tuple[bool, ...]:
    """Per layer whether it is sparse: `moe_layers` (indices) when given, else every `interleave_moe_layer_step`-th."""
    indices = hf.get("moe_layers")
    if indices is None:
        step = int(first_present(hf, "interleave_moe_layer_step", default=1))
        indices = range(step - 1, num_layers, step)
    return tuple(i in set(indices) for i in range(num_layers))


def text_config_from_hf(hf: dict[str, Any], model_type: str = "llama4_text") -> ModelConfig:
    fields = common_fields({**DEFAULTS, **hf}, rms_norm_eps=1e-5, max_position_embeddings=131072,
                           rope_theta=500000.0)
    layers = fields["num_hidden_layers"]
    roped = rope_layers(hf, layers)
    chunk = hf.get("attention_chunk_size", 8192)
    kinds = hf.get("layer_types") or ["chunked_attention" if rope and chunk is not None else "full_attention"
                                      for rope in roped]
    intermediate = first_present(hf, "intermediate_size", default=8192)
    bias = bool(hf.get("attention_bias", False))
    temperature = (float(hf.get("floor_scale", 8192)), float(hf.get("attn_scale", 0.1))) \
        if hf.get("attn_temperature_tuning", True) else None
    return ModelConfig(
        **fields,
        model_type=model_type,
        router=RouterConfig(num_experts=first_present(hf, "num_local_experts", default=16),
                            top_k=first_present(hf, "num_experts_per_tok", default=1), scoring="sigmoid",
                            norm_topk_prob=False),
        router_scales_input=True,
        moe_intermediate_size=intermediate,
        intermediate_size=first_present(hf, "intermediate_size_mlp", default=16384),
        moe_layers=moe_layers(hf, layers),
        shared_intermediate_size=intermediate,
        attention_bias=bias,
        attention_output_bias=bias,
        rope_interleaved=True,
        rope_layers=roped,
        attention_chunks=tuple(chunk if kind == "chunked_attention" else None for kind in kinds),
        qk_l2_norm=bool(hf.get("use_qk_norm", True)),
        attention_temperature=temperature,
        sliding_windows=(None,) * layers,
    )


NAMES = CheckpointNames(moe="feed_forward", router="router", fused_experts="halves", shared="shared_expert",
                        dense_mlp="feed_forward")
TEXT = TextModel("text_config", "llama4_text", (("", "language_model."),), ("vision_model.", "multi_modal_projector."))
ARCH = Architecture("llama4", lambda hf: text_config_from_hf(TEXT.config(hf), "llama4"), NAMES, TEXT)
# A text-only Llama4ForCausalLM checkpoint, or the text model as an offload store of a Llama-4 checkpoint names it.
TEXT_ARCH = Architecture("llama4_text", text_config_from_hf, NAMES)

"""Qwen3.5 / Qwen3.6 MoE (qwen3_5_moe): a Qwen3-Next-style hybrid text model (arch/qwen3_next.py) with separate
in_proj_qkv / in_proj_z / in_proj_b / in_proj_a projections, every layer sparse and the picked weights always
renormalised, wrapped with a vision tower: `text_config`, text tensors under `model.language_model.` (the LM head
stays `lm_head.`), the vision tower under `model.visual.` (skipped). Text positions only: the multimodal RoPE
sections all see the same position, which is plain RoPE."""
from __future__ import annotations

from typing import Any

from ..config import ModelConfig, RouterConfig
from . import Architecture, TextModel
from .common import require
from .qwen3_next import NAMES, UNUSED, hybrid_fields


def text_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    fields = hybrid_fields(hf, projections="qkv_z_b_a")
    return ModelConfig(
        **fields,
        model_type="qwen3_5_moe",
        router=RouterConfig(num_experts=require(hf, "num_experts"), top_k=require(hf, "num_experts_per_tok"),
                            norm_topk_prob=True),
        intermediate_size=0,
        moe_layers=(True,) * fields["num_hidden_layers"],
    )


TEXT = TextModel("text_config", "qwen3_5_moe_text", (("model.", "model.language_model."), ("lm_head.", "lm_head.")),
                 ("model.visual.",))
ARCH = Architecture("qwen3_5_moe", lambda hf: text_config_from_hf(TEXT.config(hf)), NAMES, TEXT, unused=UNUSED)
# The text model alone, as an offload store of a Qwen3.5 checkpoint (or a text-only export) names it.
TEXT_ARCH = Architecture("qwen3_5_moe_text", text_config_from_hf, NAMES, unused=UNUSED)

"""One small file per Hugging Face `model_type`: config translation and checkpoint-name rules, no nn code."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..config import ModelConfig
from ..errors import CheckpointError


@dataclass(frozen=True)
class CheckpointNames:
    """Where a model_type keeps its MoE (and renamed attention) tensors under `model.layers.{i}.`."""

    moe: str = "mlp"  # the sparse block: router at `{moe}.{router}`, experts at `{moe}.experts.{j}`
    router: str = "gate"  # the router Linear under `{moe}.` (Hunyuan: gate.wg)
    expert_proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    fused_experts: str | None = None  # whole-layer gate_up_proj / down_proj: "interleaved" (gpt-oss) | "halves"
    shared: str | None = None  # shared expert(s) under `{moe}.{shared}`
    correction_bias: str = "gate.e_score_correction_bias"  # selection bias under `{moe}.` (MiniMax: beside gate)
    qk_norm: tuple[str, str] = ("q_norm", "k_norm")  # q/k RMSNorms under `self_attn.` (Hunyuan: query_layernorm)
    correction_bias_rows: int | None = None  # stored as [rows, E] rather than [E] (ERNIE-4.5's moe_statics: 1 row)


@dataclass(frozen=True)
class TextModel:
    """Where a multimodal checkpoint keeps the language model offload runs, and what it skips."""

    config_key: str  # config.json's sub-config of the text model, e.g. "text_config"
    model_type: str  # the text model's architecture where its sub-config does not name it
    prefix: str  # the text model's tensor names start with this, e.g. "language_model."
    skipped: tuple[str, ...]  # name prefixes of the other towers' tensors (vision encoder, projector)

    def config(self, hf: dict[str, Any]) -> dict[str, Any]:
        """The text model's config.json, with the checkpoint's quantization_config (it covers every tower) and a
        model_type."""
        text = hf.get(self.config_key)
        if not isinstance(text, dict):
            raise CheckpointError(f"config.json (model_type {hf.get('model_type')!r}) has no '{self.config_key}' "
                                  "object; the file is incomplete")
        quant = {"quantization_config": hf["quantization_config"]} if "quantization_config" in hf else {}
        return {"model_type": self.model_type, **quant, **text}


@dataclass(frozen=True)
class Architecture:
    model_type: str
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    names: CheckpointNames
    text_model: TextModel | None = None  # a multimodal wrapper: run its text model, skip the other towers
    skipped: tuple[str, ...] = ()  # name prefixes of tensors the checkpoint ships and inference does not use

    def text_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        """config.json of the model offload runs (the text model's, for a multimodal checkpoint)."""
        return self.text_model.config(hf) if self.text_model is not None else hf

    @property
    def weights_prefix(self) -> str:
        return self.text_model.prefix if self.text_model is not None else ""

    @property
    def skipped_prefixes(self) -> tuple[str, ...]:
        return self.skipped + (self.text_model.skipped if self.text_model is not None else ())


def _registry() -> dict[str, Architecture]:
    from . import (deepseek, dots1, ernie4_5_moe, glm4_moe, glm4_moe_lite, gpt_oss, hunyuan_v1_moe, minimax_m2, mixtral,
                   olmoe, qwen2_moe, qwen3_moe)

    archs = [mixtral.ARCH, qwen2_moe.ARCH, qwen3_moe.ARCH, olmoe.ARCH, deepseek.V2, deepseek.V3, deepseek.KIMI_K2,
             deepseek.KIMI_K25, glm4_moe.ARCH, glm4_moe_lite.ARCH, dots1.ARCH, minimax_m2.ARCH, ernie4_5_moe.ARCH,
             hunyuan_v1_moe.ARCH, gpt_oss.ARCH]
    return {arch.model_type: arch for arch in archs}


def architecture(model_type: str | None) -> Architecture:
    archs = _registry()
    if model_type not in archs:
        raise CheckpointError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(archs))}"
        )
    return archs[model_type]


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    return architecture(hf.get("model_type")).config_from_hf(hf)

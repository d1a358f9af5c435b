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
    dense_mlp: str = "mlp"  # a dense layer's MLP under `model.layers.{i}.` (Llama-4: feed_forward, like its MoE)
    correction_bias_rows: int | None = None  # stored as [rows, E] rather than [E] (ERNIE-4.5's moe_statics: 1 row)


@dataclass(frozen=True)
class TextModel:
    """Where a multimodal checkpoint keeps the language model offload runs, and what it skips."""

    config_key: str  # config.json's sub-config of the text model, e.g. "text_config"
    model_type: str  # the text model's architecture where its sub-config does not name it
    # (runtime prefix, stored prefix) pairs: the text model's tensor `model.x` is stored as `{stored}x` for the pair
    # whose runtime prefix starts the name, e.g. (("", "language_model."),) puts every name under language_model.
    prefixes: tuple[tuple[str, str], ...]
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

    def checkpoint_name(self, name: str) -> str:
        """The stored name of the text model's tensor `name` (as offload's modules ask for it)."""
        for runtime, stored in self.prefixes:
            if name.startswith(runtime):
                return stored + name[len(runtime):]
        raise KeyError(name)

    def runtime_name(self, stored_name: str) -> str | None:
        """The inverse of checkpoint_name; None for a tensor outside the text model."""
        for runtime, stored in sorted(self.prefixes, key=lambda pair: -len(pair[1])):
            if stored_name.startswith(stored):
                return runtime + stored_name[len(stored):]
        return None


@dataclass(frozen=True)
class Architecture:
    model_type: str
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    names: CheckpointNames
    text_model: TextModel | None = None  # a multimodal wrapper: run its text model, skip the other towers
    unused: tuple[str, ...] = ()  # name prefixes of modules published checkpoints ship and inference skips (MTP)

    def text_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        """config.json of the model offload runs (the text model's, for a multimodal checkpoint)."""
        return self.text_model.config(hf) if self.text_model is not None else hf

    def checkpoint_name(self, name: str) -> str:
        """Where the checkpoint stores the tensor a module asks for as `name`."""
        return self.text_model.checkpoint_name(name) if self.text_model is not None else name

    def runtime_name(self, stored_name: str) -> str | None:
        return self.text_model.runtime_name(stored_name) if self.text_model is not None else stored_name

    @property
    def skipped_prefixes(self) -> tuple[str, ...]:
        """Other towers' tensors and unused modules: present in published checkpoints, never loaded."""
        return (self.text_model.skipped if self.text_model is not None else ()) + self.unused


def _registry() -> dict[str, Architecture]:
    from . import (deepseek, deepseek_v32, dots1, ernie4_5_moe, glm4_moe, glm4_moe_lite, glm_moe_dsa, gpt_oss,
                   hunyuan_v1_moe, llama4, minimax_m2, mixtral, olmoe, qwen2_moe, qwen3_5_moe, qwen3_moe, qwen3_next)

    archs = [mixtral.ARCH, qwen2_moe.ARCH, qwen3_moe.ARCH, olmoe.ARCH, deepseek.V2, deepseek.V3, deepseek.KIMI_K2,
             deepseek.KIMI_K25, deepseek_v32.ARCH, glm4_moe.ARCH, glm4_moe_lite.ARCH, glm_moe_dsa.ARCH, dots1.ARCH,
             minimax_m2.ARCH, qwen3_next.ARCH, qwen3_5_moe.ARCH, qwen3_5_moe.TEXT_ARCH, ernie4_5_moe.ARCH,
             hunyuan_v1_moe.ARCH, gpt_oss.ARCH, llama4.ARCH, llama4.TEXT_ARCH]
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

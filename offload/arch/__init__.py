"""One small file per Hugging Face `model_type`: config translation and checkpoint-name rules, no nn code."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..config import ModelConfig
from ..errors import CheckpointError


@dataclass(frozen=True)
class CheckpointNames:
    """Where a model_type keeps its MoE tensors under `model.layers.{i}.`."""

    moe: str = "mlp"  # the sparse block: router at `{moe}.gate`, experts at `{moe}.experts.{j}`
    expert_proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    shared: str | None = None  # shared expert(s) under `{moe}.{shared}`


@dataclass(frozen=True)
class Architecture:
    model_type: str
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    names: CheckpointNames


def _registry() -> dict[str, Architecture]:
    from . import deepseek, mixtral, olmoe, qwen2_moe, qwen3_moe

    archs = [mixtral.ARCH, qwen2_moe.ARCH, qwen3_moe.ARCH, olmoe.ARCH, deepseek.V2, deepseek.V3, deepseek.KIMI_K2]
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

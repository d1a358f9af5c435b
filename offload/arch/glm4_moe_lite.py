"""GLM-4.7-Flash (glm4_moe_lite): DeepSeek-V3's MLA attention, routing and tensor names; which layers are dense
is `mlp_layer_types` (transformers) or, as published config.json files spell it, `first_k_dense_replace`."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..config import ModelConfig
from ..errors import CheckpointError
from . import Architecture
from .common import partial_rotary_dim, require
from .deepseek import V3, v3_from_hf


def mlp_layers(hf: dict[str, Any], num_layers: int, default_dense: int = 1) -> tuple[bool, ...]:
    """Per layer: routed experts (True) or a dense MLP; transformers' default is `default_dense` dense layers
    first (one for GLM-4.7-Flash, three for DeepSeek-V3.2 and GLM-5)."""
    kinds = hf.get("mlp_layer_types")
    if kinds is None:
        dense = hf.get("first_k_dense_replace", default_dense)
        return tuple(i >= dense for i in range(num_layers))
    if len(kinds) != num_layers or not set(kinds) <= {"dense", "sparse"}:
        raise CheckpointError(f"config.json's mlp_layer_types must give 'dense' or 'sparse' for each of the "
                              f"{num_layers} layers, got {kinds!r}")
    return tuple(kind == "sparse" for kind in kinds)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    if partial_rotary_dim(hf, require(hf, "qk_rope_head_dim")) is not None:
        raise CheckpointError("glm4_moe_lite with a partial_rotary_factor below 1 is not supported: MLA rotates "
                              "all of qk_rope_head_dim")
    cfg = v3_from_hf(hf)
    return dataclasses.replace(cfg, model_type="glm4_moe_lite", moe_layers=mlp_layers(hf, cfg.num_hidden_layers))


ARCH = Architecture("glm4_moe_lite", config_from_hf, V3.names)

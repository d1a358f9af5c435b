"""GLM-5 (glm_moe_dsa): DeepSeek-V3.2's sparse attention, with the indexer rotating interleaved pairs and
cross-layer top-k sharing: a "shared" layer has no indexer and attends to the positions the last "full" layer
picked. Which layers are which: `indexer_types` (transformers), else `index_topk_pattern` ("F"/"S" per layer),
else `index_topk_freq` / `index_skip_topk_offset` (every layer full by default)."""
from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from ..errors import CheckpointError
from . import Architecture
from .common import require
from .deepseek import V3
from .deepseek_v32 import dsa_config

PATTERN_LETTERS = {"F": "full", "S": "shared"}


def indexer_types(hf: dict[str, Any], num_layers: int) -> list[str]:
    """Per layer "full" or "shared", read as transformers' GlmMoeDsaConfig reads it."""
    kinds = hf.get("indexer_types")
    if kinds is None and (pattern := hf.get("index_topk_pattern")) is not None:
        kinds = [PATTERN_LETTERS.get(c, c) for c in pattern] if isinstance(pattern, str) else list(pattern)
    if kinds is None:
        freq = max(hf.get("index_topk_freq", 1), 1)
        offset = hf.get("index_skip_topk_offset", 2)
        kinds = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(num_layers)]
    return kinds


def own_indexer_layers(hf: dict[str, Any], num_layers: int) -> tuple[bool, ...]:
    kinds = indexer_types(hf, num_layers)
    if len(kinds) != num_layers or not set(kinds) <= {"full", "shared"} or kinds[0] != "full":
        raise CheckpointError(f"config.json's indexer layers must be 'full' or 'shared' for each of the {num_layers} "
                              f"layers, the first 'full' (a shared layer reuses an earlier one's top-k), got {kinds!r}")
    return tuple(kind == "full" for kind in kinds)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    own = own_indexer_layers(hf, require(hf, "num_hidden_layers"))
    return dsa_config(hf, "glm_moe_dsa", indexer_rope_interleaved=True, own_layers=own)


ARCH = Architecture("glm_moe_dsa", config_from_hf, V3.names)

"""DeepSeek-V3.2 (deepseek_v32): DeepSeek-V3 plus DeepSeek Sparse Attention — a lightning indexer in every layer's
attention (tensors under `self_attn.indexer.`) picks the `index_topk` cached positions each query attends to.
The indexer rotates its keys in the half layout, the MLA in interleaved pairs. Dense layers are
`mlp_layer_types` (transformers) or `first_k_dense_replace` (published config.json, default 3)."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..config import IndexerConfig, ModelConfig
from ..errors import CheckpointError
from . import Architecture
from .common import require
from .deepseek import V3, v3_from_hf
from .glm4_moe_lite import mlp_layers


def dsa_config(hf: dict[str, Any], model_type: str, indexer_rope_interleaved: bool,
               own_layers: tuple[bool, ...] | None = None) -> ModelConfig:
    """DeepSeek-V3's translation with the indexer's fields; `own_layers` (default: every layer) says which layers
    run their own indexer rather than reusing the last one's top-k (GLM-5)."""
    if hf.get("q_lora_rank") is None:
        raise CheckpointError(f"{model_type} needs q_lora_rank in config.json: the lightning indexer reads the "
                              "query latent")
    cfg = v3_from_hf(hf)
    layers = cfg.num_hidden_layers
    indexer = IndexerConfig(n_heads=require(hf, "index_n_heads"), head_dim=require(hf, "index_head_dim"),
                            topk=require(hf, "index_topk"), rope_interleaved=indexer_rope_interleaved,
                            own_layers=own_layers or (True,) * layers)
    if indexer.head_dim < cfg.mla.qk_rope_head_dim:
        raise CheckpointError(f"config.json's index_head_dim {indexer.head_dim} is smaller than qk_rope_head_dim "
                              f"{cfg.mla.qk_rope_head_dim}, which the indexer rotates")
    # The MLA always rotates interleaved pairs here (transformers has no rope_interleave for these models).
    mla = dataclasses.replace(cfg.mla, rope_interleaved=True)
    return dataclasses.replace(cfg, model_type=model_type, moe_layers=mlp_layers(hf, layers, default_dense=3),
                               mla=mla, indexer=indexer)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    return dsa_config(hf, "deepseek_v32", indexer_rope_interleaved=False)


ARCH = Architecture("deepseek_v32", config_from_hf, V3.names)

"""What a model holds, by weight group, in bytes — from the loader's own tensor list, with no memory used."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..arch import CheckpointNames
from ..config import ModelConfig
from ..experts.reference import ReferenceExperts
from ..model.device_quant import nbytes as quantized_bytes
from ..weights.source import InventedSource

DEVICE_GROUPS = ("embeddings", "attention", "norms", "routers", "shared_experts", "dense_mlp", "lm_head")


@dataclass(frozen=True)
class Inventory:
    """Parameter counts per weight group (routed experts apart) and the size of one routed expert."""

    params: dict[str, int]  # group -> parameters, for DEVICE_GROUPS
    router_params: int  # kept in fp32 whatever the model dtype
    expert_params: int  # one routed expert: gate + up + down
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    dense_shapes: dict[str, tuple[tuple[int, int], ...]]  # group -> [out, in] of each weight a dense format packs
    expert_shape: tuple[int, int] = (0, 0)  # (hidden, intermediate) of a routed expert: its slot format's sizes

    def device_bytes(self, dtype_bytes: int, dense_format: str | None = None) -> dict[str, int]:
        """Bytes of each always-on-device group in the model's compute dtype (routers in fp32), with the dense
        weights in `dense_format` ("int8" | "int4", model/device_quant.py) when given."""
        out = {group: n * dtype_bytes for group, n in self.params.items()}
        out["routers"] = self.router_params * 4 + (self.params["routers"] - self.router_params) * dtype_bytes
        if dense_format is not None:
            for group, shapes in self.dense_shapes.items():
                out[group] += sum(quantized_bytes(dense_format, O, K, dtype_bytes) - O * K * dtype_bytes
                                  for O, K in shapes)
        return out

    def slot_bytes(self, dtype_bytes: int, slot_format: str | None = None) -> int:
        """Device bytes of one routed expert's pool row: in the compute dtype, or with its gate, up and down
        matrices in `slot_format` ("int8" | "int4" | "int4s", as experts/quant_pool.py stores them) and its other
        parameters (biases) in the compute dtype."""
        if slot_format is None:
            return self.expert_params * dtype_bytes
        H, I = self.expert_shape
        matrices = 2 * quantized_bytes(slot_format, I, H, dtype_bytes) + quantized_bytes(slot_format, H, I, dtype_bytes)
        return matrices + (self.expert_params - 3 * H * I) * dtype_bytes


class _InventorySource(InventedSource):
    """Meta tensors for every weight, and the shapes of the dense weights a dense format would quantize."""

    def __init__(self) -> None:
        super().__init__(lambda name, shape: torch.empty(shape, device="meta"), device=torch.device("meta"))
        self.dense: dict[str, tuple[int, int]] = {}

    def linear_weight(self, name: str, shape: tuple[int, int], quantize: bool = True):
        if quantize:
            self.dense[name] = tuple(shape)
        return super().linear_weight(name, shape, quantize)


def _group(name: str, names: CheckpointNames) -> str:
    if name.startswith("model.embed_tokens"):
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    if ".self_attn." in name or ".linear_attn." in name:
        return "attention"
    if name.endswith("norm.weight"):
        return "norms"
    if f".{names.moe}.experts." in name:
        return "experts"
    router = rf"\.{names.moe}\.({re.escape(names.router)}\.|shared_expert_gate\.)"
    if re.search(router, name) or name.endswith(f".{names.correction_bias}"):
        return "routers"
    if names.shared and f".{names.moe}.{names.shared}." in name:
        return "shared_experts"
    return "dense_mlp"


def inventory(cfg: ModelConfig, names: CheckpointNames) -> Inventory:
    from ..model.transformer import Transformer

    src = _InventorySource()
    Transformer(cfg, names, src, lambda layer, weights: ReferenceExperts(weights), max_context=1)
    params = dict.fromkeys(DEVICE_GROUPS, 0)
    dense_shapes: dict[str, list[tuple[int, int]]] = {group: [] for group in DEVICE_GROUPS}
    for name, shape in src.dense.items():
        dense_shapes[_group(name, names)].append(shape)
    router = experts = 0
    for name, tensor in src.tensors.items():
        group = _group(name, names)
        if group == "experts":
            experts += tensor.numel()
            continue
        params[group] += tensor.numel()
        if group == "routers" and "shared_expert_gate" not in name:
            router += tensor.numel()
    moe_layers = tuple(i for i, sparse in enumerate(cfg.moe_layers) if sparse)
    per_expert = experts // max(len(moe_layers) * cfg.router.num_experts, 1)
    return Inventory(params, router, per_expert, moe_layers, cfg.router.num_experts, cfg.router.top_k,
                     {group: tuple(shapes) for group, shapes in dense_shapes.items() if shapes},
                     (cfg.hidden_size, cfg.moe_intermediate_size))


def layer_cache_bytes(cfg: ModelConfig, layer: int, max_context: int, dtype_bytes: int,
                      kv_bytes: int | None = None) -> int:
    """One layer's sequence state: a linear-attention layer's is fixed (its convolution window in the model dtype,
    its [heads, d_k, d_v] state in fp32, model/kv_cache.py: RecurrentState); an attention layer's grows with
    max_context (K and V, or MLA's latent + rope key, kv_bytes a value (None: the model dtype's dtype_bytes); plus
    the lightning indexer's key, in the model dtype, in a layer that runs one)."""
    kv_bytes = kv_bytes or dtype_bytes
    if cfg.is_linear_attention(layer):
        la = cfg.linear_attention
        state = la.num_value_heads * la.key_head_dim * la.value_head_dim * 4
        return (la.conv_kernel - 1) * la.conv_dim * dtype_bytes + state
    if cfg.mla:
        per_position = (cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim) * kv_bytes
        if cfg.indexer and cfg.indexer.own_layers[layer]:
            per_position += cfg.indexer.head_dim * dtype_bytes
    else:
        per_position = 2 * cfg.num_key_value_heads * cfg.head_dim * kv_bytes
    return max_context * per_position


def kv_cache_bytes(cfg: ModelConfig, max_context: int, dtype_bytes: int, kv_bytes: int | None = None) -> int:
    """Every layer's sequence state for max_context positions (max_context 0: the part that does not grow)."""
    return sum(layer_cache_bytes(cfg, i, max_context, dtype_bytes, kv_bytes) for i in range(cfg.num_hidden_layers))

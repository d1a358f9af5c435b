"""Synthetic checkpoints with random weights, written in the real Hugging Face layout.

The tensor names and shapes come from the runtime's own loader: building the model against an InventedSource
records every tensor it asks for, so a synthetic checkpoint can never drift from what `load` expects.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .arch import architecture
from .experts.reference import ReferenceExperts
from .model.transformer import Transformer
from .weights.source import InventedSource


def _random_maker(std: float, seed: int):
    """Ones for norms, zeros for biases and correction biases, N(0, std) for everything else."""
    generator = torch.Generator().manual_seed(seed)

    def make(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        if name.endswith(".bias") or name.endswith("e_score_correction_bias"):
            return torch.zeros(shape)
        return torch.randn(shape, generator=generator) * std

    return make


def random_tensors(hf_config: dict[str, Any], std: float = 0.02, seed: int = 0, skew: float = 0.0,
                   layer_correlation: float = 0.8) -> dict[str, torch.Tensor]:
    """Every tensor `load` reads for hf_config, random. skew > 0 makes routing realistic (see skew_routing)."""
    arch = architecture(hf_config.get("model_type"))
    cfg = arch.config_from_hf(hf_config)
    src = InventedSource(_random_maker(std, seed))
    Transformer(cfg, arch.names, src, lambda layer, w: ReferenceExperts(w), max_context=1)
    if skew > 0:
        router_name = f"{arch.names.moe}.{arch.names.router}"
        skew_routing(src.tensors, cfg.moe_layers, router_name, std, skew, layer_correlation, seed)
    return src.tensors


def skew_routing(tensors: dict[str, torch.Tensor], moe_layers: tuple[bool, ...], router_name: str, std: float,
                 skew: float, correlation: float, seed: int) -> None:
    """Random routers route almost uniformly; real ones do not. Give every embedding a shared direction u, and
    give each router row a component along u that grows with the expert's hotness: the hottest experts then
    score about `skew` noise deviations above the coldest for most tokens. Neighbouring MoE layers share most
    of their router weights and their hotness order (`correlation`), so the next layer's router applied to the
    current hidden state predicts its choice — as in trained models, where the residual stream changes slowly."""
    generator = torch.Generator().manual_seed(seed + 1)
    embed = tensors["model.embed_tokens.weight"]  # [V, H]
    H = embed.shape[1]
    u = torch.randn(H, generator=generator)
    u /= u.norm()
    embed += 2 * std * H**0.5 * u  # the shared direction dominates every token's normalised hidden state
    previous_router, previous_order = None, None
    for layer in (i for i, sparse in enumerate(moe_layers) if sparse):
        router = tensors[f"model.layers.{layer}.{router_name}.weight"]  # [E, H]
        E = router.shape[0]
        order = torch.randperm(E, generator=generator)
        if previous_router is not None:
            keep = torch.rand(E, generator=generator) < correlation  # most experts keep their hotness rank
            order = torch.where(keep, previous_order, order)
            router.copy_(correlation * previous_router + (1 - correlation**2) ** 0.5 * router)
        previous_router, previous_order = router.clone(), order
        hotness = skew * (1 - torch.arange(E, dtype=torch.float32) / E) ** 2  # by rank: skew .. ~0
        router += (hotness[order.argsort()] * std)[:, None] * u[None, :]


def write_synthetic_checkpoint(folder: Path, hf_config: dict[str, Any], dtype: torch.dtype = torch.bfloat16,
                               std: float = 0.02, seed: int = 0, skew: float = 0.0) -> None:
    """config.json + model.safetensors (+ generation_config.json) for hf_config, with random weights."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype).contiguous() for k, v in random_tensors(hf_config, std, seed, skew).items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    dtype_name = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps({**hf_config, "dtype": dtype_name}, indent=2) + "\n")
    eos = hf_config.get("eos_token_id")
    if eos is not None:
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}, indent=2) + "\n")

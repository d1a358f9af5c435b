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


def random_tensors(hf_config: dict[str, Any], std: float = 0.02, seed: int = 0) -> dict[str, torch.Tensor]:
    arch = architecture(hf_config.get("model_type"))
    src = InventedSource(_random_maker(std, seed))
    Transformer(arch.config_from_hf(hf_config), arch.names, src, lambda layer, w: ReferenceExperts(w), max_context=1)
    return src.tensors


def write_synthetic_checkpoint(folder: Path, hf_config: dict[str, Any], dtype: torch.dtype = torch.bfloat16,
                               std: float = 0.02, seed: int = 0) -> None:
    """config.json + model.safetensors (+ generation_config.json) for hf_config, with random weights."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype).contiguous() for k, v in random_tensors(hf_config, std, seed).items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    dtype_name = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps({**hf_config, "dtype": dtype_name}, indent=2) + "\n")
    eos = hf_config.get("eos_token_id")
    if eos is not None:
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}, indent=2) + "\n")

"""The experts contract: every backend computes one MoE layer's routed experts the same way.

    y = experts(x, topk_ids, topk_weights)
    x            [T, H]  hidden states (float32 or the model dtype)
    topk_ids     [T, K]  int64 expert ids chosen by the router
    topk_weights [T, K]  float32 combine weights (already normalised / scaled by the router)
    y            [T, H]  sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]), same dtype as x

An expert is a SwiGLU MLP: down(silu(gate(x)) * up(x)). The model never knows where an expert lives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class ExpertWeights:
    """One MoE layer's routed experts, each matrix stacked over experts (HF Linear layout: [out, in])."""

    gate: torch.Tensor  # [E, I, H]
    up: torch.Tensor  # [E, I, H]
    down: torch.Tensor  # [E, H, I]

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]


class Experts(Protocol):
    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor: ...

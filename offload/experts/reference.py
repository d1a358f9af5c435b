"""The reference experts backend: every expert of a layer in torch on one device. The test oracle."""
from __future__ import annotations

import torch

from .base import ExpertWeights
from .swiglu import swiglu_experts


class ReferenceExperts:
    def __init__(self, weights: ExpertWeights):
        self.weights = weights

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        w = self.weights
        return swiglu_experts(x, topk_ids, topk_weights, w.gate, w.up, w.down, w.biases, w.activation)

"""The reference experts backend: every expert of a layer in torch on one device. The test oracle."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import ExpertWeights


class ReferenceExperts:
    def __init__(self, weights: ExpertWeights):
        self.weights = weights

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        w = self.weights
        y = torch.zeros_like(x)  # [T, H]
        flat_ids = topk_ids.reshape(-1)
        order = flat_ids.argsort(stable=True)  # group the T*K (token, slot) pairs by expert
        counts = torch.bincount(flat_ids, minlength=w.num_experts).tolist()
        token_of = order // topk_ids.shape[1]
        combine = topk_weights.reshape(-1)[order]
        begin = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = token_of[begin : begin + count]
            h = x[rows]  # [n, H]
            out = F.linear(F.silu(F.linear(h, w.gate[expert])) * F.linear(h, w.up[expert]), w.down[expert])
            y.index_add_(0, rows, out * combine[begin : begin + count, None].to(out.dtype))
            begin += count
        return y

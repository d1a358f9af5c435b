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
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from csrc_py.formats import PackedMatrix


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


@dataclass(frozen=True)
class PackedExperts:
    """One MoE layer's routed experts already in a packed host format (a pre-quantized store): csrc_py
    PackedMatrix stacks gate/up [E, I, H] and down [E, H, I]."""

    gate: "PackedMatrix"
    up: "PackedMatrix"
    down: "PackedMatrix"

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    @property
    def fmt(self) -> str:
        return self.gate.fmt

    def dequantized(self) -> ExpertWeights:
        """float32 weights for backends that compute in torch (the reference path, experts pinned on a device)."""
        from csrc_py.formats import unpack

        return ExpertWeights(*(torch.from_numpy(unpack(pm)) for pm in (self.gate, self.up, self.down)))

    def select(self, ids: list[int]) -> "PackedExperts":
        """A copy holding only experts `ids`, in that order."""
        from csrc_py.formats import PackedMatrix

        def take(pm: PackedMatrix) -> PackedMatrix:
            arrays = {n: (None if a is None else a[list(ids)]) for n, a in (("q", pm.q), ("d", pm.d), ("m", pm.m))}
            return PackedMatrix(pm.fmt, (len(ids), *pm.shape[1:]), **arrays)

        return PackedExperts(take(self.gate), take(self.up), take(self.down))


class HostStacks:
    """Sizes of a host backend that holds one layer's experts as gate, up and down stacks (packed matrices or
    tensors, each [E, ...]); the hybrid layer reads them to cost copies and plan slots."""

    gate: Any
    up: Any
    down: Any

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    @property
    def nbytes(self) -> int:
        """Host bytes held by the three stacks (scales included)."""
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes

    @property
    def expert_nbytes(self) -> int:
        """Host bytes of one expert."""
        return self.nbytes // self.num_experts

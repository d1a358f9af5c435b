"""The experts contract: every backend computes one MoE layer's routed experts the same way.

    y = experts(x, topk_ids, topk_weights)
    x            [T, H]  hidden states (float32 or the model dtype)
    topk_ids     [T, K]  int64 expert ids chosen by the router
    topk_weights [T, K]  float32 combine weights (already normalised / scaled by the router)
    y            [T, H]  sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]), same dtype as x

An expert is a gated MLP: down(act(gate(x), up(x))), act = silu(gate) * up or gpt-oss's clamped form
(config.ExpertActivation), with optional biases on all three projections; activation and biases travel with the
weights to every backend. The model never knows where an expert lives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

from ..config import ExpertActivation

if TYPE_CHECKING:
    from csrc_py.formats import PackedMatrix


SILU = ExpertActivation()


@dataclass(frozen=True)
class ExpertBiases:
    """Biases of one MoE layer's routed experts, stacked over experts (gpt-oss)."""

    gate: torch.Tensor  # [E, I]
    up: torch.Tensor  # [E, I]
    down: torch.Tensor  # [E, H]

    def select(self, ids: list[int]) -> "ExpertBiases":
        index = torch.tensor(ids, dtype=torch.long)
        return ExpertBiases(self.gate[index], self.up[index], self.down[index])

    def to(self, **kwargs) -> "ExpertBiases":
        return ExpertBiases(*(b.to(**kwargs).contiguous() for b in (self.gate, self.up, self.down)))

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.gate[e], self.up[e], self.down[e]

    def stacks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.gate, self.up, self.down


@dataclass(frozen=True)
class ExpertWeights:
    """One MoE layer's routed experts, each matrix stacked over experts (HF Linear layout: [out, in])."""

    gate: torch.Tensor  # [E, I, H]
    up: torch.Tensor  # [E, I, H]
    down: torch.Tensor  # [E, H, I]
    biases: ExpertBiases | None = None
    activation: ExpertActivation = SILU

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    @property
    def stacks(self) -> list[torch.Tensor]:
        """gate, up, down (and their biases): the DeviceExpertPool's row order."""
        return [self.gate, self.up, self.down, *(self.biases.stacks() if self.biases is not None else ())]


class Experts(Protocol):
    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor: ...


Finish = Callable[[], torch.Tensor]  # waits for a started experts call and returns its y


def start_experts(experts: Experts, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Finish:
    """Begin one layer's experts and return what finishes them. A backend with a `start` method (the hybrid one)
    leaves its CPU part running meanwhile, so the caller can queue other device work (the shared expert) before
    joining it; any other backend computes now."""
    begin = getattr(experts, "start", None)
    if begin is not None:
        return begin(x, topk_ids, topk_weights)
    y = experts(x, topk_ids, topk_weights)
    return lambda: y


@dataclass(frozen=True)
class PackedExperts:
    """One MoE layer's routed experts already in a packed host format (a pre-quantized store): csrc_py
    PackedMatrix stacks gate/up [E, I, H] and down [E, H, I]."""

    gate: "PackedMatrix"
    up: "PackedMatrix"
    down: "PackedMatrix"
    biases: ExpertBiases | None = None  # float32, beside the packed matrices
    activation: ExpertActivation = SILU

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    @property
    def fmt(self) -> str:
        return self.gate.fmt

    def dequantized(self) -> ExpertWeights:
        """float32 weights for backends that compute in torch (the reference path, experts pinned on a device)."""
        from csrc_py.formats import unpack

        return ExpertWeights(*(torch.from_numpy(unpack(pm)) for pm in (self.gate, self.up, self.down)),
                             self.biases, self.activation)

    def select(self, ids: list[int]) -> "PackedExperts":
        """A copy holding only experts `ids`, in that order."""
        from csrc_py.formats import PackedMatrix

        def take(pm: PackedMatrix) -> PackedMatrix:
            arrays = {n: (None if a is None else a[list(ids)]) for n, a in (("q", pm.q), ("d", pm.d), ("m", pm.m))}
            return PackedMatrix(pm.fmt, (len(ids), *pm.shape[1:]), **arrays)

        biases = self.biases.select(ids) if self.biases is not None else None
        return PackedExperts(take(self.gate), take(self.up), take(self.down), biases, self.activation)


class HostStacks:
    """Sizes of a host backend that holds one layer's experts as gate, up and down stacks (packed matrices or
    tensors, each [E, ...]); the hybrid layer reads them to cost copies and plan slots."""

    gate: Any
    up: Any
    down: Any
    biases: ExpertBiases | None = None

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    @property
    def nbytes(self) -> int:
        """Host bytes held by the three stacks (scales included) and the experts' biases."""
        biases = sum(b.nbytes for b in self.biases.stacks()) if self.biases is not None else 0
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes + biases

    @property
    def expert_nbytes(self) -> int:
        """Host bytes of one expert: what an upload of its packed bytes (`packed_expert`) copies."""
        return self.nbytes // self.num_experts

    def packed_expert(self, expert: int) -> tuple[torch.Tensor, ...]:
        """One expert as host RAM holds it, as CPU tensors sharing that memory: each of gate, up and down in its
        storage format, then its biases. An upload copies these bytes and `unpacked` turns them into weights on
        the device."""
        raise NotImplementedError

    def unpacked(self, packed: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """`packed_expert`'s tensors (on any device) -> gate [I, H], up [I, H], down [H, I] (and the biases), on
        that device, with the values the host computes with."""
        raise NotImplementedError

    def expert_tensors(self, expert: int) -> tuple[torch.Tensor, ...]:
        """One expert's weights (and biases) as CPU tensors."""
        return self.unpacked(self.packed_expert(expert))

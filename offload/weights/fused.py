"""Whole-layer expert tensors (gpt-oss, Llama-4): where each expert's gate, up and down matrix sits in them, and
reading one such matrix alone, so that neither the loader nor `offload convert` holds a layer in float32.

    {prefix}.gate_up_proj       [E, H, 2I]  gate and up along 2I: alternating ("interleaved", gpt-oss) or as its
                                            two halves ("halves", Llama-4)
    {prefix}.down_proj          [E, I, H]
    {prefix}.gate_up_proj_bias  [E, 2I]     (gpt-oss) split along 2I as gate_up_proj is
    {prefix}.down_proj_bias     [E, H]

The float layout keeps each expert transposed ([in, out]); a quantized checkpoint stores the stacks out-major, as
gpt-oss's MXFP4 `_blocks` [E, 2I, H/32, 16] and `_scales` [E, 2I, H/32] do. Every stored part of such a stack holds
an output row's values and scale in that row, so an expert's gate or up rows are picked from the stored bytes
before anything is decoded. A store (weights.store) keeps a fused layer as the packed stacks `{prefix}.gate_proj`,
`{prefix}.up_proj` and `{prefix}.down_proj`, and its biases as the source stores them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

import torch

from ..errors import CheckpointError
from .quant import LogicalTensor

if TYPE_CHECKING:
    from csrc_py.formats import PackedMatrix

    from .checkpoint import Checkpoint
    from .codecs import IntGroups

LAYOUTS = ("interleaved", "halves")
PACKED_STACKS = ("gate_proj", "up_proj", "down_proj")  # a store's names for a fused layer's packed gate, up, down


def stored_shape(stacked: tuple[int, int, int], quantized: bool) -> tuple[int, int, int]:
    """A whole-layer tensor of float layout `stacked` [E, K, O'] as a checkpoint stores it: so, or out-major
    [E, O', K] when quantized."""
    E, K, O = stacked
    return (E, O, K) if quantized else (E, K, O)


@dataclass(frozen=True)
class ExpertSlice:
    """Expert `expert`'s matrix [O, K] (HF Linear layout) in the whole-layer tensor `tensor`: the output rows
    range(*rows) of that expert. `stacked` is the whole tensor's float layout [E, K, O'] (O' = 2I for
    gate_up_proj)."""

    tensor: str
    expert: int
    rows: tuple[int, int, int]  # (start, stop, step) along O'
    stacked: tuple[int, int, int]

    @property
    def row_slice(self) -> slice:
        return slice(*self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        """The matrix [O, K]."""
        return len(range(*self.rows)), self.stacked[1]

    def stored_shape(self, quantized: bool) -> tuple[int, int, int]:
        return stored_shape(self.stacked, quantized)

    def renamed(self, rename: Callable[[str], str]) -> ExpertSlice:
        return replace(self, tensor=rename(self.tensor))


@dataclass(frozen=True)
class FusedExperts:
    """One MoE layer's routed experts stored as whole-layer tensors under `prefix` (`layout` as in LAYOUTS)."""

    prefix: str
    layout: str
    E: int
    I: int
    H: int

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"fused expert layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")

    @property
    def tensors(self) -> dict[str, tuple[int, int, int]]:
        """The whole-layer weight tensors, each with its float layout [E, K, O']."""
        E, I, H = self.E, self.I, self.H
        return {f"{self.prefix}.gate_up_proj": (E, H, 2 * I), f"{self.prefix}.down_proj": (E, I, H)}

    @property
    def biases(self) -> dict[str, tuple[int, int]]:
        """The whole-layer bias tensors [E, O'] (families with expert biases)."""
        E, I, H = self.E, self.I, self.H
        return {f"{self.prefix}.gate_up_proj_bias": (E, 2 * I), f"{self.prefix}.down_proj_bias": (E, H)}

    def rows(self, part: int) -> tuple[int, int, int]:
        """Rows of gate (part 0), up (1) or down (2) along their tensor's output axis O'."""
        I = self.I
        if part == 2:
            return 0, self.H, 1
        return (part, 2 * I, 2) if self.layout == "interleaved" else (part * I, (part + 1) * I, 1)

    def stacks(self) -> list[tuple[str, tuple[int, int, int], list[ExpertSlice]]]:
        """(a store's packed name, shape [E, O, K], each expert's slice) for gate, up and down."""
        (gate_up, gate_up_stacked), (down, down_stacked) = self.tensors.items()
        out = []
        for part, proj in enumerate(PACKED_STACKS):
            tensor, stacked = (gate_up, gate_up_stacked) if part < 2 else (down, down_stacked)
            slices = [ExpertSlice(tensor, j, self.rows(part), stacked) for j in range(self.E)]
            out.append((f"{self.prefix}.{proj}", (self.E, *slices[0].shape), slices))
        return out

    def split_bias(self, gate_up_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up_proj_bias [E, 2I] -> gate, up [E, I] (contiguous)."""
        return tuple(gate_up_bias[:, slice(*self.rows(part))].contiguous() for part in (0, 1))


def read_slice(checkpoint: Checkpoint, s: ExpertSlice) -> torch.Tensor:
    """The matrix [O, K] of slice s, read alone: float32 where the checkpoint stores its tensor quantized, else in
    the stored dtype."""
    t = checkpoint.logical[s.tensor]
    if not t.quantized:
        return checkpoint.read_expert(s.tensor, s.expert).T[s.row_slice]  # [K, O'] -> [O, K]
    return checkpoint.scheme.floats(_stored_rows(checkpoint, s, t), _matrix(t, s))


def pack_slice_exact(checkpoint: Checkpoint, s: ExpertSlice, out: PackedMatrix, e: int) -> bool:
    """Slice s into expert slot e of `out` straight from its integer grid (Checkpoint.pack_exact for one expert's
    rows); False (slot untouched) where it has none or the format cannot hold it."""
    from csrc_py.formats import pack_groups_expert

    t = checkpoint.logical[s.tensor]
    grid: IntGroups | None = checkpoint.scheme.grid(_stored_rows(checkpoint, s, t), _matrix(t, s)) \
        if t.quantized else None
    return grid is not None and pack_groups_expert(out, e, grid, round_scales=checkpoint.scheme.round_scales)


def _matrix(t: LogicalTensor, s: ExpertSlice) -> LogicalTensor:
    return LogicalTensor(t.name, s.shape, t.parts, True)


def _stored_rows(checkpoint: Checkpoint, s: ExpertSlice, t: LogicalTensor) -> Callable[[str], torch.Tensor]:
    """A reader of the slice's rows of each stored part (its expert, then its rows), for the scheme to decode."""
    E, _, O = s.stacked
    for part in t.parts:
        if tuple(checkpoint.tensors[part].shape[:2]) != (E, O):
            raise CheckpointError(f"{part} has shape {list(checkpoint.tensors[part].shape)}; a quantized whole-layer "
                                  f"expert tensor must store its {O} output rows per expert out-major ([{E}, {O}, "
                                  "...]) to be read one expert at a time")
    return lambda part: checkpoint.read_expert(part, s.expert)[s.row_slice]

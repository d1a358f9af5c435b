"""Routed experts kept quantized on the device tier: a layer's pinned experts and cache slots as int8 or int4
rows for torch's weight-only matmuls (model/device_quant.py), at 1 or ~0.6 bytes a weight instead of the device
dtype's 2 (bf16) or 4 (float32).

Each projection (gate, up, down) of every row lies in one stack laid out so that the rows side by side are one
device_quant weight of R x O outputs: a decode step runs each projection as one kernel call over every row in
place (no weight gather, no host read, the same ops every step), and each (token, choice) pair keeps the output
of its own row; pairs that are not resident (row -1) are masked out. That reads every resident row once per call,
which is what a decode step's few pairs can afford; a call with more pairs (a prefill chunk) reads its used rows
back to the host and runs each of them alone.

Rows are filled from float weights (pinned experts at load, uploads from a float host format) by quantizing them
on the device, and from a host that holds the slots' own int4 / int4s format by re-laying its nibbles and scales
out for torch's kernel, without dequantizing: torch's int4 computes (q - 8) * scale + zero, offload's int4
q * d + m (zero = m + 8 d, equal up to float32 rounding) and int4s (q - 8) * d (zero 0, the same products). An
int8 host's groups of 32 do not map onto torch's one int8 scale per row, so int8 rows are quantized again from the
host's weights on the device: the int8 slot format's own rounding, the same whatever the host format.
"""
from __future__ import annotations

from typing import Sequence

import torch

from csrc_py.formats import NIBBLE_FORMATS, arrays_per_matrix, group_values, unpacked_values
from ..config import ExpertActivation
from ..model.device_quant import (DeviceQuantWeight, Int4Weight, Int8Weight, int4_padded, int4_scale_dtype,
                                  pack_int4, quantize)
from .base import SILU, ExpertBiases, ExpertWeights
from .device import DeviceExpertPool, ExpertPool, ExpertRows, PackedHost
from .swiglu import gated, grouped_rows

# A call of at most this many (token, choice) pairs runs every row in one kernel per projection (a decode step);
# a longer one runs its used rows one by one, read back to the host.
ALL_ROWS_MAX_PAIRS = 16


class QuantStack:
    """One projection [O, K] of R rows in `fmt`: int8 q [R, O, K'] and scale [R, O]; int4 packed [R, ...] (torch's
    layout of one matrix per row) and scale_zeros [G, R, O', 2], so that the rows side by side are one matrix of
    R x O (int8) or R x O' (int4) outputs."""

    def __init__(self, fmt: str, rows: int, out_features: int, in_features: int, dtype: torch.dtype,
                 device: torch.device):
        self.fmt, self.rows, self.shape = fmt, rows, (out_features, in_features)
        empty = quantize(torch.zeros(out_features, in_features, device=device), fmt, dtype)  # one row's layout
        if isinstance(empty, Int8Weight):
            self.q = empty.q.new_zeros(rows, *empty.q.shape)
            self.scale = empty.scale.new_zeros(rows, *empty.scale.shape)
        else:
            self.packed = empty.packed.new_zeros(rows, *empty.packed.shape)
            G, O_padded, _ = empty.scale_zeros.shape
            self.scale_zeros = empty.scale_zeros.new_zeros(G, rows, O_padded, 2)

    @property
    def stored_outputs(self) -> int:
        """Outputs per row as stored (int4 rows are padded to device_quant.ROWS)."""
        return self.q.shape[1] if self.fmt == "int8" else self.scale_zeros.shape[2]

    @property
    def row_bytes(self) -> int:
        return (self.q[0].nbytes + self.scale[0].nbytes if self.fmt == "int8"
                else self.packed[0].nbytes + self.scale_zeros[:, 0].nbytes)

    def write(self, row: int, weight: DeviceQuantWeight) -> None:
        if isinstance(weight, Int8Weight):
            self.q[row].copy_(weight.q)
            self.scale[row].copy_(weight.scale)
        else:
            self.packed[row].copy_(weight.packed)
            self.scale_zeros[:, row].copy_(weight.scale_zeros)

    def row(self, row: int) -> DeviceQuantWeight:
        """Row `row` alone (its int4 scales copied out: a call that runs rows one by one)."""
        if self.fmt == "int8":
            return Int8Weight(self.q[row], self.scale[row], self.shape)
        return Int4Weight(self.packed[row], self.scale_zeros[:, row].contiguous(), self.shape)

    def all_rows(self) -> DeviceQuantWeight:
        """Every row as one weight of R x stored_outputs outputs, viewing the stack in place."""
        O, K = self.stored_outputs, self.shape[1]
        if self.fmt == "int8":
            return Int8Weight(self.q.view(self.rows * O, -1), self.scale.view(-1), (self.rows * O, K))
        G = self.scale_zeros.shape[0]
        packed = self.packed.view(self.rows * self.packed.shape[1], *self.packed.shape[2:])
        return Int4Weight(packed, self.scale_zeros.view(G, self.rows * O, 2), (self.rows * O, K))

    def matmul_all(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, K] -> [N, R, O]: every row's projection of every input."""
        return self.all_rows().matmul(x).view(x.shape[0], self.rows, -1)[..., : self.shape[0]]


class QuantExpertPool(ExpertRows):
    """A layer's pinned experts and cache slots as int8 / int4 / int4s rows (biases, where the experts have them,
    in the device dtype)."""

    in_place = False  # a call of more than ALL_ROWS_MAX_PAIRS pairs reads its used rows back (no grouped kernel)

    def __init__(self, fmt: str, pinned: Sequence[int], num_slots: int, hidden: int, intermediate: int,
                 dtype: torch.dtype, device: torch.device, biased: bool = False, activation: ExpertActivation = SILU):
        super().__init__(pinned, num_slots, device)
        rows = self.num_rows
        self.fmt, self.dtype = fmt, dtype
        self.gate = QuantStack(fmt, rows, intermediate, hidden, dtype, device)
        self.up = QuantStack(fmt, rows, intermediate, hidden, dtype, device)
        self.down = QuantStack(fmt, rows, hidden, intermediate, dtype, device)
        self.biases = ExpertBiases(*(torch.zeros(rows, width, dtype=dtype, device=device)
                                     for width in (intermediate, intermediate, hidden))) if biased else None
        self.activation = activation

    @property
    def projections(self) -> tuple[QuantStack, QuantStack, QuantStack]:
        return self.gate, self.up, self.down

    @property
    def expert_bytes(self) -> int:
        """Device bytes of one row: its three matrices and its biases."""
        biases = sum(b[0].nbytes for b in self.biases.stacks()) if self.biases is not None else 0
        return sum(p.row_bytes for p in self.projections) + biases

    @property
    def nbytes(self) -> int:
        return self.num_rows * self.expert_bytes

    def fill(self, first: int, experts: ExpertWeights) -> None:
        """Rows first.. hold `experts` (float weights, one row each), quantized on the device."""
        for i in range(experts.gate.shape[0]):
            biases = experts.biases.expert(i) if experts.biases is not None else ()
            self._write_floats(first + i, (experts.gate[i], experts.up[i], experts.down[i], *biases))

    def land(self, row: int, host: PackedHost, packed: Sequence[torch.Tensor]) -> None:
        """Row `row` holds the expert whose host arrays `packed` lie on the device: its nibbles and scales laid out
        again where the host holds this pool's int4 format, else quantized from the host's weights."""
        if host.fmt != self.fmt or self.fmt not in NIBBLE_FORMATS:
            self._write_floats(row, host.unpacked(tuple(packed)))
            return
        n = arrays_per_matrix(self.fmt)
        for i, projection in enumerate(self.projections):
            projection.write(row, int4_from_host(self.fmt, projection.shape, packed[i * n : (i + 1) * n],
                                                 self.dtype))
        self._write_biases(row, packed[3 * n :])

    def _write_floats(self, row: int, weights: Sequence[torch.Tensor]) -> None:
        """gate, up, down (float, on the device) quantized into `row`, then the biases."""
        for projection, w in zip(self.projections, weights[:3], strict=True):
            projection.write(row, quantize(w.to(self.device), self.fmt, self.dtype))
        self._write_biases(row, weights[3:])

    def _write_biases(self, row: int, biases: Sequence[torch.Tensor]) -> None:
        if self.biases is not None:
            for stack, b in zip(self.biases.stacks(), biases, strict=True):
                stack[row].copy_(b)

    def compute(self, x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """y [T, H] = sum over (t, k) with rows[t, k] >= 0 of weights[t, k] * expert_row(x[t]) (-1: elsewhere)."""
        if rows.numel() <= ALL_ROWS_MAX_PAIRS:
            return self._every_row(x, rows, weights)
        return grouped_rows(x, rows, weights, self._run_row)

    def _every_row(self, x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One kernel call per projection over every row, each pair keeping its own row's output: fixed shapes
        and no host read."""
        T, K = rows.shape
        kept = rows >= 0  # [T, K]
        row = rows.clamp(min=0)  # [T, K]: a skipped pair reads row 0, masked below
        I = self.gate.shape[0]
        pick = row[..., None].expand(T, K, I)
        g = self.gate.matmul_all(x).gather(1, pick)  # [T, K, I]
        u = self.up.matmul_all(x).gather(1, pick)
        if self.biases is not None:
            g, u = g + self.biases.gate[row], u + self.biases.up[row]
        h = gated(g, u, self.activation).reshape(T * K, I)  # [T*K, I]
        H = self.down.shape[0]
        out = self.down.matmul_all(h).gather(1, row.reshape(T * K, 1, 1).expand(T * K, 1, H)).view(T, K, H)
        if self.biases is not None:
            out = out + self.biases.down[row]
        out = torch.where(kept[..., None], out * weights[..., None].to(out.dtype), 0)  # NaN-safe for skipped pairs
        return out.sum(dim=1)

    def _run_row(self, row: int, h: torch.Tensor) -> torch.Tensor:
        """One row's expert on tokens h [n, H]."""
        bias = self.biases.expert(row) if self.biases is not None else (None, None, None)
        g, u = self.gate.row(row).matmul(h), self.up.row(row).matmul(h)
        if bias[0] is not None:
            g, u = g + bias[0], u + bias[1]
        out = self.down.row(row).matmul(gated(g, u, self.activation))
        return out if bias[2] is None else out + bias[2]


def int4_from_host(fmt: str, shape: tuple[int, int], arrays: Sequence[torch.Tensor], dtype: torch.dtype
                   ) -> Int4Weight:
    """One [O, K] matrix in offload's int4 / int4s tiles (`expert_arrays`: q, d and, for int4, m; on the device)
    -> torch's int4 layout with the same q values: scale = d, zero = m + 8 d (int4) or 0 (int4s)."""
    q, d = arrays[0], arrays[1]
    O_padded, K_padded = int4_padded(*shape)
    values = unpacked_values(fmt, q).to(torch.int32)  # [Op, Kp]: 0..15
    grid = values.new_zeros(O_padded, K_padded)
    grid[: values.shape[0], : values.shape[1]] = values
    scale_dtype = int4_scale_dtype(q.device, dtype)
    scale = torch.zeros(O_padded, K_padded // 32, dtype=torch.float32, device=q.device)
    zero = torch.zeros_like(scale)
    d = group_values(d).float()  # [Op, G]
    scale[: d.shape[0], : d.shape[1]] = d
    if fmt == "int4":
        zero[: d.shape[0], : d.shape[1]] = group_values(arrays[2]).float() + 8 * d
    return pack_int4(grid, scale.to(scale_dtype), zero.to(scale_dtype), shape)


def make_pool(fmt: str | None, pinned: Sequence[int], num_slots: int, hidden: int, intermediate: int,
              dtype: torch.dtype, device: torch.device, biased: bool, activation: ExpertActivation) -> ExpertPool:
    """A layer's pool in slot format `fmt`: None for the device dtype, else int8 / int4 / int4s."""
    if fmt is None:
        return DeviceExpertPool(pinned, num_slots, hidden, intermediate, dtype, device, biased, activation)
    return QuantExpertPool(fmt, pinned, num_slots, hidden, intermediate, dtype, device, biased, activation)

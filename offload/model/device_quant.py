"""Quantized dense weights on the device tier: int8 and int4 weight-only matmuls in torch.

The device tier (a GPU, or torch on the CPU under a simulated budget) runs its Linears through torch's packed
weight-only kernels when the plan quantizes the dense weights (`dense="int8" | "int4"`):

- int8: one symmetric scale per output row, `W[o, k] = q[o, k] * scale[o]`, q in -127..127;
  `torch._weight_int8pack_mm` on the CPU (its kernel needs K a multiple of 16 in bf16). On CUDA that kernel reads
  13-137 GB/s on an H200 (docs/benchmarks.md), so there q is converted to the input's dtype in blocks of rows and
  multiplied by torch's dense matmul, then scaled per output: the same products, about 5 bytes moved a weight.
- int4: groups of GROUP values along the input dim, `W[o, k] = (q[o, k] - 8) * scale[o, g] + zero[o, g]` with q in
  0..15 (torch's convention: `zero` is the value of q = 8, i.e. min + 8 * scale); packed by
  `torch._convert_weight_to_int4pack` and run by `torch._weight_int4pack_mm` on CUDA, by their `_for_cpu` twins on
  the CPU. The kernels want K a multiple of GROUP and N a multiple of 16 (CPU) or 8 (CUDA); the CUDA kernel
  computes in bf16 only (a float32 model's int4 matmuls run in bf16 there).

Odd shapes are padded with zero columns to a multiple of GROUP (both formats) and zero rows to a multiple of ROWS
(int4): the input is padded per call and the output sliced, so only tiny or unusual matrices pay for it.

Scales (and zeros) are in the model dtype, as the kernels take them. The CPU-only path (no device tier) keeps the
Numba kernels of csrc_py.linear in offload's own packed formats instead (model/layers.py: QuantLinear).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DEVICE_FORMATS = ("int8", "int4", "int4s")  # int4s: int4 with zero 0 and Q4_0 rounding (same device bytes)
GROUP = 32  # int4 values per scale and zero along the input dim: offload's CPU int4 group, torch's smallest
ROWS = 64  # int4 output rows are padded to this: the CPU kernel packs blocks of 64 rows (N % 16 at least), CUDA 8
DEQUANT_BLOCK_BYTES = 64 << 20  # an int8 matmul on CUDA converts at most this many bytes of q at a time


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def int4_padded(out_features: int, in_features: int) -> tuple[int, int]:
    """The [O, K] an int4 matrix is stored as."""
    return _round_up(out_features, ROWS), _round_up(in_features, GROUP)


def _pad_input(x: torch.Tensor, width: int) -> torch.Tensor:
    """x [T, K] with zero columns up to `width`, contiguous (the kernels read rows as they lie)."""
    return (F.pad(x, (0, width - x.shape[1])) if width != x.shape[1] else x).contiguous()


def nbytes(fmt: str, out_features: int, in_features: int, dtype_bytes: int) -> int:
    """Device bytes of one [O, K] matrix in `fmt` with scales in a dtype of `dtype_bytes` (padding included): what the
    planner counts before anything is loaded."""
    if fmt == "int8":
        return out_features * _round_up(in_features, GROUP) + out_features * dtype_bytes
    if fmt in ("int4", "int4s"):  # torch's layout keeps a zero per group either way
        O, K = int4_padded(out_features, in_features)
        return O * K // 2 + (K // GROUP) * O * 2 * dtype_bytes
    raise ValueError(f"unknown device format {fmt!r}")


@dataclass(frozen=True)
class Int8Weight:
    """W [O, K] as int8 rows and one scale per row."""

    q: torch.Tensor  # [O, K'] int8, K' = K padded to a multiple of GROUP
    scale: torch.Tensor  # [O] model dtype
    shape: tuple[int, int]  # (O, K) before padding

    fmt = "int8"

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def dequantize(self) -> torch.Tensor:
        """[O, K] float32: the matrix the kernel multiplies by."""
        return self.q[:, : self.shape[1]].float() * self.scale.float()[:, None]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # x [T, K] -> [T, O]
        x = _pad_input(x, self.q.shape[1])
        if int8_kernel(self.q.device) == "dequantized":
            return dequantized_int8_matmul(x, self.q, self.scale)
        return torch._weight_int8pack_mm(x, self.q, self.scale)


def int8_kernel(device: torch.device) -> str:
    """Which int8 matmul a device runs: torch's weight-only kernel where it is fast (the CPU), else the dense matmul
    over dequantized blocks (CUDA, where the weight-only kernel reads ~100 GB/s)."""
    return "dequantized" if device.type == "cuda" else "int8pack"


def dequantized_int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                            block_bytes: int = DEQUANT_BLOCK_BYTES) -> torch.Tensor:
    """x [T, K] @ (q [O, K] * scale [O]).T -> [T, O], as `_weight_int8pack_mm` computes it: q in x's dtype (exact,
    |q| <= 127), the dot products scaled per output. q is converted a block of rows at a time, so the transient
    copy stays under `block_bytes`."""
    rows = max(1, block_bytes // (q.shape[1] * x.element_size()))
    blocks = [F.linear(x, q[o : o + rows].to(x.dtype)) * scale[o : o + rows] for o in range(0, q.shape[0], rows)]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)


@dataclass(frozen=True)
class Int4Weight:
    """W [O, K] in groups of GROUP along K, packed for the device's int4 kernel."""

    packed: torch.Tensor  # torch's int4 layout (uint8 [O', K'/2] on the CPU, int32 tiles on CUDA)
    scale_zeros: torch.Tensor  # [K' / GROUP, O', 2] model dtype: (scale, zero) per group
    shape: tuple[int, int]  # (O, K) before padding

    fmt = "int4"

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale_zeros.nbytes

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # x [T, K] -> [T, O]
        O = self.shape[0]
        x = _pad_input(x, self.scale_zeros.shape[0] * GROUP)
        if self.packed.device.type == "cuda":
            y = torch._weight_int4pack_mm(x.to(torch.bfloat16), self.packed, GROUP, self.scale_zeros).to(x.dtype)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scale_zeros)
        return y if y.shape[1] == O else y[:, :O]


DeviceQuantWeight = Int8Weight | Int4Weight


def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> Int8Weight:
    """w [O, K] (any float dtype, on its device) -> per-row symmetric int8, rounded to nearest."""
    O, K = w.shape
    w = F.pad(w.float(), (0, _round_up(K, GROUP) - K))
    scale = (w.abs().amax(dim=1) / 127).to(dtype)  # [O]: rounded first, so q is chosen for the scale kept
    q = torch.round(w / scale.float().clamp(min=torch.finfo(torch.float32).tiny)[:, None]).clamp(-127, 127)
    return Int8Weight(q.to(torch.int8), scale, (O, K))


def int4_grid(w: torch.Tensor, dtype: torch.dtype, symmetric: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [O, K] -> (q [O', K'] int32 in 0..15, scale [O', K'/GROUP], zero [O', K'/GROUP]) in `dtype`, padded with
    zeros; each group spans its min..max in 15 steps, or (symmetric, int4s) zero 0 and the scale and rounding of
    llama.cpp's Q4_0: scale = the value of largest magnitude / -8, q = min(15, trunc(w / scale + 8.5))."""
    O, K = w.shape
    O_padded, K_padded = int4_padded(O, K)
    w = F.pad(w.float(), (0, K_padded - K, 0, O_padded - O))
    groups = w.reshape(O_padded, K_padded // GROUP, GROUP)
    if symmetric:
        peak = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True))[..., 0]  # [O', G]
        d = peak / -8
        inv = torch.where(d == 0, 0.0, 1 / d)
        q = torch.trunc(groups * inv[..., None] + 8.5).clamp(0, 15)
        return q.reshape(O_padded, K_padded).to(torch.int32), d.to(dtype), torch.zeros_like(d, dtype=dtype)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [O', G]
    scale = ((high - low) / 15).to(dtype)
    zero = (low + 8 * scale.float()).to(dtype)  # the value of q = 8
    step = scale.float().clamp(min=torch.finfo(torch.float32).tiny)[..., None]
    q = torch.round((groups - zero.float()[..., None]) / step + 8).clamp(0, 15)
    return q.reshape(O_padded, K_padded).to(torch.int32), scale, zero


def quantize_int4(w: torch.Tensor, dtype: torch.dtype, symmetric: bool = False) -> Int4Weight:
    """w [O, K] (any float dtype, on its device) -> grouped int4 in the device kernel's layout: asymmetric, or
    symmetric (int4s: zero 0)."""
    q, scale, zero = int4_grid(w, int4_scale_dtype(w.device, dtype), symmetric)
    return pack_int4(q, scale, zero, tuple(w.shape))


def int4_scale_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype of int4 scales and zeros: the model dtype, bf16 on CUDA (its kernel's only one)."""
    return torch.bfloat16 if device.type == "cuda" else dtype


def pack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: tuple[int, int]) -> Int4Weight:
    """An int4 grid (q [O', K'] int32 in 0..15, scale and zero [O', K'/GROUP], O' and K' padded as
    `int4_padded` says) -> the device kernel's layout, for a matrix of `shape` (O, K) before padding."""
    if q.device.type == "cuda":
        nibbles = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # [O', K'/2]: even column in the high nibble
        K_padded = q.shape[1]
        tiles = next(t for t in (8, 4, 2) if K_padded % (16 * t) == 0)
        packed = torch._convert_weight_to_int4pack(nibbles, tiles)
    else:
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    scale_zeros = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous()  # [G, O', 2]
    return Int4Weight(packed, scale_zeros, shape)


def quantize(w: torch.Tensor, fmt: str, dtype: torch.dtype) -> DeviceQuantWeight:
    """w [O, K] on the device tier's device -> its quantized form in `fmt` (scales in `dtype`)."""
    if fmt == "int8":
        return quantize_int8(w, dtype)
    if fmt in ("int4", "int4s"):
        return quantize_int4(w, dtype, symmetric=fmt == "int4s")
    raise ValueError(f"unknown device format {fmt!r}: use one of {', '.join(DEVICE_FORMATS)}")


def concat_outputs(weights: list[DeviceQuantWeight]) -> tuple[DeviceQuantWeight, list[int]]:
    """Weights of one format that read the same input, stacked along their outputs so that they run as one kernel
    call (q/k/v, MLA's q_a/kv_a, gate/up). Each part starts after the previous part's stored rows (int4 rows are
    padded to ROWS, a whole number of the packed layouts' row blocks: 64 on the CPU, 8 on CUDA). Returns the stack
    and each part's first output row."""
    fmt, K = weights[0].fmt, weights[0].shape[1]
    if any(w.fmt != fmt or w.shape[1] != K for w in weights):
        raise ValueError("concat_outputs: every part must be in one format with one input width, got "
                         + ", ".join(f"{w.fmt}{list(w.shape)}" for w in weights))
    if fmt == "int8":
        heights = [w.shape[0] for w in weights]
    else:
        heights = [w.scale_zeros.shape[1] for w in weights]  # padded rows
    starts = [sum(heights[:i]) for i in range(len(weights))]
    shape = (starts[-1] + weights[-1].shape[0], K)
    if fmt == "int8":
        return Int8Weight(torch.cat([w.q for w in weights]), torch.cat([w.scale for w in weights]), shape), starts
    return Int4Weight(torch.cat([w.packed for w in weights]), torch.cat([w.scale_zeros for w in weights], dim=1),
                      shape), starts


class DeviceQuantLinear(nn.Module):
    """y = x W^T (+ b) with W int8 or int4 on the device tier: to the model, a Linear."""

    def __init__(self, weight: DeviceQuantWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = weight
        self.bias = bias

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight.matmul(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)  # [..., O]
        return y if self.bias is None else y + self.bias

"""Packed weight formats: a stack of E matrices [E, O, K] (HF Linear layout, [out, in]) held as numpy arrays.

Exact byte layouts are in docs/formats.md. int8/int4/int4s pad O and K with zeros to multiples of 32 (the kernels
work on 16-row panels and 32-column groups); bf16 keeps the checkpoint's own layout. int4s ("symmetric int4", like
llama.cpp's Q4_0) is int4's nibble tiles with one scale per group and no offset: W = (q - 8) * d.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from csrc_py import quant_kernels as qk
from csrc_py.simd import GROUP, PANEL
from offload.errors import FormatError
from offload.weights import hugepages

if TYPE_CHECKING:
    from offload.weights.codecs import IntGroups

FORMATS = ("bf16", "int8", "int4", "int4s")
NIBBLE_FORMATS = ("int4", "int4s")  # the formats whose q holds two 4-bit values per byte


def padded(n: int) -> int:
    """n rounded up to a whole number of quantization groups."""
    return -(-n // GROUP) * GROUP


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise FormatError(f"unknown weight format {fmt!r}: use one of {', '.join(FORMATS)}")


def _layouts(fmt: str, E: int, O: int, K: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Array name -> (shape, dtype) of each array a packed [E, O, K] matrix holds."""
    if fmt == "bf16":
        return {"q": ((E, O, K), np.dtype(np.uint16))}
    P, G = padded(O) // PANEL, padded(K) // GROUP
    scales = ((E, P, G, PANEL), np.dtype(np.float16))
    if fmt == "int8":
        return {"q": ((E, P, padded(K) // 4, PANEL, 4), np.dtype(np.int8)), "d": scales}
    nibbles = {"q": ((E, P, padded(K) // 8, PANEL, 4), np.dtype(np.uint8)), "d": scales}
    return nibbles if fmt == "int4s" else {**nibbles, "m": scales}


@dataclass(frozen=True)
class PackedMatrix:
    """E matrices of logical shape [O, K] in format `fmt`: q holds the values, d the fp16 group scales
    (int8, int4, int4s) and m the fp16 group offsets (int4)."""

    fmt: str
    shape: tuple[int, int, int]  # (E, O, K) before padding
    q: np.ndarray
    d: np.ndarray | None = None
    m: np.ndarray | None = None

    def __post_init__(self) -> None:
        check_format(self.fmt)
        for name, (shape, dtype) in _layouts(self.fmt, *self.shape).items():
            arr = getattr(self, name)
            if arr is None or arr.shape != shape or arr.dtype != dtype or not arr.flags.c_contiguous:
                got = "missing" if arr is None else f"{arr.dtype}{list(arr.shape)}"
                raise FormatError(f"{self.fmt} matrix of shape {list(self.shape)} needs {name} as C-contiguous "
                                  f"{dtype}{list(shape)}, got {got}: repack it with csrc_py.formats.pack")
        extra = [n for n in ("d", "m") if getattr(self, n) is not None and n not in _layouts(self.fmt, 1, 1, 1)]
        if extra:
            raise FormatError(f"{self.fmt} matrices carry no {'/'.join(extra)} array")

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.q, self.d, self.m) if a is not None)

    @property
    def padded_shape(self) -> tuple[int, int, int]:
        E, O, K = self.shape
        return (E, O, K) if self.fmt == "bf16" else (E, padded(O), padded(K))

    def bits(self) -> tuple[np.ndarray | None, ...]:
        """The arrays as the kernels take them (fp16 scales reinterpreted as uint16): (q,) for bf16, (q, d) for
        int8, (q, d, m) for int4 and (q, d, None) for int4s, whose None offsets make the int4 kernels compile
        their symmetric form."""
        if self.fmt == "int4s":
            return self.q, self.d.view(np.uint16), None
        return (self.q,) + tuple(a.view(np.uint16) for a in (self.d, self.m) if a is not None)

    def kernel_tuple(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(q, d, m) as compiled callers take a matrix of any format (csrc_py.expert_ffn.packed_experts, the
        compiled decode step): d and m as uint16 bits, m is d for int8 and None for int4s, d and m a dummy array
        for bf16."""
        if self.fmt == "bf16":
            dummy = np.zeros((1, 1, 1, 1), np.uint16)
            return self.q, dummy, dummy
        bits = self.bits()
        return bits[0], bits[1], bits[2] if len(bits) > 2 else bits[1]


def empty(fmt: str, E: int, O: int, K: int) -> PackedMatrix:
    check_format(fmt)
    arrays = {name: hugepages.empty(shape, dtype) for name, (shape, dtype) in _layouts(fmt, E, O, K).items()}
    return PackedMatrix(fmt, (E, O, K), **arrays)


def pack(w: torch.Tensor | np.ndarray, fmt: str) -> PackedMatrix:
    """Quantize / repack a float stack [E, O, K] (any float dtype), one expert at a time."""
    check_format(fmt)
    w = torch.as_tensor(w)
    if w.dim() != 3 or not w.is_floating_point():
        raise FormatError(f"expected a float tensor [experts, out, in], got {w.dtype}{list(w.shape)}")
    E, O, K = w.shape
    if fmt == "bf16":
        # Zero-copy when the checkpoint is already bf16: the bits are the storage.
        q = w.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
        return PackedMatrix(fmt, (E, O, K), q)
    out = empty(fmt, E, O, K)
    for e in range(E):
        pack_expert(out, e, w[e])
    return out


def pack_expert(out: PackedMatrix, e: int, w: torch.Tensor | np.ndarray) -> None:
    """Quantize one float matrix [O, K] into expert slot e of `out` (streaming writers pack one at a time)."""
    w = torch.as_tensor(w)
    if tuple(w.shape) != out.shape[1:]:
        raise FormatError(f"expected a matrix {list(out.shape[1:])}, got {list(w.shape)}")
    if out.fmt == "bf16":
        out.q[e] = w.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
        return
    we = w.detach().to("cpu", torch.float32).contiguous().numpy()  # [O, K]
    if out.fmt == "int8":
        qk.quantize_q8(we, out.q[e], out.d[e].view(np.uint16))
    elif out.fmt == "int4s":
        qk.quantize_q4s(we, out.q[e], out.d[e].view(np.uint16))
    else:
        qk.quantize_q4(we, out.q[e], out.d[e].view(np.uint16), out.m[e].view(np.uint16))


def pack_groups(groups: IntGroups, fmt: str, *, round_scales: bool = False) -> PackedMatrix | None:
    """A matrix on a published integer grid (offload.weights.codecs.IntGroups) as one [1, O, K] matrix in `fmt`,
    moving its values without requantizing; None where it does not fit (the caller dequantizes and packs).

    int8 takes signed grids with |q| <= 127 and no offset; int4 takes unsigned grids 0..15, and signed -8..7 ones
    as q + 8 with offset - 8 * scale; int4s takes the grids int4 takes whose offset is exactly -8 * scale (signed
    -8..7 grids without an offset, as Q4_0 and symmetric GPTQ / compressed-tensors store them). The source group
    must be a multiple of 32 (each group of 32 takes its source group's scale). Scales and offsets must be exact
    in fp16, unless round_scales: then they are rounded to the nearest fp16 (still None where one overflows
    fp16). A group whose values are all 0 takes scale 0. Where it returns a matrix without round_scales, unpack()
    gives groups.dequantize() bit for bit."""
    check_format(fmt)
    if fmt == "bf16":
        return None
    out = empty(fmt, 1, *groups.shape)
    return out if pack_groups_expert(out, 0, groups, round_scales=round_scales) else None


def pack_groups_expert(out: PackedMatrix, e: int, groups: IntGroups, *, round_scales: bool = False) -> bool:
    """As pack_groups, into expert slot e of `out` (streaming writers stack experts one at a time). Returns
    whether it fit; where it did not, slot e is left as it was."""
    if tuple(groups.shape) != out.shape[1:]:
        raise FormatError(f"expected a matrix {list(out.shape[1:])}, got {list(groups.shape)}")
    grid = None if out.fmt == "bf16" or groups.group % GROUP else _target_grid(groups, out.fmt)
    if grid is None:
        return False
    q, scale, offset = grid
    d = _fp16(scale, round_scales)
    m = _fp16(offset, round_scales) if out.fmt == "int4" else None  # int4s: offset = -8 * scale, not stored
    if d is None or (out.fmt == "int4" and m is None):
        return False
    (_, O, K), (Op, Kp) = out.shape, out.padded_shape[1:]
    P, Gp = Op // PANEL, Kp // GROUP
    source_group = np.arange(Gp) * GROUP // groups.group  # [Gp]: the source group of each group of 32
    Q = np.full((Op, Kp), 8 if out.fmt == "int4s" else 0, q.dtype)  # padding: int4s' zero is q = 8
    Q[:O, :K] = q
    if out.fmt in NIBBLE_FORMATS:  # byte (row, 4t + b): column 8t + b in the low nibble, 8t + 4 + b in the high
        halves = Q.reshape(Op, Kp // 8, 2, 4)
        Q = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(Op, Kp // 2)
    out.q[e] = Q.reshape(P, PANEL, -1, 4).transpose(0, 2, 1, 3)
    for name, values in (("d", d), ("m", m)):
        if values is not None:
            full = np.zeros((Op, Gp), np.float16)
            full[:O] = values[:, source_group]
            getattr(out, name)[e] = full.reshape(P, PANEL, Gp).transpose(0, 2, 1)
    return True


def _target_grid(groups: IntGroups, fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(q [O, K] as `fmt` stores it: int8, or uint8 0..15 for int4 / int4s; scale, offset float64 [O, G]) with
    q * scale + offset = the source's values, or None where the source grid does not fit `fmt`."""
    q = groups.q
    scale = groups.scale.astype(np.float64)
    offset = np.zeros_like(scale) if groups.offset is None else groups.offset.astype(np.float64)
    starts = np.arange(0, q.shape[1], groups.group)
    zero_values = (np.maximum.reduceat(np.abs(q.astype(np.int16)), starts, axis=1) == 0) & (offset == 0)
    scale[zero_values] = 0  # any scale gives 0 there: e.g. MXFP4's 2^-128 of an all-zero block, not an fp16
    if fmt == "int8":
        fits = q.dtype == np.int8 and q.min(initial=0) >= -127 and not offset.any()
        return (q, scale, offset) if fits else None
    if q.dtype == np.uint8 and q.max(initial=0) <= 15:
        grid = q, scale, offset
    elif q.dtype == np.int8 and q.min(initial=0) >= -8 and q.max(initial=0) <= 7:
        grid = (q.astype(np.int16) + 8).astype(np.uint8), scale, offset - 8 * scale
    else:
        return None
    symmetric = np.array_equal(grid[2], -8 * scale)  # int4s has no offset array: -8 * scale is implied
    return grid if fmt == "int4" or symmetric else None


def _fp16(values: np.ndarray, round_scales: bool) -> np.ndarray | None:
    """float64 values as fp16 (numpy rounds to nearest even); None where one overflows, or is not exact and
    rounding was not asked for."""
    with np.errstate(over="ignore"):  # an overflow is refused just below
        h = values.astype(np.float16)
    if not np.isfinite(h).all() or (not round_scales and not np.array_equal(h.astype(np.float64), values)):
        return None
    return h


def concat_outputs(mats: list[PackedMatrix]) -> tuple[PackedMatrix, list[int]]:
    """Stack single matrices that share their input width into one [1, O, K] matrix, e.g. q/k/v projections run
    as one kernel call. Each part starts at a whole panel (after the previous part's padded height); returns the
    fused matrix and each part's first output row."""
    fmt, K = mats[0].fmt, mats[0].shape[2]
    if any(m.fmt != fmt or m.shape[0] != 1 or m.shape[2] != K for m in mats):
        raise FormatError("concat_outputs: every part must be one matrix [1, O, K] of the same format and K, got "
                          + ", ".join(f"{m.fmt}{list(m.shape)}" for m in mats))
    heights = [m.shape[1] if fmt == "bf16" else padded(m.shape[1]) for m in mats]
    starts = [sum(heights[:i]) for i in range(len(mats))]
    arrays = {}
    for name in _layouts(fmt, 1, 1, 1):
        parts = [getattr(m, name) for m in mats]
        shape = (1, sum(a.shape[1] for a in parts), *parts[0].shape[2:])
        arrays[name] = np.concatenate(parts, axis=1, out=hugepages.empty(shape, parts[0].dtype))
    return PackedMatrix(fmt, (1, starts[-1] + mats[-1].shape[1], K), **arrays), starts


def unpack(pm: PackedMatrix, expert: int | None = None) -> np.ndarray:
    """Dequantize to float32 [E, O, K] (or [O, K] for one expert)."""
    experts = range(pm.shape[0]) if expert is None else [expert]
    E, O, K = pm.shape
    out = np.empty((len(experts), O, K), np.float32)
    for i, e in enumerate(experts):
        if pm.fmt == "bf16":
            out[i] = (pm.q[e].astype(np.uint32) << 16).view(np.float32)
        elif pm.fmt == "int8":
            qk.dequantize_q8(pm.q[e], pm.d[e].view(np.uint16), out[i])
        else:
            qk.dequantize_q4(pm.q[e], pm.d[e].view(np.uint16), None if pm.m is None else pm.m[e].view(np.uint16),
                             out[i])
    return out if expert is None else out[0]


def expert_arrays(pm: PackedMatrix, expert: int) -> tuple[torch.Tensor, ...]:
    """Expert `expert` of `pm` as CPU tensors that share its memory: q (bf16 bits as torch.bfloat16), then d and
    m (float16) where the format has them. What an upload copies to a device, byte for byte."""
    q = pm.q[expert]
    values = torch.from_numpy(q.view(np.int16)).view(torch.bfloat16) if pm.fmt == "bf16" else torch.from_numpy(q)
    return (values, *(torch.from_numpy(a[expert]) for a in (pm.d, pm.m) if a is not None))


def arrays_per_matrix(fmt: str) -> int:
    """How many arrays `expert_arrays` gives for one matrix of format `fmt`."""
    check_format(fmt)
    return len(_layouts(fmt, 1, 1, 1))


def unpack_arrays(fmt: str, O: int, K: int, q: torch.Tensor, d: torch.Tensor | None = None,
                  m: torch.Tensor | None = None) -> torch.Tensor:
    """`expert_arrays` of one [O, K] matrix -> float32 [O, K], in torch on the arrays' device: the same values
    as `unpack` (the same float32 products and sums, bit for bit), so a device that dequantizes uploaded packed
    bytes computes with the weights the CPU side holds."""
    if fmt == "bf16":
        return q.float()
    rows = unpacked_values(fmt, q)
    scale = _per_column(d)
    w = rows.float() * scale  # [Op, Kp]
    if m is not None:
        w = w + _per_column(m)  # a product then a sum, each rounded, as the CPU unpack does
    elif fmt == "int4s":
        w = w + -8 * scale  # q * d - 8 * d: exact, as the CPU unpack computes it
    return w[:O, :K]


def unpacked_values(fmt: str, q: torch.Tensor) -> torch.Tensor:
    """An int8/int4/int4s matrix's q tiles [P, Kp/4 or Kp/8, 16, 4] -> its stored values [Op, Kp] (int8: -127..127,
    nibbles: 0..15, in q's dtype), in torch where q lies: the values before any scale is applied."""
    P, tiles = q.shape[0], q.shape[1]
    rows = q.permute(0, 2, 1, 3).reshape(P * PANEL, tiles * 4)  # [Op, bytes per row]: a tile's rows side by side
    if fmt in NIBBLE_FORMATS:  # byte 4t + b of a row: column 8t + b in the low nibble, 8t + 4 + b in the high one
        pairs = rows.reshape(P * PANEL, tiles, 1, 4)
        rows = torch.cat((pairs & 15, pairs >> 4), dim=2).reshape(P * PANEL, tiles * 8)
    return rows


def group_values(groups: torch.Tensor) -> torch.Tensor:
    """Group values [P, Kp/32, 16] (the d or m array of one matrix) -> [Op, Kp/32], one per row and group."""
    P = groups.shape[0]
    return groups.permute(0, 2, 1).reshape(P * PANEL, -1)


def _per_column(groups: torch.Tensor) -> torch.Tensor:
    """Group values [P, Kp/32, 16] (fp16) -> float32 [Op, Kp], each repeated over its group's 32 columns."""
    return group_values(groups).float().repeat_interleave(GROUP, dim=1)

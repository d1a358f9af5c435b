"""Numba kernels that quantize and dequantize one matrix in the packed layouts of docs/formats.md, plus the
per-token activation quantizer the int8/int4 matmuls consume.

Weight quantizers take one float32 matrix [O, K] and fill one expert's slice of the packed arrays, so a whole
layer never has to exist in float32 at once. Scales are stored as fp16 bits (uint16: Numba has no float16).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from csrc_py.simd import GROUP, PANEL, bits_to_f32, f32_to_bits


@njit(nogil=True, cache=True, inline="always")
def fp16_to_f32(h: np.uint16) -> np.float32:
    """fp16 bits -> float32, exact for normal and subnormal halves (inf/NaN are never stored)."""
    hb = np.uint32(h)
    mag = hb & np.uint32(0x7FFF)
    if mag < np.uint32(0x0400):
        val = np.float32(mag) * np.float32(2.0**-24)
    else:
        val = bits_to_f32(np.uint32((mag << np.uint32(13)) + np.uint32(112 << 23)))
    return -val if hb & np.uint32(0x8000) else val


@njit(nogil=True, cache=True, inline="always")
def f32_to_fp16(v: np.float32) -> np.uint16:
    """float32 -> fp16 bits, round to nearest even like numpy's astype(float16); saturates to inf."""
    b = f32_to_bits(np.float32(v))
    sign = (b >> np.uint32(16)) & np.uint32(0x8000)
    a = b & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x477FF000):  # rounds to >= 65520: inf
        return np.uint16(sign | np.uint32(0x7C00))
    if a < np.uint32(0x38800000):  # below 2**-14: a subnormal half, counted in units of 2**-24
        return np.uint16(sign | np.uint32(np.rint(bits_to_f32(a) * np.float32(2.0**24))))
    r = a - np.uint32(0x38000000)
    r = (r + np.uint32(0x0FFF) + ((r >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
    return np.uint16(sign | r)


@njit(nogil=True, cache=True, inline="always")
def _q8_value(w: np.ndarray, row: int, c: int, inv: np.float32) -> np.int8:
    if row >= w.shape[0] or c >= w.shape[1]:
        return np.int8(0)
    return np.int8(min(max(np.rint(w[row, c] * inv), np.float32(-127.0)), np.float32(127.0)))


@njit(nogil=True, cache=True, inline="always")
def _q4_value(w: np.ndarray, row: int, c: int, inv: np.float32, offset: np.float32) -> np.uint8:
    if row >= w.shape[0] or c >= w.shape[1]:
        return np.uint8(0)
    return np.uint8(min(max(np.rint((w[row, c] - offset) * inv), np.float32(0.0)), np.float32(15.0)))


@njit(parallel=True, nogil=True, cache=True)
def quantize_q8(w: np.ndarray, q: np.ndarray, d: np.ndarray) -> None:
    """w float32 [O, K] -> q int8 [Op/16, Kp/4, 16, 4] tiles and d fp16 bits [Op/16, Kp/32, 16] (one expert)."""
    O, K = w.shape
    npanels, ngroups = d.shape[0], d.shape[1]
    for p in prange(npanels):  # whole panels per thread: rows of a panel share cache lines
        for r in range(PANEL):
            row = p * PANEL + r
            for g in range(ngroups):
                amax = np.float32(0.0)
                if row < O:
                    for c in range(g * GROUP, min(K, g * GROUP + GROUP)):
                        amax = max(amax, abs(w[row, c]))
                dh = f32_to_fp16(amax / np.float32(127.0))
                d[p, g, r] = dh
                df = fp16_to_f32(dh)
                inv = np.float32(1.0) / df if df > 0 else np.float32(0.0)
                for c in range(g * GROUP, g * GROUP + GROUP):
                    q[p, c // 4, r, c % 4] = _q8_value(w, row, c, inv)


@njit(parallel=True, nogil=True, cache=True)
def quantize_q4(w: np.ndarray, q: np.ndarray, d: np.ndarray, m: np.ndarray) -> None:
    """w float32 [O, K] -> q uint8 [Op/16, Kp/8, 16, 4] nibble tiles, d and m fp16 bits [Op/16, Kp/32, 16]:
    w ~ d * nibble + m per row and group of 32. Byte (p, t, r, b) holds column 8t+b low, 8t+4+b high."""
    O, K = w.shape
    npanels, ngroups = d.shape[0], d.shape[1]
    for p in prange(npanels):
        for r in range(PANEL):
            row = p * PANEL + r
            for g in range(ngroups):
                lo = np.float32(0.0)
                hi = np.float32(0.0)
                if row < O:  # the range of the real columns only: padding must not widen it
                    lo = np.float32(np.inf)
                    hi = np.float32(-np.inf)
                    for c in range(g * GROUP, min(K, g * GROUP + GROUP)):
                        lo = min(lo, w[row, c])
                        hi = max(hi, w[row, c])
                dh = f32_to_fp16((hi - lo) / np.float32(15.0))
                mh = f32_to_fp16(lo)
                d[p, g, r] = dh
                m[p, g, r] = mh
                df = fp16_to_f32(dh)
                mf = fp16_to_f32(mh)
                inv = np.float32(1.0) / df if df > 0 else np.float32(0.0)
                for t in range(g * 4, g * 4 + 4):
                    for b in range(4):
                        low = _q4_value(w, row, 8 * t + b, inv, mf)
                        high = _q4_value(w, row, 8 * t + 4 + b, inv, mf)
                        q[p, t, r, b] = low | (high << np.uint8(4))


@njit(parallel=True, nogil=True, cache=True)
def quantize_q4s(w: np.ndarray, q: np.ndarray, d: np.ndarray) -> None:
    """w float32 [O, K] -> q uint8 nibble tiles as quantize_q4 and d fp16 bits [Op/16, Kp/32, 16]: w ~ d * (q - 8)
    per row and group of 32, rounded as llama.cpp's quantize_row_q4_0_ref (d = the value of largest magnitude / -8,
    q = min(15, trunc(w / d + 8.5)) with 1 / d in float32), so a Q4_0 export of the same weights holds the same
    numbers."""
    O, K = w.shape
    npanels, ngroups = d.shape[0], d.shape[1]
    for p in prange(npanels):
        for r in range(PANEL):
            row = p * PANEL + r
            for g in range(ngroups):
                amax = np.float32(0.0)
                peak = np.float32(0.0)  # the first value of largest magnitude, with its sign
                if row < O:
                    for c in range(g * GROUP, min(K, g * GROUP + GROUP)):
                        if abs(w[row, c]) > amax:
                            amax = abs(w[row, c])
                            peak = w[row, c]
                df = peak / np.float32(-8.0)
                d[p, g, r] = f32_to_fp16(df)
                inv = np.float32(1.0) / df if df != 0 else np.float32(0.0)
                for t in range(g * 4, g * 4 + 4):
                    for b in range(4):
                        low = _q4s_value(w, row, 8 * t + b, inv)
                        high = _q4s_value(w, row, 8 * t + 4 + b, inv)
                        q[p, t, r, b] = low | (high << np.uint8(4))


@njit(nogil=True, cache=True, inline="always")
def _q4s_value(w: np.ndarray, row: int, c: int, inv: np.float32) -> np.uint8:
    if row >= w.shape[0] or c >= w.shape[1]:
        return np.uint8(8)  # padding: (8 - 8) * d = 0
    return np.uint8(min(max(np.trunc(w[row, c] * inv + np.float32(8.5)), np.float32(0.0)), np.float32(15.0)))


def group_offset(m, p, g, r, scale):
    """The float32 offset of group (p, g, r): m's fp16 bits (int4), or -8 * scale where m is None (int4s)."""
    raise NotImplementedError("compiled code only")


@overload(group_offset)
def _group_offset(m, p, g, r, scale):
    if isinstance(m, types.NoneType):
        return lambda m, p, g, r, scale: np.float32(-8.0) * scale
    return lambda m, p, g, r, scale: fp16_to_f32(m[p, g, r])


@njit(parallel=True, nogil=True, cache=True)
def dequantize_q8(q: np.ndarray, d: np.ndarray, out: np.ndarray) -> None:
    """Inverse of quantize_q8 into out float32 [O, K] (O, K at most the padded shape).

    A row's 4 bytes of a tile are read as one int32: one load instead of four (~2 G weights/s per core)."""
    O, K = out.shape
    words = q.view(np.int32)  # [P, Kp/4, 16, 1]
    for p in prange(d.shape[0]):
        for r in range(min(PANEL, O - p * PANEL)):
            row = out[p * PANEL + r]
            for g in range(K // GROUP):  # whole groups: no bounds tests in the unrolled body
                s = fp16_to_f32(d[p, g, r])
                cols = row[g * GROUP: g * GROUP + GROUP]
                for t in range(8):
                    word = words[p, 8 * g + t, r, 0]
                    for b in range(4):
                        cols[4 * t + b] = np.float32(np.int8(word >> (8 * b))) * s
            for c in range(K // GROUP * GROUP, K):
                row[c] = np.float32(q[p, c // 4, r, c % 4]) * fp16_to_f32(d[p, c // GROUP, r])


@njit(parallel=True, nogil=True, cache=True)
def dequantize_q4(q: np.ndarray, d: np.ndarray, m: np.ndarray, out: np.ndarray) -> None:
    """Inverse of quantize_q4 (m fp16 bits) or quantize_q4s (m None) into out float32 [O, K]. int4s comes out
    exact: q * d - 8 * d is (q - 8) * d, representable, as a sum of two exact products."""
    O, K = out.shape
    words = q.view(np.int32)  # [P, Kp/8, 16, 1]
    for p in prange(d.shape[0]):
        for r in range(min(PANEL, O - p * PANEL)):
            row = out[p * PANEL + r]
            for g in range(K // GROUP):
                s = fp16_to_f32(d[p, g, r])
                offset = group_offset(m, p, g, r, s)
                cols = row[g * GROUP: g * GROUP + GROUP]
                for t in range(4):
                    word = words[p, 4 * g + t, r, 0]
                    for b in range(4):
                        byte = (word >> (8 * b)) & 0xFF
                        cols[8 * t + b] = np.float32(byte & 15) * s + offset
                        cols[8 * t + 4 + b] = np.float32(byte >> 4) * s + offset
            for c in range(K // GROUP * GROUP, K):
                byte = q[p, c // 8, r, c % 4]
                nib = (byte >> np.uint8(4)) if c % 8 >= 4 else (byte & np.uint8(15))
                si = c // GROUP
                s = fp16_to_f32(d[p, si, r])
                row[c] = np.float32(nib) * s + group_offset(m, p, si, r, s)


# Up to this many rows, the per-row helpers of a layer call (activation quantization, gathers, SwiGLU, combine)
# run on the calling thread: a decode step's few rows cost less than waking the pool (a parallel region each).
SERIAL_MAX_ROWS = 8


@njit(nogil=True, cache=True, inline="always")
def _quantize_row(x: np.ndarray, n: int, xq: np.ndarray, xs: np.ndarray, xsum: np.ndarray) -> None:
    K = x.shape[1]
    for g in range(xs.shape[1]):
        c0, c1 = g * GROUP, min(K, g * GROUP + GROUP)
        if c1 - c0 == GROUP:
            # four independent max chains, not one 32 long: max is exact, so the same amax; a decode step's 2048-7168
            # values quantized 1.3-1.5x faster (one chain's latency bounded the loop)
            m0 = m1 = m2 = m3 = np.float32(0.0)
            for c in range(c0, c1, 4):
                m0 = max(m0, abs(x[n, c]))
                m1 = max(m1, abs(x[n, c + 1]))
                m2 = max(m2, abs(x[n, c + 2]))
                m3 = max(m3, abs(x[n, c + 3]))
            amax = max(max(m0, m1), max(m2, m3))
        else:
            amax = np.float32(0.0)
            for c in range(c0, c1):
                amax = max(amax, abs(x[n, c]))
        s = amax / np.float32(127.0)
        inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        total = np.int32(0)
        for c in range(c0, c0 + GROUP):
            v = np.int8(np.rint(x[n, c] * inv)) if c < c1 else np.int8(0)
            xq[n, c] = v
            total += np.int32(v)
        xs[n, g] = s
        xsum[n, g] = total


@njit(parallel=True, nogil=True, cache=True)
def _quantize_rows_parallel(x, xq, xs, xsum) -> None:
    for n in prange(x.shape[0]):
        _quantize_row(x, n, xq, xs, xsum)


@njit(nogil=True, cache=True)
def _quantize_rows_serial(x, xq, xs, xsum) -> None:
    for n in range(x.shape[0]):
        _quantize_row(x, n, xq, xs, xsum)


@njit(nogil=True, cache=True)
def quantize_activations(x: np.ndarray, xq: np.ndarray, xs: np.ndarray, xsum: np.ndarray) -> None:
    """x float32 [N, K] -> xq int8 [N, Kp] (zero beyond K), xs float32 [N, Kp/32] scales, xsum int32 group sums.

    Symmetric per group of 32, like the weights: the matmuls multiply weight and activation group scales."""
    N, K = x.shape
    ngroups = xs.shape[1]
    if K > ngroups * GROUP or xq.shape[1] != ngroups * GROUP or xq.shape[0] != N or xs.shape[0] != N \
            or xsum.shape[0] != N or xsum.shape[1] != ngroups:
        raise ValueError("quantize_activations: x [N, K] needs xq [N, Kp] and xs, xsum [N, Kp/32] with K <= Kp")
    if N <= SERIAL_MAX_ROWS:
        _quantize_rows_serial(x, xq, xs, xsum)
    else:
        _quantize_rows_parallel(x, xq, xs, xsum)


@njit(nogil=True, cache=True)
def quantized_rows(a: np.ndarray, ngroups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """a float32 [N, K] -> (int8 [N, ngroups*32], scales [N, ngroups], sums [N, ngroups]) for the int matmuls."""
    aq = np.empty((a.shape[0], ngroups * GROUP), np.int8)
    a_s = np.empty((a.shape[0], ngroups), np.float32)
    a_sum = np.empty((a.shape[0], ngroups), np.int32)
    quantize_activations(a, aq, a_s, a_sum)
    return aq, a_s, a_sum

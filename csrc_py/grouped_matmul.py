"""Segmented matmuls: rows of an activation matrix grouped by expert, each segment times its expert's matrix.

    out[r, :] = A[r, :] @ W[seg_expert[s]].T   for r in seg_start[s] .. seg_start[s+1]

One work item is (segment, 16-row output panel, chunk of <= 8 activation rows); items are ordered so that one
thread walks the chunks of a panel back to back and reads the panel from DRAM once. A fused MoE layer calls these
with the token->expert pairs sorted by expert; a dense linear calls them with one segment.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from csrc_py.simd import GROUP, MAX_NR, PANEL, bits_to_f32, panel_q4, panel_q8


@njit(nogil=True, cache=True)
def work_items(seg_start: np.ndarray, npanels: int) -> np.ndarray:
    """[n_items, 4] rows of (segment, panel, first row, rows) for `npanels` output panels."""
    n = 0
    for s in range(seg_start.size - 1):
        n += npanels * ((seg_start[s + 1] - seg_start[s] + MAX_NR - 1) // MAX_NR)
    items = np.empty((n, 4), np.int64)
    i = 0
    for s in range(seg_start.size - 1):
        for p in range(npanels):
            for r0 in range(seg_start[s], seg_start[s + 1], MAX_NR):
                items[i, 0], items[i, 1], items[i, 2] = s, p, r0
                items[i, 3] = min(MAX_NR, seg_start[s + 1] - r0)
                i += 1
    return items


@njit(nogil=True, cache=True)
def check_shapes(E: int, O: int, K: int, seg_expert, seg_start, a, out) -> None:
    """The microkernels trust their offsets: refuse shapes that would read or write out of bounds."""
    rows = seg_start[-1]
    if out.shape[1] != O or a.shape[1] != K or out.shape[0] < rows or a.shape[0] < rows:
        raise ValueError("grouped matmul: activations must be [rows, K] and out [rows, O] (padded for int8/int4)")
    if seg_expert.size + 1 != seg_start.size or (seg_expert.size and (seg_expert.min() < 0 or seg_expert.max() >= E)):
        raise ValueError("grouped matmul: bad segments")
    for s in range(seg_expert.size):
        if seg_start[s] < 0 or seg_start[s + 1] < seg_start[s]:
            raise ValueError("grouped matmul: segment starts must not decrease")


@njit(nogil=True, cache=True)
def check_quantized(q, d, tile_cols: int, a_s, a_sum, rows: int) -> None:
    """Packed tiles agree with their scales; activation scales and sums cover every row and group."""
    E, P, G = d.shape[0], d.shape[1], d.shape[2]
    if q.shape[0] != E or q.shape[1] != P or q.shape[2] * tile_cols != G * GROUP:
        raise ValueError("grouped matmul: packed tiles and scales disagree")
    if a_s.shape[1] != G or a_sum.shape[1] != G or a_s.shape[0] < rows or a_sum.shape[0] < rows:
        raise ValueError("grouped matmul: activation scales must be [rows, K/32]")


@njit(nogil=True, cache=True, inline="always")
def _q8_item(wf, df, P, G, seg_expert, items, i, af, sf, cf, of) -> None:
    """Work item i of an int8 matmul (raveled arrays, P panels, G groups): one 16-row panel of one expert times up
    to 8 activation rows."""
    kp = G * GROUP
    s, p, r0, nr = items[i, 0], items[i, 1], items[i, 2], items[i, 3]
    panel = seg_expert[s] * P + p
    panel_q8(wf, panel * PANEL * kp, df, panel * PANEL * G, af, kp, sf, cf, G, G, of, p * PANEL, P * PANEL, r0, nr)


@njit(nogil=True, cache=True)
def _check_q8(q, d, seg_expert, seg_start, aq, a_s, a_sum, out) -> None:
    E, P, G = d.shape[0], d.shape[1], d.shape[2]
    check_shapes(E, P * PANEL, G * GROUP, seg_expert, seg_start, aq, out)
    check_quantized(q, d, 4, a_s, a_sum, seg_start[-1])


@njit(parallel=True, nogil=True, cache=True)
def matmul_q8(q, d, seg_expert, seg_start, aq, a_s, a_sum, out) -> None:
    """q int8 [E, P, Kp/4, 16, 4], d fp16 bits [E, P, G, 16]; aq int8 [R, Kp], a_s f32 / a_sum i32 [R, G]
    (quantize_activations); out float32 [R, P*16]."""
    _check_q8(q, d, seg_expert, seg_start, aq, a_s, a_sum, out)
    P, G = d.shape[1], d.shape[2]
    items = work_items(seg_start, P)
    wf, df, af, sf, cf, of = q.ravel(), d.ravel(), aq.ravel(), a_s.ravel(), a_sum.ravel(), out.ravel()
    for i in prange(items.shape[0]):
        _q8_item(wf, df, P, G, seg_expert, items, i, af, sf, cf, of)


@njit(parallel=True, nogil=True, cache=True)
def matmul_q8_pair(q, d, q2, d2, seg_expert, seg_start, aq, a_s, a_sum, out, out2) -> None:
    """matmul_q8 of two matrices of one shape on the same activations (the experts' gate and up) in one parallel
    region: one launch instead of two, each thread streaming its share of both."""
    _check_q8(q, d, seg_expert, seg_start, aq, a_s, a_sum, out)
    _check_q8(q2, d2, seg_expert, seg_start, aq, a_s, a_sum, out2)
    P, G = d.shape[1], d.shape[2]
    items = work_items(seg_start, P)
    n = items.shape[0]
    wf, df, of, wf2, df2, of2 = q.ravel(), d.ravel(), out.ravel(), q2.ravel(), d2.ravel(), out2.ravel()
    af, sf, cf = aq.ravel(), a_s.ravel(), a_sum.ravel()
    for j in prange(2 * n):
        if j < n:
            _q8_item(wf, df, P, G, seg_expert, items, j, af, sf, cf, of)
        else:
            _q8_item(wf2, df2, P, G, seg_expert, items, j - n, af, sf, cf, of2)


def flat_offsets(m, d):
    """m raveled after checking it against the scales d (int4), or None where m is None (int4s)."""
    raise NotImplementedError("compiled code only")


@overload(flat_offsets)
def _flat_offsets(m, d):
    if isinstance(m, types.NoneType):
        return lambda m, d: None

    def impl(m, d):
        if m.shape != d.shape:
            raise ValueError("grouped matmul: int4 offsets and scales disagree")
        return m.ravel()

    return impl


@njit(nogil=True, cache=True, inline="always")
def _q4_item(wf, df, mf, P, G, seg_expert, items, i, af, sf, cf, of) -> None:
    """Work item i of an int4 matmul (mf: the raveled offsets, None for int4s)."""
    kp = G * GROUP
    s, p, r0, nr = items[i, 0], items[i, 1], items[i, 2], items[i, 3]
    panel = seg_expert[s] * P + p
    panel_q4(wf, panel * PANEL * kp // 2, df, mf, panel * PANEL * G, af, kp, sf, cf, G, G, of, p * PANEL, P * PANEL,
             r0, nr)


@njit(nogil=True, cache=True)
def _check_q4(q, d, seg_expert, seg_start, aq, a_s, a_sum, out) -> None:
    E, P, G = d.shape[0], d.shape[1], d.shape[2]
    check_shapes(E, P * PANEL, G * GROUP, seg_expert, seg_start, aq, out)
    check_quantized(q, d, 8, a_s, a_sum, seg_start[-1])


@njit(parallel=True, nogil=True, cache=True)
def matmul_q4(q, d, m, seg_expert, seg_start, aq, a_s, a_sum, out) -> None:
    """As matmul_q8 for int4: q uint8 [E, P, Kp/8, 16, 4], d and m fp16 bits [E, P, G, 16]; m None for int4s
    (W = d * (q - 8): a separate compiled specialisation without the offset stream)."""
    _check_q4(q, d, seg_expert, seg_start, aq, a_s, a_sum, out)
    mf = flat_offsets(m, d)
    P, G = d.shape[1], d.shape[2]
    items = work_items(seg_start, P)
    wf, df, af, sf, cf, of = q.ravel(), d.ravel(), aq.ravel(), a_s.ravel(), a_sum.ravel(), out.ravel()
    for i in prange(items.shape[0]):
        _q4_item(wf, df, mf, P, G, seg_expert, items, i, af, sf, cf, of)


@njit(parallel=True, nogil=True, cache=True)
def matmul_q4_pair(q, d, m, q2, d2, m2, seg_expert, seg_start, aq, a_s, a_sum, out, out2) -> None:
    """matmul_q8_pair for int4 (m, m2 None for int4s)."""
    _check_q4(q, d, seg_expert, seg_start, aq, a_s, a_sum, out)
    _check_q4(q2, d2, seg_expert, seg_start, aq, a_s, a_sum, out2)
    mf, mf2 = flat_offsets(m, d), flat_offsets(m2, d2)
    P, G = d.shape[1], d.shape[2]
    items = work_items(seg_start, P)
    n = items.shape[0]
    wf, df, of, wf2, df2, of2 = q.ravel(), d.ravel(), out.ravel(), q2.ravel(), d2.ravel(), out2.ravel()
    af, sf, cf = aq.ravel(), a_s.ravel(), a_sum.ravel()
    for j in prange(2 * n):
        if j < n:
            _q4_item(wf, df, mf, P, G, seg_expert, items, j, af, sf, cf, of)
        else:
            _q4_item(wf2, df2, mf2, P, G, seg_expert, items, j - n, af, sf, cf, of2)


@njit(parallel=True, nogil=True, cache=True, fastmath={"contract", "reassoc"})  # reassoc: a vectorized dot product
def matmul_bf16(w, seg_expert, seg_start, a, out) -> None:
    """w bf16 bits [E, O, K] (the checkpoint layout); a float32 [R, K]; out float32 [R, O].

    Each weight row is widened to float32 on the fly and dotted with up to 8 activation rows while it sits in L1."""
    E, O, K = w.shape
    check_shapes(E, O, K, seg_expert, seg_start, a, out)
    items = work_items(seg_start, (O + PANEL - 1) // PANEL)
    for i in prange(items.shape[0]):
        s, p, r0, nr = items[i, 0], items[i, 1], items[i, 2], items[i, 3]
        e = seg_expert[s]
        for o in range(p * PANEL, min(O, p * PANEL + PANEL)):
            wrow = w[e, o]
            for r in range(r0, r0 + nr):
                arow = a[r]
                acc = np.float32(0.0)
                for k in range(K):
                    acc += bits_to_f32(np.uint32(wrow[k]) << np.uint32(16)) * arow[k]
                out[r, o] = acc

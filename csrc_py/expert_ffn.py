"""The fused MoE-layer kernels: one call computes a layer's routed experts for all tokens.

    y[t] = sum_k topk_weights[t, k] * down_e(act(gate_e x[t], up_e x[t])),  e = topk_ids[t, k]

act is the experts' activation (SILU: silu(g) * u; CLAMPED_SWIGLU: gpt-oss's (clamp(u, -limit, limit) + 1) *
g * sigmoid(alpha * g) with g = min(g, limit)); experts with biases add them after each projection (float32
[E, I], [E, I], [E, H]; a [0, 0] array means none).

The (token, choice) pairs are sorted by expert into rows, so each used expert's weights are read once per call
and multiplied with all of its rows (decode: a GEMV per expert; prefill: a small GEMM per expert). int8/int4
quantize x per token and the SiLU product per row to int8 in groups of 32 (symmetric), like llama.cpp's Q8_0
activations: the int8 dot products then run on vpdpbusd.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from csrc_py.fast_math import exp_f32
from csrc_py.grouped_matmul import matmul_bf16, matmul_q4, matmul_q4_pair, matmul_q8, matmul_q8_pair
from csrc_py.quant_kernels import SERIAL_MAX_ROWS, quantized_rows


@njit(nogil=True, cache=True)
def route(topk_ids: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sort the (token, choice) pairs by expert; pairs with a negative id (-1: computed elsewhere) are skipped.

    Returns seg_expert [U] (used experts, ascending), seg_start [U+1] (their row ranges), row_of_pair [T*K]
    (the row holding pair t*K+k, -1 if skipped) and token_of_row [R]."""
    T, K = topk_ids.shape
    counts = np.zeros(num_experts, np.int64)
    for t in range(T):
        for k in range(K):
            e = topk_ids[t, k]
            if e >= num_experts:
                raise ValueError("topk_ids holds an expert id >= num_experts")
            if e >= 0:
                counts[e] += 1
    used = 0
    for e in range(num_experts):
        used += counts[e] > 0
    seg_expert = np.empty(used, np.int64)
    seg_start = np.empty(used + 1, np.int64)
    next_row = np.empty(num_experts, np.int64)
    u, row = 0, 0
    for e in range(num_experts):
        next_row[e] = row
        if counts[e] > 0:
            seg_expert[u], seg_start[u] = e, row
            u += 1
            row += counts[e]
    seg_start[used] = row
    row_of_pair = np.full(T * K, -1, np.int64)
    token_of_row = np.empty(row, np.int64)
    for t in range(T):
        for k in range(K):
            e = topk_ids[t, k]
            if e >= 0:
                r = next_row[e]
                next_row[e] = r + 1
                row_of_pair[t * K + k] = r
                token_of_row[r] = t
    return seg_expert, seg_start, row_of_pair, token_of_row


@njit(nogil=True, cache=True, inline="always")
def _copy_row(src: np.ndarray, s: int, out: np.ndarray, r: int) -> None:
    """out[r] = src[s], element by element: a loop LLVM vectorizes for every dtype, where the slice assignment's
    generic copy moved int8 a byte at a time (a decode step's 8 x 2048 quantized activations: 5.6 against 0.8 us)."""
    for j in range(src.shape[1]):
        out[r, j] = src[s, j]


@njit(parallel=True, nogil=True, cache=True)
def _gather_rows_parallel(src: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    for r in prange(rows.size):
        _copy_row(src, rows[r], out, r)


@njit(nogil=True, cache=True)
def _gather_rows(src: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """out[r] = src[rows[r]]."""
    out = np.empty((rows.size, src.shape[1]), src.dtype)
    if rows.size <= SERIAL_MAX_ROWS:
        for r in range(rows.size):
            _copy_row(src, rows[r], out, r)
    else:
        _gather_rows_parallel(src, rows, out)
    return out


# exp(-g) overflows to inf for very negative g (silu -> 0), so no 'ninf'/'nnan' fast-math assumptions. The exp is
# csrc_py.fast_math's and the division unchecked (error_model="numpy": Python's zero-division check is a branch per
# value), so the loop vectorizes: 8 against 35 us for a decode step's 2 x 5632 values.
_SWIGLU_MATH = {"contract", "afn", "arcp", "reassoc"}

SILU, CLAMPED_SWIGLU = 0, 1  # activation kinds, as offload.config.ExpertActivation.kind "silu" / "clamped_swiglu"
NO_BIAS = np.zeros((0, 0), np.float32)
SILU_ACT = np.array([SILU, 0.0, 0.0], np.float32)  # the act argument of plain SwiGLU experts


@njit(nogil=True, cache=True, inline="always")
def _swiglu_row(g: np.ndarray, u: np.ndarray, r: int, act: np.ndarray) -> None:
    if act[0] == CLAMPED_SWIGLU:
        alpha, limit = act[1], act[2]
        for i in range(g.shape[1]):
            gi = min(g[r, i], limit)
            ui = min(max(u[r, i], -limit), limit)
            g[r, i] = gi / (np.float32(1.0) + exp_f32(-alpha * gi)) * (ui + np.float32(1.0))
    else:
        for i in range(g.shape[1]):
            g[r, i] = g[r, i] / (np.float32(1.0) + exp_f32(-g[r, i])) * u[r, i]


@njit(parallel=True, nogil=True, cache=True, fastmath=_SWIGLU_MATH, error_model="numpy")
def _swiglu_parallel(g: np.ndarray, u: np.ndarray, act: np.ndarray) -> None:
    for r in prange(g.shape[0]):
        _swiglu_row(g, u, r, act)


@njit(nogil=True, cache=True, fastmath=_SWIGLU_MATH, error_model="numpy")
def _swiglu(g: np.ndarray, u: np.ndarray, act: np.ndarray) -> None:
    """g <- act(g, u), in place; act = [kind, alpha, limit] (float32)."""
    if g.shape[0] <= SERIAL_MAX_ROWS:
        for r in range(g.shape[0]):
            _swiglu_row(g, u, r, act)
    else:
        _swiglu_parallel(g, u, act)


@njit(nogil=True, cache=True)
def _add_bias(out: np.ndarray, bias: np.ndarray, seg_expert: np.ndarray, seg_start: np.ndarray) -> None:
    """out[r, :W] += bias[e] for the rows r of each used expert e (bias [E, W]; none when it has no rows)."""
    if bias.shape[0] == 0:
        return
    for s in range(seg_expert.size):
        b = bias[seg_expert[s]]
        for r in range(seg_start[s], seg_start[s + 1]):
            for j in range(b.size):
                out[r, j] += b[j]


@njit(nogil=True, cache=True, inline="always")
def _combine_token(o: np.ndarray, row_of_pair: np.ndarray, topk_weights: np.ndarray, y: np.ndarray, t: int) -> None:
    K = topk_weights.shape[1]
    H = y.shape[1]
    for j in range(H):
        y[t, j] = 0.0
    for k in range(K):
        if row_of_pair[t * K + k] < 0:
            continue
        wt = topk_weights[t, k]
        orow = o[row_of_pair[t * K + k]]
        for j in range(H):
            y[t, j] += wt * orow[j]


@njit(parallel=True, nogil=True, cache=True)
def _combine_parallel(o, row_of_pair, topk_weights, y) -> None:
    for t in prange(topk_weights.shape[0]):
        _combine_token(o, row_of_pair, topk_weights, y, t)


@njit(nogil=True, cache=True)
def _combine(o: np.ndarray, row_of_pair: np.ndarray, topk_weights: np.ndarray, y: np.ndarray) -> None:
    """y[t] = sum_k topk_weights[t, k] * o[row_of_pair[t*K+k], :H] over the pairs that have a row."""
    if row_of_pair.size <= SERIAL_MAX_ROWS:
        for t in range(topk_weights.shape[0]):
            _combine_token(o, row_of_pair, topk_weights, y, t)
    else:
        _combine_parallel(o, row_of_pair, topk_weights, y)


@njit(nogil=True, cache=True)
def moe_q8(x, topk_ids, topk_weights, gq, gd, uq, ud, dq, dd, gb, ub, db, act, y) -> None:
    """x float32 [T, H] -> y float32 [T, H] through int8 experts (q, d pairs of csrc_py.formats, d as uint16),
    biases gb/ub/db and activation act = [kind, alpha, limit]."""
    seg_expert, seg_start, row_of_pair, token_of_row = route(topk_ids, gq.shape[0])
    R, Ip, Hp = token_of_row.size, gd.shape[1] * 16, dd.shape[1] * 16
    xq, xs, xsum = quantized_rows(x, gd.shape[2])
    aq, a_s, a_sum = _gather_rows(xq, token_of_row), _gather_rows(xs, token_of_row), _gather_rows(xsum, token_of_row)
    g, u = np.empty((R, Ip), np.float32), np.empty((R, Ip), np.float32)
    matmul_q8_pair(gq, gd, uq, ud, seg_expert, seg_start, aq, a_s, a_sum, g, u)
    _add_bias(g, gb, seg_expert, seg_start)
    _add_bias(u, ub, seg_expert, seg_start)
    _swiglu(g, u, act)
    hq, h_s, h_sum = quantized_rows(g, dd.shape[2])
    o = np.empty((R, Hp), np.float32)
    matmul_q8(dq, dd, seg_expert, seg_start, hq, h_s, h_sum, o)
    _add_bias(o, db, seg_expert, seg_start)
    _combine(o, row_of_pair, topk_weights, y)


@njit(nogil=True, cache=True)
def moe_q4(x, topk_ids, topk_weights, gq, gd, gm, uq, ud, um, dq, dd, dm, gb, ub, db, act, y) -> None:
    """As moe_q8 for int4 experts (q, d, m triples; m None for int4s)."""
    seg_expert, seg_start, row_of_pair, token_of_row = route(topk_ids, gq.shape[0])
    R, Ip, Hp = token_of_row.size, gd.shape[1] * 16, dd.shape[1] * 16
    xq, xs, xsum = quantized_rows(x, gd.shape[2])
    aq, a_s, a_sum = _gather_rows(xq, token_of_row), _gather_rows(xs, token_of_row), _gather_rows(xsum, token_of_row)
    g, u = np.empty((R, Ip), np.float32), np.empty((R, Ip), np.float32)
    matmul_q4_pair(gq, gd, gm, uq, ud, um, seg_expert, seg_start, aq, a_s, a_sum, g, u)
    _add_bias(g, gb, seg_expert, seg_start)
    _add_bias(u, ub, seg_expert, seg_start)
    _swiglu(g, u, act)
    hq, h_s, h_sum = quantized_rows(g, dd.shape[2])
    o = np.empty((R, Hp), np.float32)
    matmul_q4(dq, dd, dm, seg_expert, seg_start, hq, h_s, h_sum, o)
    _add_bias(o, db, seg_expert, seg_start)
    _combine(o, row_of_pair, topk_weights, y)


@njit(nogil=True, cache=True)
def moe_bf16(x, topk_ids, topk_weights, gw, uw, dw, gb, ub, db, act, y) -> None:
    """As moe_q8 for bf16 experts (bits [E, O, K]); activations stay float32."""
    seg_expert, seg_start, row_of_pair, token_of_row = route(topk_ids, gw.shape[0])
    R, I, H = token_of_row.size, gw.shape[1], dw.shape[1]
    a = _gather_rows(x, token_of_row)
    g, u = np.empty((R, I), np.float32), np.empty((R, I), np.float32)
    matmul_bf16(gw, seg_expert, seg_start, a, g)
    matmul_bf16(uw, seg_expert, seg_start, a, u)
    _add_bias(g, gb, seg_expert, seg_start)
    _add_bias(u, ub, seg_expert, seg_start)
    _swiglu(g, u, act)
    o = np.empty((R, H), np.float32)
    matmul_bf16(dw, seg_expert, seg_start, g, o)
    _add_bias(o, db, seg_expert, seg_start)
    _combine(o, row_of_pair, topk_weights, y)


# ---------------------------------------------------------------- any format, from compiled callers


def packed_format(q: types.Array) -> str:
    """The format of a packed q array's Numba type (compile time): "bf16", "int8", or "int4" (int4s too: its m is
    None, and the int4 kernels compile their symmetric form for that)."""
    if q.dtype == types.uint16 and q.ndim == 3:
        return "bf16"
    if q.dtype == types.int8 and q.ndim == 5:
        return "int8"
    if q.dtype == types.uint8 and q.ndim == 5:
        return "int4"
    raise TypeError(f"not a packed weight array: {q}")


def packed_experts(x, ids, weights, gate, up, down, biases, act, y):
    """y = the routed experts of x (moe_q8 / moe_q4 / moe_bf16 picked by the q arrays), each matrix a packed
    (q, d, m) tuple (csrc_py.formats.PackedMatrix.kernel_tuple), with biases = (gate [E, I], up [E, I],
    down [E, H]; [0, 0] arrays for none) and act = [kind, alpha, limit]."""
    raise NotImplementedError("compiled code only")


@overload(packed_experts)
def _packed_experts(x, ids, weights, gate, up, down, biases, act, y):
    fmt = packed_format(gate[0])
    if fmt == "bf16":
        def impl(x, ids, weights, gate, up, down, biases, act, y):
            moe_bf16(x, ids, weights, gate[0], up[0], down[0], biases[0], biases[1], biases[2], act, y)
    elif fmt == "int8":
        def impl(x, ids, weights, gate, up, down, biases, act, y):
            moe_q8(x, ids, weights, gate[0], gate[1], up[0], up[1], down[0], down[1], biases[0], biases[1], biases[2],
                   act, y)
    else:
        def impl(x, ids, weights, gate, up, down, biases, act, y):
            moe_q4(x, ids, weights, gate[0], gate[1], gate[2], up[0], up[1], up[2], down[0], down[1], down[2],
                   biases[0], biases[1], biases[2], act, y)
    return impl


@njit(nogil=True, cache=True)
def moe_from_block(block: np.ndarray, gate, up, down, biases, act, y: np.ndarray) -> None:
    """y [T, H] = the routed experts of one block of inputs [T, H + 2K] float32: each row x, then its K expert ids
    (integers below 2**24, exact in float32; -1: computed elsewhere), then its K weights (the block
    offload.experts.link.HostLink copies down). One compiled call: with the block split into tensors and converted
    in Python, a hybrid layer's CPU side of a Qwen3-30B-A3B decode call took 1.22-1.40x its kernel's time on a
    2-core Zen 3, this way 1.15-1.25x (tools/bench_host_link.py, docs/benchmarks.md)."""
    T, H = y.shape
    K = (block.shape[1] - H) // 2
    if block.shape[0] != T or block.shape[1] != H + 2 * K:
        raise ValueError("moe_from_block: the block must be [T, H + 2K] for y [T, H]")
    x = np.empty((T, H), np.float32)
    ids = np.empty((T, K), np.int64)
    weights = np.empty((T, K), np.float32)
    for t in range(T):
        x[t] = block[t, :H]
        for k in range(K):
            ids[t, k] = np.int64(block[t, H + k])
            weights[t, k] = block[t, H + K + k]
    packed_experts(x, ids, weights, gate, up, down, biases, act, y)

"""Dense quantized linear layers, y = x @ W.T, for CPU-only runs (attention projections, LM head): the same
packed formats and panel microkernels as the experts, with a single segment covering every row.

Per-head linear maps (MLA's absorbed W_UK and W_UV) are a stack of matrices [heads, O, K], each head's rows its
own segment: y[h*N + n] = x[h*N + n] @ W[h].T, one grouped call for every head."""
from __future__ import annotations

import numpy as np
from numba import njit

from csrc_py.grouped_matmul import matmul_bf16, matmul_q4, matmul_q8
from csrc_py.quant_kernels import quantized_rows


@njit(nogil=True, cache=True)
def _one_segment(rows: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(1, np.int64), np.array([0, rows], np.int64)


@njit(nogil=True, cache=True)
def _head_segments(heads: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows head-major, rows // heads per head: head h's segment is rows h*N .. (h+1)*N."""
    if heads == 0 or rows % heads != 0:
        raise ValueError("per-head linear: the rows must be a whole number per head, head-major")
    return np.arange(heads), np.arange(0, rows + 1, rows // heads)


@njit(nogil=True, cache=True)
def heads_q8(x: np.ndarray, q: np.ndarray, d: np.ndarray, y: np.ndarray) -> None:
    """x float32 [heads*N, K] (head-major); q, d an int8 stack of `heads` matrices; y float32 [heads*N, Op]."""
    seg_expert, seg_start = _head_segments(q.shape[0], x.shape[0])
    aq, a_s, a_sum = quantized_rows(x, d.shape[2])
    matmul_q8(q, d, seg_expert, seg_start, aq, a_s, a_sum, y)


@njit(nogil=True, cache=True)
def heads_q4(x: np.ndarray, q: np.ndarray, d: np.ndarray, m: np.ndarray, y: np.ndarray) -> None:
    """As heads_q8 for an int4 stack (m None: int4s)."""
    seg_expert, seg_start = _head_segments(q.shape[0], x.shape[0])
    aq, a_s, a_sum = quantized_rows(x, d.shape[2])
    matmul_q4(q, d, m, seg_expert, seg_start, aq, a_s, a_sum, y)


@njit(nogil=True, cache=True)
def linear_q8(x: np.ndarray, q: np.ndarray, d: np.ndarray, y: np.ndarray) -> None:
    """x float32 [T, K]; q, d one int8 matrix ([1, ...] stacks); y float32 [T, Op] (padded width)."""
    seg_expert, seg_start = _one_segment(x.shape[0])
    aq, a_s, a_sum = quantized_rows(x, d.shape[2])
    matmul_q8(q, d, seg_expert, seg_start, aq, a_s, a_sum, y)


@njit(nogil=True, cache=True)
def linear_q4(x: np.ndarray, q: np.ndarray, d: np.ndarray, m: np.ndarray, y: np.ndarray) -> None:
    """As linear_q8 for one int4 matrix (m None: int4s)."""
    seg_expert, seg_start = _one_segment(x.shape[0])
    aq, a_s, a_sum = quantized_rows(x, d.shape[2])
    matmul_q4(q, d, m, seg_expert, seg_start, aq, a_s, a_sum, y)


@njit(nogil=True, cache=True)
def linear_bf16(x: np.ndarray, w: np.ndarray, y: np.ndarray) -> None:
    """x float32 [T, K]; w bf16 bits [1, O, K]; y float32 [T, O]."""
    seg_expert, seg_start = _one_segment(x.shape[0])
    matmul_bf16(w, seg_expert, seg_start, x, y)

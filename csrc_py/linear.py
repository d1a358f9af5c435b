"""Dense quantized linear layers, y = x @ W.T, for CPU-only runs (attention projections, LM head): the same
packed formats and panel microkernels as the experts. A dense linear is a stack of one matrix, one segment covering
every row; per-head maps (MLA's absorbed W_UK and W_UV) are a stack [heads, O, K] whose rows go head-major, each
head's its own segment: y[h*N + n] = x[h*N + n] @ W[h].T, every head in one grouped call."""
from __future__ import annotations

import numpy as np
from numba import njit

from csrc_py.grouped_matmul import matmul_bf16, matmul_q4, matmul_q8
from csrc_py.quant_kernels import quantized_rows


@njit(nogil=True, cache=True)
def _segments(matrices: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows split evenly over a stack's matrices, in order: matrix e's segment is rows e*N .. (e+1)*N."""
    if matrices == 0 or rows % matrices != 0:
        raise ValueError("linear over a stack: the rows must be a whole number per matrix, in the stack's order")
    return np.arange(matrices), np.arange(0, rows + 1, rows // matrices)


@njit(nogil=True, cache=True)
def linear_q8(x: np.ndarray, q: np.ndarray, d: np.ndarray, y: np.ndarray) -> None:
    """x float32 [E*N, K]; q, d an int8 stack of E matrices (1: a dense linear); y float32 [E*N, Op] (padded
    width): rows e*N .. (e+1)*N through matrix e."""
    seg_expert, seg_start = _segments(q.shape[0], x.shape[0])
    aq, a_s, a_sum = quantized_rows(x, d.shape[2])
    matmul_q8(q, d, seg_expert, seg_start, aq, a_s, a_sum, y)


@njit(nogil=True, cache=True)
def linear_q4(x: np.ndarray, q: np.ndarray, d: np.ndarray, m: np.ndarray, y: np.ndarray) -> None:
    """As linear_q8 for an int4 stack (m None: int4s)."""
    seg_expert, seg_start = _segments(q.shape[0], x.shape[0])
    aq, a_s, a_sum = quantized_rows(x, d.shape[2])
    matmul_q4(q, d, m, seg_expert, seg_start, aq, a_s, a_sum, y)


@njit(nogil=True, cache=True)
def linear_bf16(x: np.ndarray, w: np.ndarray, y: np.ndarray) -> None:
    """As linear_q8 for a stack of bf16 bits [E, O, K]; y float32 [E*N, O]."""
    seg_expert, seg_start = _segments(w.shape[0], x.shape[0])
    matmul_bf16(w, seg_expert, seg_start, x, y)

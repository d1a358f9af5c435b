"""exp for float32 as plain arithmetic, so that a loop over it vectorizes.

Numba lowers np.exp to a scalar libm call per value unless Intel's SVML is installed (it is not on this project's
hosts): ~3 ns a value, most of a decode step's SwiGLU over a few thousand values. This is Cephes' expf (a degree-5
polynomial on the reduced argument), written so LLVM vectorizes the loop that inlines it.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from csrc_py.simd import bits_to_f32

LOG2E = np.float32(1.4426950408889634)
LN2_HI, LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
EXP_MIN = np.float32(-87.33654)  # below it exp is not a normal float32: 0
EXP_MAX = np.float32(88.72283)  # above it exp overflows float32: inf


@njit(nogil=True, cache=True, inline="always", fastmath={"contract"})
def exp_reduced(c: float) -> tuple[float, float]:
    """(p, k) with exp(c) = p * 2^k, k an integer in -126..128, for a float32 c in [EXP_MIN, EXP_MAX]."""
    k = np.floor(c * LOG2E + np.float32(0.5))
    r = c - k * LN2_HI - k * LN2_LO
    y = np.float32(1.9875691500e-4)
    y = y * r + np.float32(1.3981999507e-3)
    y = y * r + np.float32(8.3334519073e-3)
    y = y * r + np.float32(4.1665795894e-2)
    y = y * r + np.float32(1.6666665459e-1)
    y = y * r + np.float32(5.0000001201e-1)
    return y * r * r + r + np.float32(1.0), k


@njit(nogil=True, cache=True, inline="always", fastmath={"contract"})
def exp_f32(x: float) -> float:
    """exp(x) for a float32 x: within 1 ulp where the result is a normal float32 (measured over [-100, 100]),
    0 below EXP_MIN, inf above EXP_MAX, NaN for NaN."""
    p, k = exp_reduced(min(max(x, EXP_MIN), EXP_MAX))
    ki = np.int32(k)
    top = ki > np.int32(127)  # k = 128: 2^127 * 2 (2^128 has no float32 exponent)
    pow2 = bits_to_f32(((ki - np.int32(1) if top else ki) + np.int32(127)) << 23)
    e = p * pow2 * (np.float32(2.0) if top else np.float32(1.0))
    e = np.float32(0.0) if x < EXP_MIN else (np.float32(np.inf) if x > EXP_MAX else e)  # selects: it vectorizes
    return e if x == x else x

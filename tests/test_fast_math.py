"""csrc_py.fast_math.exp_f32, the exp the SwiGLU and sigmoid loops use: within 1 ulp of exp wherever exp is a
normal float32, and exp's answers at the ends (0 below, inf above, NaN for NaN)."""
from __future__ import annotations

import numpy as np
import torch
from numba import njit

import csrc_py  # noqa: F401  (torch before numba)
from csrc_py.expert_ffn import SILU_ACT, _swiglu
from csrc_py.fast_math import EXP_MAX, EXP_MIN, exp_f32


@njit(cache=True)
def exp_all(x: np.ndarray, out: np.ndarray) -> None:
    for i in range(x.size):
        out[i] = exp_f32(x[i])


def test_exp_f32_is_within_one_ulp_of_exp_over_the_normal_range():
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-90, 90, 1_000_001, dtype=np.float32),
                        rng.uniform(EXP_MIN, EXP_MAX, 1_000_000).astype(np.float32)])
    out = np.empty_like(x)
    exp_all(x, out)
    with np.errstate(over="ignore"):
        ref = np.exp(x.astype(np.float64)).astype(np.float32)
    normal = np.isfinite(ref) & (ref >= np.finfo(np.float32).tiny) & (x >= EXP_MIN)
    ulp = np.abs(out[normal].view(np.int32).astype(np.int64) - ref[normal].view(np.int32).astype(np.int64))
    assert ulp.max() <= 1
    assert np.isfinite(out[x <= EXP_MAX]).all()


def test_exp_f32_at_the_ends():
    x = np.array([np.nan, np.inf, -np.inf, EXP_MAX, np.nextafter(EXP_MAX, np.float32(np.inf)), -100.0, 0.0],
                 np.float32)
    out = np.empty_like(x)
    exp_all(x, out)
    assert np.isnan(out[0]) and out[1] == np.inf and out[2] == 0.0
    assert np.isfinite(out[3]) and out[3] > 3.4e38 and out[4] == np.inf
    assert out[5] == 0.0 and out[6] == 1.0


def test_swiglu_with_it_matches_torch():
    g = torch.randn(3, 5632, generator=torch.Generator().manual_seed(1)) * 30  # saturated ends included
    u = torch.randn(3, 5632, generator=torch.Generator().manual_seed(2))
    out = g.numpy().copy()
    _swiglu(out, u.numpy(), SILU_ACT)
    ref = torch.nn.functional.silu(g) * u
    assert torch.allclose(torch.from_numpy(out), ref, rtol=1e-6, atol=1e-6)

"""The torch expert engines agree: the grouped loop (CPU, long prompts), the gathered batched form (GPU decode
without a grouped kernel) and the rows read in place by grouped matmuls (the hybrid pool), including pairs marked
-1 that another backend computes, for every expert activation, with and without expert biases."""
from __future__ import annotations

import pytest
import torch

from offload.config import ExpertActivation
from offload.experts.base import SILU, ExpertBiases
from offload.experts.swiglu import _gathered, _grouped, swiglu_rows

CLAMPED = ExpertActivation("clamped_swiglu", alpha=1.702, limit=7.0)


R, H, I = 9, 32, 24


def random_layer(T: int, K: int, with_biases: bool, rows_used: int = R):
    """Stacked weights of R rows, x [T, H], rows [T, K] drawn from the first `rows_used` rows (one pair marked
    -1, one row shared by two tokens), combine weights, and biases when asked."""
    g = torch.Generator().manual_seed(T * 10 + K)
    gate, up = torch.randn(R, I, H, generator=g), torch.randn(R, I, H, generator=g)
    down = torch.randn(R, H, I, generator=g)
    x = torch.randn(T, H, generator=g)
    biases = (ExpertBiases(*(torch.randn(R, n, generator=g) for n in (I, I, H))) if with_biases else None)
    rows = torch.randint(0, rows_used, (T, K), generator=g)
    rows[0, 0] = -1  # computed elsewhere
    rows[-1, -1] = rows[0, -1]  # an expert shared by two tokens
    weights = torch.rand(T, K, generator=g)
    return x, rows, weights, gate, up, down, biases


@pytest.mark.parametrize("activation, with_biases", [(SILU, False), (CLAMPED, True)])
@pytest.mark.parametrize("T, K", [(1, 2), (3, 4), (2, 8)])
def test_gathered_equals_grouped(T, K, activation, with_biases):
    x, rows, weights, gate, up, down, biases = random_layer(T, K, with_biases)
    args = (biases, activation)
    grouped = _grouped(x, rows, weights, gate, up, down, *args)
    torch.testing.assert_close(_gathered(x, rows, weights, gate, up, down, *args), grouped, rtol=1e-5, atol=1e-5)
    skipped = torch.full_like(rows, -1)
    assert _gathered(x, skipped, weights, gate, up, down, *args).abs().max() == 0  # all skipped
    assert _grouped(x, skipped, weights, gate, up, down, *args).abs().max() == 0


@pytest.mark.parametrize("activation, with_biases", [(SILU, False), (CLAMPED, True)])
@pytest.mark.parametrize("T, K", [(1, 2), (3, 4), (2, 8)])
def test_rows_read_in_place_equal_grouped_and_leave_unused_rows_unread(T, K, activation, with_biases):
    """The hybrid pool's grouped-matmul form: the same sums, pairs marked -1 left out, and a row no pair uses
    is never read (it holds NaN here: reading it would poison the result)."""
    x, rows, weights, gate, up, down, biases = random_layer(T, K, with_biases, rows_used=R - 1)
    for stack in (gate, up, down):
        stack[R - 1] = float("nan")
    args = (biases, activation)
    got = swiglu_rows(x, rows, weights, gate, up, down, *args)
    torch.testing.assert_close(got, _grouped(x, rows, weights, gate, up, down, *args), rtol=1e-5, atol=1e-5)
    skipped = torch.full_like(rows, -1)
    assert swiglu_rows(x, skipped, weights, gate, up, down, *args).abs().max() == 0
    bf16_biases = biases.to(dtype=torch.bfloat16) if biases is not None else None
    bf16 = swiglu_rows(x.bfloat16(), rows, weights, gate.bfloat16(), up.bfloat16(), down.bfloat16(), bf16_biases,
                       activation)
    assert bf16.dtype == torch.bfloat16 and ((bf16.float() - got).abs().max() / got.abs().max()) < 0.05

"""The two torch expert engines agree: the grouped loop (CPU, long prompts) and the gathered batched form (GPU
decode), including pairs marked -1 that another backend computes, for every expert activation, with and without
expert biases."""
from __future__ import annotations

import pytest
import torch

from offload.config import ExpertActivation
from offload.experts.base import SILU, ExpertBiases
from offload.experts.swiglu import _gathered, _grouped

CLAMPED = ExpertActivation("clamped_swiglu", alpha=1.702, limit=7.0)


@pytest.mark.parametrize("activation, with_biases", [(SILU, False), (CLAMPED, True)])
@pytest.mark.parametrize("T, K", [(1, 2), (3, 4), (2, 8)])
def test_gathered_equals_grouped(T, K, activation, with_biases):
    g = torch.Generator().manual_seed(T * 10 + K)
    R, H, I = 9, 32, 24
    gate, up = torch.randn(R, I, H, generator=g), torch.randn(R, I, H, generator=g)
    down = torch.randn(R, H, I, generator=g)
    x = torch.randn(T, H, generator=g)
    biases = (ExpertBiases(*(torch.randn(R, n, generator=g) for n in (I, I, H))) if with_biases else None)
    rows = torch.randint(0, R, (T, K), generator=g)
    rows[0, 0] = -1  # computed elsewhere
    rows[-1, -1] = rows[0, -1]  # an expert shared by two tokens
    weights = torch.rand(T, K, generator=g)
    args = (biases, activation)
    grouped = _grouped(x, rows, weights, gate, up, down, *args)
    torch.testing.assert_close(_gathered(x, rows, weights, gate, up, down, *args), grouped, rtol=1e-5, atol=1e-5)
    skipped = torch.full_like(rows, -1)
    assert _gathered(x, skipped, weights, gate, up, down, *args).abs().max() == 0  # all skipped
    assert _grouped(x, skipped, weights, gate, up, down, *args).abs().max() == 0

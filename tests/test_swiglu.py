"""The two torch expert engines agree: the grouped loop (CPU, long prompts) and the gathered batched form (GPU
decode), including pairs marked -1 that another backend computes."""
from __future__ import annotations

import pytest
import torch

from offload.experts.swiglu import _gathered, _grouped


@pytest.mark.parametrize("T, K", [(1, 2), (3, 4), (2, 8)])
def test_gathered_equals_grouped(T, K):
    g = torch.Generator().manual_seed(T * 10 + K)
    R, H, I = 9, 32, 24
    gate, up = torch.randn(R, I, H, generator=g), torch.randn(R, I, H, generator=g)
    down = torch.randn(R, H, I, generator=g)
    x = torch.randn(T, H, generator=g)
    rows = torch.randint(0, R, (T, K), generator=g)
    rows[0, 0] = -1  # computed elsewhere
    rows[-1, -1] = rows[0, -1]  # an expert shared by two tokens
    weights = torch.rand(T, K, generator=g)
    grouped = _grouped(x, rows, weights, gate, up, down)
    torch.testing.assert_close(_gathered(x, rows, weights, gate, up, down), grouped, rtol=1e-5, atol=1e-5)
    assert _gathered(x, torch.full_like(rows, -1), weights, gate, up, down).abs().max() == 0  # all skipped
    assert _grouped(x, torch.full_like(rows, -1), weights, gate, up, down).abs().max() == 0

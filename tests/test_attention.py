"""Decode attention per KV head (grouped_attention) equals SDPA with its K/V expansion (enable_gqa)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from offload.model.attention import grouped_attention
from offload.model.kv_cache import causal_mask_args


@pytest.mark.parametrize("start, T, window", [(0, 1, None), (9, 1, None), (9, 1, 4), (0, 5, None), (7, 3, None),
                                              (7, 3, 5)])
@pytest.mark.parametrize("kv, group", [(2, 4), (1, 6), (3, 1)])
def test_grouped_attention_matches_sdpa_gqa(start, T, window, kv, group):
    gen = torch.Generator().manual_seed(start * 10 + T)
    d, dv, S = 16, 12, start + T
    q = torch.randn(kv * group, T, d, generator=gen)
    keys, values = torch.randn(kv, S, d, generator=gen), torch.randn(kv, S, dv, generator=gen)
    mask = causal_mask_args(start, T, window, q.device)
    expected = F.scaled_dot_product_attention(q, keys, values, scale=0.3, enable_gqa=True, **mask)
    got = grouped_attention(q.view(kv, group, T, d), keys, values, 0.3, mask).reshape(kv * group, T, dv)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

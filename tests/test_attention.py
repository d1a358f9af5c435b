"""The decode path's shortcuts equal what they replace: attention per KV head (grouped_attention) equals SDPA
with its K/V expansion (enable_gqa), and fused packed projections equal the separate ones."""
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


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_fused_projections_equal_the_separate_ones(fmt):
    """q/k/v fused into one packed matrix (parts starting at whole panels, widths not multiples of 32, a bias on
    some parts) give exactly the separate QuantLinears' outputs."""
    from csrc_py.formats import pack
    from offload.model.layers import FusedLinear, Linear, LinearGroup, QuantLinear, group_linears

    gen = torch.Generator().manual_seed(1)
    K = 80
    widths_biases = ((72, torch.randn(72, generator=gen)), (40, None), (40, torch.randn(40, generator=gen)))
    parts = [QuantLinear(pack(torch.randn(1, width, K, generator=gen), fmt), bias) for width, bias in widths_biases]
    fused = group_linears(parts)
    assert isinstance(fused, FusedLinear) and fused.starts == [0, 96, 160]
    for T in (1, 5):
        x = torch.randn(T, K, generator=gen)
        for got, part in zip(fused(x), parts):
            assert torch.equal(got, part(x))
    mixed = group_linears([parts[0], Linear(torch.randn(40, K, generator=gen))])
    assert isinstance(mixed, LinearGroup)


@pytest.mark.parametrize("start, T, window", [(0, 6, None), (9, 1, None), (9, 1, 4), (7, 3, 5)])
def test_attention_sinks_take_their_share_of_the_softmax(start, T, window):
    """Each head's softmax runs over its scores and its sink logit; the sink attends to nothing. A sink of -inf
    is plain attention; the explicit definition (scores with the sink column, softmax, column dropped) holds."""
    from offload.model.attention import attention_with_sinks

    gen = torch.Generator().manual_seed(start + T)
    kv, group, d, dv, S = 2, 3, 16, 12, start + T
    q = torch.randn(kv * group, T, d, generator=gen)
    keys, values = torch.randn(kv, S, d, generator=gen), torch.randn(kv, S, dv, generator=gen)
    mask = causal_mask_args(start, T, window, q.device)
    plain = F.scaled_dot_product_attention(q, keys, values, scale=0.3, enable_gqa=True, **mask)
    none = attention_with_sinks(q, keys, values, 0.3, mask, torch.full((kv * group,), float("-inf")))
    torch.testing.assert_close(none, plain, rtol=1e-5, atol=1e-6)

    sinks = torch.randn(kv * group, generator=gen)
    allowed = causal_mask_args(start, T, window if window else S + 1, q.device)
    allowed = allowed.get("attn_mask", torch.ones(T, S, dtype=torch.bool).tril(S - T))
    scores = (q @ keys.repeat_interleave(group, 0).transpose(1, 2) * 0.3).masked_fill(~allowed, float("-inf"))
    probs = torch.cat([scores, sinks[:, None, None].expand(-1, T, 1)], -1).softmax(-1)[..., :-1]
    expected = probs @ values.repeat_interleave(group, 0)
    got = attention_with_sinks(q, keys, values, 0.3, mask, sinks)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (probs.sum(-1) < 1).all()


@pytest.mark.parametrize("start, T", [(0, 24), (0, 5), (5, 6), (13, 1), (16, 1), (3, 20)])
def test_chunked_mask_is_transformers_chunked_causal_mask(start, T):
    """Llama-4's chunked attention: a query at position p sees keys k <= p with k // chunk == p // chunk."""
    from transformers.masking_utils import and_masks, causal_mask_function, chunked_overlay

    chunk = 8
    allowed = and_masks(causal_mask_function, chunked_overlay(chunk, torch.zeros(1, dtype=torch.long)))
    q_pos, k_pos = torch.arange(start, start + T)[:, None], torch.arange(start + T)[None, :]
    expected = allowed(torch.tensor(0), torch.tensor(0), q_pos, k_pos).expand(T, start + T)
    mask = causal_mask_args(start, T, None, torch.device("cpu"), chunk)
    if "is_causal" in mask:
        got = torch.ones(T, start + T, dtype=torch.bool).tril(start)
    else:
        got = mask.get("attn_mask", torch.ones(T, start + T, dtype=torch.bool))
    assert torch.equal(got, expected)

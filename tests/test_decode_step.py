"""The compiled decode step (csrc_py.decode_step, offload.model.compiled_step) against its oracles: each stage
against the torch code it replaces, and whole decode steps of tiny models against the torch path of the same model
(float32 rounding apart), with a check that the compiled layers really ran."""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

import offload
from offload.config import RopeConfig, RouterConfig
from offload.model import compiled_step
from offload.model.attention import attention_with_sinks, grouped_attention, l2_norm, query_temperature
from offload.model.compiled_step import CompiledLayer
from offload.model.gated_deltanet import L2_EPS, gated_delta_rule, gated_rms_norm, l2norm
from offload.model.kv_cache import RecurrentState, causal_mask_args
from offload.model.layers import RMSNorm
from offload.model.rope import RotaryTable
from offload.model.routing import route as torch_route
from tiny_models import rel_err

import csrc_py  # noqa: F401  (torch before numba)
from csrc_py import decode_step as ds
from csrc_py import simd
from csrc_py.attend_simd import LANES

IDS = torch.arange(3, 23)
GEN = torch.Generator().manual_seed(0)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


# ---------------------------------------------------------------- stages


def test_rms_norm_matches_the_module():
    x, w = randn(3, 40), randn(40)
    out = np.empty((3, 40), np.float32)
    ds.rms_norm(x.numpy(), w.numpy(), 1e-6, out)
    assert rel_err(torch.from_numpy(out), RMSNorm(w, 1e-6)(x)) < 1e-6


def test_per_head_norm_matches_the_module():
    x, w = randn(2, 3 * 8 + 5), randn(8)  # three heads of 8, then columns the call must leave alone
    expected = x.clone()
    expected[:, :24] = RMSNorm(w, 1e-5)(x[:, :24].reshape(2, 3, 8)).reshape(2, 24)
    got = x.numpy().copy()
    ds.rms_norm_heads(got, 3, 8, w.numpy(), 1e-5)
    assert rel_err(torch.from_numpy(got), expected) < 1e-6
    # No weight: Llama-4's L2 q/k norm.
    expected[:, :24] = l2_norm(x[:, :24].reshape(2, 3, 8), 1e-5).reshape(2, 24)
    got = x.numpy().copy()
    ds.rms_norm_heads(got, 3, 8, np.zeros(0, np.float32), 1e-5)
    assert rel_err(torch.from_numpy(got), expected) < 1e-6


def test_query_temperature_matches_attention():
    q = randn(5, 12)
    got = q.numpy().copy()
    ds.query_temperature(got, 9, 4.0, 0.5)  # positions 9..13: floor((p + 1) / 4) steps from 2 to 3 at 11
    assert rel_err(torch.from_numpy(got), q * query_temperature(9, 5, 4.0, 0.5, q.device)[:, None]) < 1e-6


# whole heads, partial RoPE (the rest passes through), DeepSeek's interleaved pairs
@pytest.mark.parametrize("rope_dim, interleaved", [(16, False), (8, False), (16, True)])
def test_rope_matches_the_table(rope_dim, interleaved):
    table = RotaryTable(RopeConfig(theta=100.0), rope_dim, 32, torch.device("cpu"), torch.float32)
    x = randn(3, 2, 20)  # [T, heads, 4 + 16]: the rotated part from channel 4, as MLA's q_rope after q_nope
    expected = x.clone()
    expected[..., 4:] = table.apply(x[..., 4:], 5, interleaved)
    got = x.reshape(3, 40).numpy().copy()
    ds.rope(got, 2, 20, 4, interleaved, table.cos.numpy(), table.sin.numpy(), 5)
    assert rel_err(torch.from_numpy(got), expected.reshape(3, 40)) < 1e-6


def test_softmax_numerators_match_exp_to_float32_rounding():
    """exp_shifted, the vectorizable exp of the attention softmax: within 2 ulp of exp in float64 over the range
    softmax meets (score - max from 0 down past float32's underflow), 0 for -inf and from -87 down (where exp
    leaves float32's normal range: < 1.7e-38 of the largest term, which is 1), and the sum it returns is the sum
    of what it wrote."""
    x = np.concatenate([-np.logspace(-8, 2, 4000), [0.0, -np.inf, -86.9, -87.5, -200.0], np.linspace(-30, 0, 997)])
    best = np.float32(3.0)
    s = (x + 3.0).astype(np.float32)
    shifted = (s - best).astype(np.float64)  # what the kernel exponentiates
    total = ds.exp_shifted(s, s.size, best)
    kept = shifted > -87.0
    expected = np.exp(shifted[kept])
    ulp = np.spacing(expected.astype(np.float32)).astype(np.float64)
    assert (np.abs(s[kept] - expected) <= 2 * ulp).all()
    assert (s[~kept] == 0).all() and (~kept).sum() >= 3
    assert total == pytest.approx(float(s.astype(np.float64).sum()), rel=1e-5)


# sliding windows; Llama-4's chunks (the 3 queries at 7..9 straddle a boundary of chunks of 8)
@pytest.mark.parametrize("T, start, window, chunk", [(1, 9, 0, 0), (1, 9, 4, 0), (3, 7, 0, 0), (3, 7, 5, 0),
                                                     (2, 0, 0, 0), (1, 9, 0, 8), (3, 7, 0, 8)])
def test_attention_over_the_cache_matches_grouped_attention(T, start, window, chunk):
    heads, kv_heads, d, P = 6, 2, 8, 16
    S = start + T
    q, k, v = randn(T, heads, d), randn(kv_heads, P, d), randn(kv_heads, P, d)
    mask = causal_mask_args(start, T, window or None, torch.device("cpu"), chunk or None)
    queries = q.transpose(0, 1).reshape(kv_heads, heads // kv_heads, T, d)
    expected = grouped_attention(queries, k[:, :S], v[:, :S], d**-0.5, mask).reshape(heads, T, d).transpose(0, 1)
    out = np.empty((T, heads * d), np.float32)
    ds.attend(q.reshape(T, heads * d).numpy(), heads, kv_heads, d, k.numpy(), v.numpy(), start, window, chunk,
              d**-0.5, np.zeros(0, np.float32), out)
    assert rel_err(torch.from_numpy(out), expected.reshape(T, heads * d)) < 1e-5


# The kernel paths of attend (a row count per score pass: fours, pairs, an odd one; the value tile's row pairs and
# odd row, column chunks in 8 | 4 + 2 + 1, column blocks past WEIGH_CHUNKS, position blocks of WEIGH_BLOCK_BYTES)
# and the Numba value loop where d is not a multiple of the vector width.
@pytest.mark.parametrize("heads, kv_heads, d, P, T, start, window", [
    (16, 2, 128, 80, 1, 72, 0),  # Qwen3's group of 8: two row fours, three blocks of 32 positions (the last short)
    (6, 2, 48, 40, 3, 30, 0),  # 9 rows: two fours and an odd one; 48 columns: 3 (or 6) chunks
    (4, 4, 256, 24, 2, 10, 0),  # one row per KV head; 256 columns: 2 column blocks (8 at 8 lanes)
    (10, 2, 112, 300, 2, 290, 100),  # 10 rows: fours and a pair; 7 (14) chunks; a window over several blocks
    (4, 2, 24, 20, 1, 15, 0),  # 24 columns at 16 lanes: the Numba value loop
])
def test_attention_kernel_paths_match_grouped_attention(heads, kv_heads, d, P, T, start, window):
    S = start + T
    q, k, v = randn(T, heads, d), randn(kv_heads, P, d), randn(kv_heads, P, d)
    mask = causal_mask_args(start, T, window or None, torch.device("cpu"))
    queries = q.transpose(0, 1).reshape(kv_heads, heads // kv_heads, T, d)
    expected = grouped_attention(queries, k[:, :S], v[:, :S], d**-0.5, mask).reshape(heads, T, d).transpose(0, 1)
    out = np.empty((T, heads * d), np.float32)
    ds.attend(q.reshape(T, heads * d).numpy(), heads, kv_heads, d, k.numpy(), v.numpy(), start, window, 0,
              d**-0.5, np.zeros(0, np.float32), out)
    assert rel_err(torch.from_numpy(out), expected.reshape(T, heads * d)) < 1e-5


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    """t rounded to bf16, as the bits (uint16) the compiled code reads a bf16 cache as."""
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


@pytest.mark.skipif("avx" not in simd.jit_features(), reason="score_tile is AVX code")
@pytest.mark.parametrize("cache", ["float32", "bf16"])
def test_the_folded_score_tiles_give_every_score_and_each_row_s_best(cache):
    """score_key_pair_tiles (the 256-bit tiers' pair pass, called directly here so an AVX-512 host tests it too):
    two pairs of rows and an odd one against 20 keys in tiles of four and 3 left over; rows and keys inside larger
    arrays (strides), the scores of a wider buffer."""
    q, k = randn(6, 32), randn(30, 32)
    keys = k.numpy() if cache == "float32" else bf16_bits(k)
    expected = q[1:6] @ (k if cache == "float32" else k.to(torch.bfloat16).float())[4:27].T  # [5, 23]
    scores = np.full((5, 40), np.nan, np.float32)
    best = np.full(5, -np.inf, np.float32)
    ds.score_key_pair_tiles(q.numpy()[1:6], keys[4:27], scores, best, 8)
    assert rel_err(torch.from_numpy(scores[:, :23]), expected) < 1e-6
    assert np.isnan(scores[:, 23:]).all()
    assert torch.allclose(torch.from_numpy(best), expected.max(dim=1).values, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(LANES != 16, reason="the quad tile is the 16-lane tiers' (avx512-vnni, portable)")
@pytest.mark.parametrize("cache", ["float32", "bf16"])
def test_the_folded_quad_tiles_give_every_score_and_each_row_s_best(cache):
    """score_key_quad_tiles: two fours of rows against 23 keys in tiles of four and 3 left over; rows and keys inside
    larger arrays (strides), the scores of a wider buffer; each row's best from the tiles' running maxima, the
    leftover keys and its earlier value (a sink above every score in row 2)."""
    q, k = randn(9, 32), randn(30, 32)
    keys = k.numpy() if cache == "float32" else bf16_bits(k)
    expected = q[1:9] @ (k if cache == "float32" else k.to(torch.bfloat16).float())[4:27].T  # [8, 23]
    scores = np.full((8, 40), np.nan, np.float32)
    best = np.full(8, -np.inf, np.float32)
    best[2] = 1e3
    ds.score_key_quad_tiles(q.numpy()[1:9], keys[4:27], scores, best, 8)
    assert rel_err(torch.from_numpy(scores[:, :23]), expected) < 1e-6
    assert np.isnan(scores[:, 23:]).all()
    top = expected.max(dim=1).values
    top[2] = 1e3
    assert torch.allclose(torch.from_numpy(best), top, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cache", ["float32", "bf16"])
def test_the_latent_tiles_take_the_heads_in_lanes(cache):
    """latent_simd's tiles on their own: 16 heads' scores of 7 listed cache rows (a tile of TILE or fewer, its
    positions as base + rows[r_off:]: blocks of 4 + 2 + 1 where TILE is 8) over a rank that is not a whole number of
    SCORE_RUNs, each head's running maximum raised from an earlier one; the weighted sums into running sums that
    the tile's first block scales when asked, and only then."""
    from numba import njit

    from csrc_py.latent_simd import HEADS_LANES, SCORE_RUN, TILE, latent_score_tile, latent_weigh_tile

    score = njit(lambda *a: latent_score_tile(*a))
    weigh = njit(lambda *a: latent_weigh_tile(*a))
    rank, rope, nk = 2 * SCORE_RUN + 5, 4, min(7, TILE)
    c, kr = randn(20, rank), randn(20, rope)
    if cache == "bf16":
        c, kr = c.to(torch.bfloat16).float(), kr.to(torch.bfloat16).float()
    caches = (c.numpy(), kr.numpy()) if cache == "float32" else (bf16_bits(c), bf16_bits(kr))
    qt = randn(rank + rope, HEADS_LANES)
    rows = np.array([9, 0, 3, 5, 6, 8, 2, 1, 4], np.int64)  # r_off 2: positions base + 3, 5, 6, ...
    base, r_off = 4, 2
    at = torch.from_numpy(base + rows[r_off: r_off + nk])
    expected = c[at] @ qt[:rank] + kr[at] @ qt[rank:]  # [nk, 16]
    s = np.full((TILE + 1) * HEADS_LANES, np.nan, np.float32)
    tops = np.full(HEADS_LANES, -np.inf, np.float32)
    tops[3] = 1e3
    score(qt.numpy(), 0, caches[0], caches[1], base, rows, r_off, nk, s, HEADS_LANES, tops)
    assert rel_err(torch.from_numpy(s[HEADS_LANES: (nk + 1) * HEADS_LANES].reshape(nk, -1)), expected) < 1e-6
    assert np.isnan(s[:HEADS_LANES]).all() and np.isnan(s[(nk + 1) * HEADS_LANES:]).all()
    top = expected.max(dim=0).values
    top[3] = 1e3
    assert torch.allclose(torch.from_numpy(tops), top, rtol=1e-6, atol=1e-6)

    p, o0, shrink = randn(nk, HEADS_LANES), randn(rank, HEADS_LANES), torch.rand(HEADS_LANES)
    for rescale in (False, True):
        o = o0.numpy().copy()
        weigh(p.numpy().ravel(), 0, caches[0], base, rows, r_off, nk, o, shrink.numpy(), rescale)
        want = (o0 * shrink if rescale else o0) + c[at].T @ p
        assert rel_err(torch.from_numpy(o), want) < 1e-6


def test_a_bf16_cache_write_rounds_as_torch_does():
    """The compiled step's cache writes (store_rows into bf16 bits) hold the values torch's cache writes hold:
    round to nearest even over magnitudes from subnormal to near the float32 limit, exact ties both ways, the
    largest float32 (rounds to inf), infinities, signed zeros; a NaN stays a NaN."""
    scales = torch.pow(10.0, torch.randint(-40, 38, (4000,), generator=GEN).double()).float()
    ties = (torch.randint(0, 1 << 15, (200,), generator=GEN, dtype=torch.int32) << 16 | 0x8000).view(torch.float32)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.4028235e38, -3.4028235e38, 1e-45, float("nan")])
    x = torch.cat([randn(4000) * scales, ties, -ties, special]).reshape(2, -1)
    bits = np.empty(x.shape, np.uint16)
    ds.store_rows(x.numpy(), bits)
    expected, nan = bf16_bits(x), x.isnan().numpy()
    assert np.array_equal(bits[~nan], expected[~nan])
    assert torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)[torch.from_numpy(nan)].isnan().all()


@pytest.mark.parametrize("T, start, window", [(1, 9, 0), (3, 7, 5), (2, 40, 0)])
def test_attention_over_a_bf16_cache_equals_it_over_the_same_values_in_float32(T, start, window):
    """attend reads a bf16 cache (bits) as the float32 values those bits are: bit for bit the same output."""
    heads, kv_heads, d, P = 8, 2, 16, 48
    q, k, v = randn(T, heads * d), randn(kv_heads, P, d), randn(kv_heads, P, d)
    k16, v16 = k.to(torch.bfloat16), v.to(torch.bfloat16)
    outs = []
    for kc, vc in ((bf16_bits(k16), bf16_bits(v16)), (k16.float().numpy(), v16.float().numpy())):
        out = np.empty((T, heads * d), np.float32)
        ds.attend(q.numpy(), heads, kv_heads, d, kc, vc, start, window, 0, d**-0.5, np.zeros(0, np.float32), out)
        outs.append(out)
    assert np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("T, start, selected", [(1, 9, 0), (3, 70, 37), (2, 45, 0)])
def test_latent_attention_over_a_bf16_cache_equals_it_over_the_same_values_in_float32(T, start, selected):
    """latent_attend reads a bf16 latent cache and rope keys as the float32 values those bits are."""
    heads, nope, rank, rope_d, v = 6, 8, 16, 4, 8
    S = start + T
    q, w_kv = randn(T, heads * (nope + rope_d)), randn(heads, nope + v, rank)
    c, kr = (randn(S, rank) * 0.3).to(torch.bfloat16), randn(S, rope_d).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    sel = torch.stack([torch.randperm(S, generator=g)[:selected] for _ in range(T)]).numpy().astype(np.int64) \
        if selected else np.zeros((T, 0), np.int64)
    outs = []
    for cc, rc in ((bf16_bits(c), bf16_bits(kr)), (c.float().numpy(), kr.float().numpy())):
        out = np.empty((T, heads * v), np.float32)
        ds.latent_attend(q.numpy(), heads, nope, w_kv.numpy(), cc, rc, start, 0.3, sel, selected, out)
        outs.append(out)
    assert np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("T, start, window", [(1, 9, 0), (1, 9, 4), (3, 7, 5)])
def test_attention_with_sinks_matches_its_torch_form(T, start, window):
    heads, kv_heads, d, P = 4, 2, 8, 16
    S = start + T
    q, k, v, sinks = randn(T, heads, d), randn(kv_heads, P, d), randn(kv_heads, P, d), randn(heads) * 2
    mask = causal_mask_args(start, T, window or None, torch.device("cpu"))
    expected = attention_with_sinks(q.transpose(0, 1), k[:, :S], v[:, :S], d**-0.5, mask, sinks).transpose(0, 1)
    out = np.empty((T, heads * d), np.float32)
    ds.attend(q.reshape(T, heads * d).numpy(), heads, kv_heads, d, k.numpy(), v.numpy(), start, window, 0, d**-0.5,
              sinks.numpy(), out)
    assert rel_err(torch.from_numpy(out), expected.reshape(T, heads * d)) < 1e-5
    # The sinks take their share: without them the result differs.
    ds.attend(q.reshape(T, heads * d).numpy(), heads, kv_heads, d, k.numpy(), v.numpy(), start, window, 0, d**-0.5,
              np.zeros(0, np.float32), out)
    assert rel_err(torch.from_numpy(out), expected.reshape(T, heads * d)) > 1e-2


def softmax_attention_f64(q, k, v, start, window, chunk, scale, sinks):
    """The float64 oracle of attend: q [T, heads, d] at positions start.., k, v [kv_heads, P, d]; query position
    s sees cached position p <= s, with s - p < window (window > 0) and p in s's chunk (chunk > 0); a head's sink
    logit (sinks [heads], or None) joins its softmax and attends to nothing. Returns [T, heads, d]."""
    T, heads, d = q.shape
    group = heads // k.shape[0]
    positions = np.arange(start + T)
    out = np.zeros((T, heads, d))
    for t in range(T):
        s = start + t
        seen = positions <= s
        if window:
            seen &= s - positions < window
        if chunk:
            seen &= positions // chunk == s // chunk
        for h in range(heads):
            keys, values = k[h // group, : start + T][seen], v[h // group, : start + T][seen]
            logits = keys @ q[t, h] * scale
            top = max(logits.max(), sinks[h]) if sinks is not None else logits.max()
            weights = np.exp(logits - top)
            total = weights.sum() + (np.exp(sinks[h] - top) if sinks is not None else 0.0)
            out[t, h] = weights @ values / total
    return out


# positions around and between the kernel's passes (4 keys, 8 value rows): 1, 33, 257, 1000 cached positions;
# 3 or 8 new tokens together, or split where the window starts to move (30 at 33 positions: after the 5th of 8)
# and where they cross a chunk boundary (at 256)
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("S", [1, 33, 257, 1000])
@pytest.mark.parametrize("group", [1, 2, 3, 8])
@pytest.mark.parametrize("window, chunk, with_sinks", [(0, 0, False), (100, 0, False), (30, 0, False),
                                                       (0, 128, False), (0, 0, True), (50, 0, True)])
def test_attention_over_the_cache_matches_float64_softmax(T, S, group, window, chunk, with_sinks):
    """attend against softmax attention in float64 over every shape its position and head blocking splits
    differently (head groups odd and even; cache lengths that are and are not multiples of the blocks), with
    windows, chunks and sinks: equal within float32 rounding."""
    if S < T:
        pytest.skip("fewer cached positions than new tokens")
    kv_heads, d, start = 2, 40, S - T
    heads = kv_heads * group
    rng = np.random.default_rng(S * 100 + group * 10 + T)
    q = rng.standard_normal((T, heads, d)) * 2  # peaked softmaxes as well as flat ones
    k, v = rng.standard_normal((kv_heads, S + 5, d)), rng.standard_normal((kv_heads, S + 5, d))
    sinks = (rng.standard_normal(heads) * 3).astype(np.float32) if with_sinks else None
    q32, k32, v32 = q.astype(np.float32), k.astype(np.float32), v.astype(np.float32)
    expected = softmax_attention_f64(q32.astype(np.float64), k32.astype(np.float64), v32.astype(np.float64), start,
                                     window, chunk, d**-0.5, sinks)
    out = np.empty((T, heads * d), np.float32)
    ds.attend(q32.reshape(T, heads * d), heads, kv_heads, d, k32, v32, start, window, chunk, d**-0.5,
              sinks if with_sinks else np.zeros(0, np.float32), out)
    got = out.reshape(T, heads, d).astype(np.float64)
    assert np.abs(got - expected).max() / np.abs(expected).max() < 2e-6


def absorbed_attention(q, w_kv, c, kr, start, scale, selection, selected):
    """MLA's absorbed attention in its einsum form (out [T, heads*v]) over the cache rows 0..start+T-1: every
    causal position, or with selected > 0 those of selection [T, selected] that are not after the query."""
    T, heads, qd = q.shape
    nope = qd - kr.shape[1]
    S = start + T
    c, kr = c[:S], kr[:S]
    q_lat = torch.einsum("thd,hdr->thr", q[..., :nope], w_kv[:, :nope])
    scores = (torch.einsum("thr,pr->thp", q_lat, c) + torch.einsum("thd,pd->thp", q[..., nope:], kr)) * scale
    visible = torch.arange(S)[None, :] <= start + torch.arange(T)[:, None]  # [T, S]
    if selected:
        visible &= torch.zeros(T, S, dtype=torch.bool).scatter_(1, selection, True)
    probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
    return torch.einsum("thp,pr,hvr->thv", probs, c, w_kv[:, nope:]).reshape(T, -1)


# (T, start, selected, heads, nope, rank): one position; positions and selections that are not a multiple of
# latent_attend's chunk (32), tile (8 or 4: blocks of 4 + 2 + 1 positions) or pair (2); queries whose positions end
# in different chunks; heads not a multiple of the block of 16 (6 and 10: one block padded with zero heads; 18: two
# blocks, the second mostly padding); W_UK rows not a multiple of 4 (nope 6); a rank that is not a whole number of SIMD
# vectors (20); DeepSeek's nope and rank; positions cut into spans unevenly (71: 20, 20, 20, 11); queries whose last
# span differs (start 57, T 8: spans of 20, the first query ends in the third, its fourth partial is empty).
LATENT_CASES = [(1, 9, 0, 6, 8, 16), (3, 7, 0, 6, 8, 16), (2, 8, 4, 6, 8, 16), (1, 0, 0, 6, 8, 16),
                (1, 40, 0, 6, 6, 20), (3, 31, 0, 10, 8, 16), (3, 70, 37, 6, 8, 16), (8, 60, 0, 4, 8, 16),
                (1, 2, 3, 6, 8, 16), (2, 45, 0, 4, 128, 512), (2, 45, 30, 4, 128, 512), (1, 70, 0, 6, 8, 16),
                (8, 57, 0, 4, 8, 16), (2, 45, 0, 18, 8, 16), (3, 80, 41, 18, 8, 20)]


@pytest.mark.parametrize("T, start, selected, heads, nope, rank", LATENT_CASES)
def test_latent_attention_matches_the_absorbed_form(T, start, selected, heads, nope, rank):
    """MLA's absorbed attention over the latent cache, heads in blocks, positions in chunks, against its einsum
    form; with DSA's selection (positions after the query skipped); kv_b_proj's weight as float32 and as bf16 bits
    gives the same floats. The cache rows after the last query are NaN: never read."""
    rope_d, v = 4, 8
    S = start + T
    q, w_kv = randn(T, heads, nope + rope_d), randn(heads, nope + v, rank).to(torch.bfloat16).float()
    c, kr = randn(S + 3, rank) * 0.3, randn(S + 3, rope_d)
    g = torch.Generator().manual_seed(0)  # distinct positions per query, some after it
    selection = torch.stack([torch.randperm(S, generator=g)[:max(selected, 1)] for _ in range(T)])
    expected = absorbed_attention(q, w_kv, c, kr, start, 0.3, selection, selected)
    c[S:], kr[S:] = float("nan"), float("nan")
    sel = selection.numpy().astype(np.int64) if selected else np.zeros((T, 0), np.int64)
    outs = []
    for w in (w_kv.numpy(), w_kv.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)):
        out = np.empty((T, heads * v), np.float32)
        ds.latent_attend(q.reshape(T, -1).numpy(), heads, nope, w, c.numpy(), kr.numpy(), start, 0.3, sel,
                         selected, out)
        outs.append(torch.from_numpy(out))
    assert rel_err(outs[0], expected) < 1e-5
    assert torch.equal(outs[0], outs[1])


def test_latent_attend_packed_moves_rows_between_token_and_head_major():
    """The packed absorbed form's layout steps: q_nope as head-major rows, the W_UK products back per token with
    q's rope parts beside them (zeros for the padding heads of the last block), the W_UV products per token."""
    T, heads, nope, rope_d, rank, v = 3, 6, 5, 4, 7, 2
    q = randn(T, heads * (nope + rope_d)).numpy()
    by_head = q.reshape(T, heads, nope + rope_d)
    rows = ds.q_nope_rows(q, heads, nope, rope_d)
    assert np.array_equal(rows, by_head[:, :, :nope].transpose(1, 0, 2).reshape(heads * T, nope))
    padded = 8
    lat = randn(heads * T, rank + 9).numpy()  # a padded kernel output: columns past rank are not read
    q_lat, q_rope = np.full((T, padded, rank), np.nan, np.float32), np.full((T, padded, rope_d), np.nan, np.float32)
    ds.latent_queries_of_rows(lat, q, heads, nope, q_lat, q_rope)
    assert np.array_equal(q_lat[:, :heads], lat[:, :rank].reshape(heads, T, rank).transpose(1, 0, 2))
    assert np.array_equal(q_rope[:, :heads], by_head[:, :, nope:])
    assert not q_lat[:, heads:].any() and not q_rope[:, heads:].any()
    o_rows, out = randn(heads * T, v + 3).numpy(), np.empty((T, heads * v), np.float32)
    ds.heads_to_tokens(o_rows, heads, out)
    assert np.array_equal(out, o_rows[:, :v].reshape(heads, T, v).transpose(1, 0, 2).reshape(T, heads * v))


def test_latent_spans_cover_the_positions_in_whole_quads_whatever_the_threads():
    """latent_attend's split of the positions: at most LATENT_SPANS spans of whole quads, none empty, and a
    function of the positions alone (it takes no thread count)."""
    assert ds.latent_span(540) == 136  # 540 / 4 = 135, rounded up to a whole quad: spans of 136, 136, 136, 132
    assert ds.latent_span(1) == ds.LATENT_SPAN_MIN
    for n in range(1, 3000):
        span = ds.latent_span(n)
        spans = -(-n // span)
        assert span % ds.LATENT_QUAD == 0 and span >= ds.LATENT_SPAN_MIN
        assert 1 <= spans <= ds.LATENT_SPANS and (spans - 1) * span < n


@pytest.mark.parametrize("T, start, selected, heads", [(2, 45, 0, 10), (3, 80, 41, 18), (1, 539, 0, 16)])
def test_latent_attention_numbers_do_not_depend_on_the_thread_count(T, start, selected, heads):
    """The spans and head blocks follow the shapes; the threads only share them out: 1, 2 and 3 threads give the
    same bits (with a selection, two blocks of heads, and positions split unevenly over the threads)."""
    import numba

    nope, rope_d, v, rank = 8, 4, 8, 16
    q, w_kv = randn(T, heads * (nope + rope_d)).numpy(), randn(heads, nope + v, rank).numpy()
    c, kr = randn(start + T, rank).numpy(), randn(start + T, rope_d).numpy()
    g = torch.Generator().manual_seed(1)
    sel = (torch.stack([torch.randperm(start + T, generator=g)[:selected] for _ in range(T)]).numpy()
           if selected else np.zeros((T, 0), np.int64))
    before = numba.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            out = np.empty((T, heads * v), np.float32)
            ds.latent_attend(q, heads, nope, w_kv, c, kr, start, 0.3, sel, selected, out)
            outs.append(out)
    finally:
        numba.set_num_threads(before)
    assert np.isfinite(outs[0]).all()
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


def test_kv_b_proj_goes_to_the_compiled_step_as_bf16_only_when_exact():
    from offload.model.compiled_step import _exact_bf16_or_f32

    w = randn(8, 16).to(torch.bfloat16).float()
    narrow = _exact_bf16_or_f32(w)
    widened = torch.from_numpy(narrow.view(np.int16)).view(torch.bfloat16).float()
    assert narrow.dtype == np.uint16 and torch.equal(widened, w)
    w[3, 5] += 1e-4  # one value off bf16's grid: all of it stays float32
    wide = _exact_bf16_or_f32(w)
    assert wide.dtype == np.float32 and torch.equal(torch.from_numpy(wide), w)


def test_output_gate_split_and_product_match_attention():
    T, heads, d, q0 = 2, 3, 4, 5
    qkv_out = randn(T, q0 + 2 * heads * d + 7)
    qg = np.empty((T, 2 * heads * d), np.float32)
    ds.split_gate(qkv_out.numpy(), q0, heads, d, qg)
    q, gate = qkv_out[:, q0: q0 + 2 * heads * d].reshape(T, heads, 2, d).unbind(2)  # Attention.forward's split
    assert torch.equal(torch.from_numpy(qg), torch.cat([q.reshape(T, -1), gate.reshape(T, -1)], dim=1))
    att = randn(T, heads * d)
    got = att.numpy().copy()
    ds.mul_sigmoid(got, qg[:, heads * d:])
    assert rel_err(torch.from_numpy(got), att * torch.sigmoid(gate.reshape(T, -1))) < 1e-6


ROUTERS = {
    "softmax": RouterConfig(8, 2),
    "softmax_unnormalised_scaled": RouterConfig(8, 3, norm_topk_prob=False, routed_scaling_factor=1.5),
    "softmax_group_max": RouterConfig(8, 3, topk_method="group_limited_greedy", n_group=4, topk_group=2),
    "sigmoid": RouterConfig(8, 2, scoring="sigmoid", has_correction_bias=True),
    "sigmoid_groups": RouterConfig(16, 3, scoring="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
                                   has_correction_bias=True, routed_scaling_factor=2.5),
    "sigmoid_unnormalised": RouterConfig(8, 2, scoring="sigmoid", norm_topk_prob=False),
    # ERNIE-4.5: softmax with a selection bias, the weights' sum clamped from below (high enough to bite here)
    "softmax_selection_bias_norm_min": RouterConfig(8, 2, has_correction_bias=True, norm_min=0.6),
}


@pytest.mark.parametrize("name", ROUTERS)
def test_routing_matches_every_torch_variant(name):
    cfg = ROUTERS[name]
    logits = randn(5, cfg.num_experts) * 2
    bias = randn(cfg.num_experts) * 0.3 if cfg.has_correction_bias else None
    ids, weights = torch_route(logits, cfg, bias)
    plan = compiled_step._routing_codes(cfg)
    got_ids, got_w = np.empty((5, cfg.top_k), np.int64), np.empty((5, cfg.top_k), np.float32)
    ds.route(logits.numpy(), *plan, float(cfg.routed_scaling_factor), float(cfg.norm_min),
             (bias if bias is not None else torch.zeros(0)).numpy(), got_ids, got_w)
    for t in range(5):  # the same choices; their order is free (the experts sum them)
        expected = dict(zip(ids[t].tolist(), weights[t].tolist()))
        got = dict(zip(got_ids[t].tolist(), got_w[t].tolist()))
        assert expected.keys() == got.keys()
        assert all(abs(got[e] - expected[e]) <= 1e-6 * max(1.0, abs(expected[e])) for e in got)


def test_router_logits_and_swiglu_activation():
    h, router, bias = randn(2, 48), randn(6, 48), randn(6)
    logits = np.empty((2, 6), np.float32)
    ds.router_logits(h.numpy(), router.numpy(), np.zeros(0, np.float32), logits)
    assert rel_err(torch.from_numpy(logits), F.linear(h, router)) < 1e-6
    ds.router_logits(h.numpy(), router.numpy(), bias.numpy(), logits)
    assert rel_err(torch.from_numpy(logits), F.linear(h, router, bias)) < 1e-6
    # A bf16 router as bf16 bits: the same floats as its float32 copy, so the same logits exactly.
    narrow = router.to(torch.bfloat16)
    wide = np.empty((2, 6), np.float32)
    ds.router_logits(h.numpy(), narrow.float().numpy(), bias.numpy(), wide)
    ds.router_logits(h.numpy(), narrow.view(torch.int16).numpy().view(np.uint16), bias.numpy(), logits)
    assert np.array_equal(logits, wide)
    # Split over the threads by expert (routers of ROUTER_PARALLEL_MIN values and more): the same sums exactly.
    split = np.empty((2, 6), np.float32)
    ds._router_logits_parallel(h.numpy(), narrow.view(torch.int16).numpy().view(np.uint16), bias.numpy(), split)
    assert np.array_equal(split, logits)
    h, router = randn(3, 2048), randn(ds.ROUTER_PARALLEL_MIN // 2048, 2048)
    logits = np.empty((3, router.shape[0]), np.float32)
    ds.router_logits(h.numpy(), router.numpy(), np.zeros(0, np.float32), logits)
    assert rel_err(torch.from_numpy(logits), F.linear(h, router)) < 1e-6
    g, u = randn(2, 10) * 4, randn(2, 10)
    out = np.empty((2, 10), np.float32)
    ds.silu_mul(g.numpy(), u.numpy(), out)
    assert rel_err(torch.from_numpy(out), F.silu(g) * u) < 1e-6


# ---------------------------------------------------------------- Gated DeltaNet stages

DELTANET_FAMILIES = ["qwen3_next", "qwen3_5_moe"]  # projections grouped per key head / four projections


@pytest.fixture(scope="module")
def deltanet_model(checkpoint):
    models = {}

    def get(name: str):
        if name not in models:
            models[name] = offload.load(checkpoint(name), device="cpu", experts="int8", dense="int8",
                                        max_context=16).transformer
        return models[name]

    return get


def filled_state(net, seed: int) -> RecurrentState:
    """A recurrent state at position 5 holding random values (as after a prompt)."""
    gen = torch.Generator().manual_seed(seed)
    state = net.new_cache(16, torch.float32, torch.device("cpu"))
    state.conv.copy_(torch.randn(state.conv.shape, generator=gen))
    state.state.copy_(torch.randn(state.state.shape, generator=gen) * 0.3)
    state.position = 5
    return state


@pytest.mark.parametrize("name", DELTANET_FAMILIES)
def test_deltanet_projection_columns_gather_what_project_returns(deltanet_model, name):
    from csrc_py.dispatch import linear

    net = deltanet_model(name).layers[0].attn
    x = randn(3, net.in_proj.packed.shape[2])
    qkv, z, b, a = net.project(x)
    fused = linear(x, net.in_proj.packed)  # every projection's output side by side
    assert torch.equal(fused[:, net.projection_columns(net.in_proj.starts)],
                       torch.cat([qkv, z.reshape(3, -1), b, a], dim=1))


@pytest.mark.parametrize("name", DELTANET_FAMILIES)
def test_deltanet_token_stages_match_the_module(deltanet_model, name):
    """Token by token from a filled state: the convolution (and its window), the q/k normalisation, and the delta
    rule with the gated norm (and the state) against GatedDeltaNet's torch code."""
    net = deltanet_model(name).layers[0].attn
    Hk, Hv, dk, dv = net.k_heads, net.v_heads, net.k_dim, net.v_dim
    cache = filled_state(net, 1)
    window, state = cache.conv.numpy().copy(), cache.state.numpy().copy()
    conv_w = net.conv_weight.reshape(net.conv_dim, net.conv_kernel).numpy()
    for _ in range(3):
        qkv, z, b, a = randn(1, net.conv_dim), randn(1, Hv, dv), randn(1, Hv), randn(1, Hv)
        mixed = net.conv(qkv, cache)  # [1, C], the window moves on
        got = qkv[0].numpy().copy()
        ds.short_conv(got, conv_w, window)
        assert rel_err(torch.from_numpy(got), mixed[0]) < 1e-6
        assert rel_err(torch.from_numpy(window), cache.conv) == 0

        q, k, v = mixed.split([Hk * dk, Hk * dk, Hv * dv], dim=-1)
        row = mixed[0].numpy().copy()
        ds.l2_normalise_heads(row, Hk, dk, L2_EPS, dk**-0.5)
        ds.l2_normalise_heads(row[Hk * dk:], Hk, dk, L2_EPS, 1.0)
        assert rel_err(torch.from_numpy(row[:Hk * dk]), (l2norm(q.reshape(Hk, dk)) * dk**-0.5).reshape(-1)) < 1e-6
        assert rel_err(torch.from_numpy(row[Hk * dk: 2 * Hk * dk]), l2norm(k.reshape(Hk, dk)).reshape(-1)) < 1e-6

        g = net.neg_A * F.softplus(a + net.dt_bias)
        out, _ = gated_delta_rule(q.reshape(1, Hk, dk), k.reshape(1, Hk, dk), v.reshape(1, Hv, dv), g, b.sigmoid(),
                                  cache.state)  # one token: the state in place
        expected = gated_rms_norm(out, z, net.norm_weight, net.eps).reshape(-1)
        core, delta = np.empty(Hv * dv, np.float32), np.empty((Hv, dv), np.float32)
        ds.gated_delta_step(row, z.reshape(-1).numpy(), b[0].numpy(), a[0].numpy(), (Hk, Hv, dk, dv),
                            net.neg_A.numpy(), net.dt_bias.numpy(), state, net.norm_weight.numpy(), net.eps, delta,
                            core)
        assert rel_err(torch.from_numpy(core), expected) < 1e-5
        assert rel_err(torch.from_numpy(state), cache.state) < 1e-5


@pytest.mark.parametrize("name", DELTANET_FAMILIES)
def test_deltanet_block_matches_the_layer(deltanet_model, name):
    """deltanet_block over two tokens = x + GatedDeltaNet(RMSNorm(x)), the recurrent state carried alike."""
    layer = deltanet_model(name).layers[0]
    net, H = layer.attn, layer.input_norm.weight.shape[0]
    plan = compiled_step._DeltaNetPlan.build(layer)
    assert plan is not None
    x = randn(2, H)
    torch_state, compiled_state = filled_state(net, 2), filled_state(net, 2)
    with torch.inference_mode():
        expected = x + net(layer.input_norm(x), 5, torch_state)
    block, args, _ = plan.args(2, H, compiled_state, None)
    out = np.empty((2, H), np.float32)
    block(x.numpy(), out, *args)
    assert rel_err(torch.from_numpy(out), expected) < 2e-5
    assert rel_err(compiled_state.state, torch_state.state) < 1e-5
    assert rel_err(compiled_state.conv, torch_state.conv) < 2e-5  # the projected inputs, float32 rounding apart


# ---------------------------------------------------------------- whole steps


@pytest.fixture(scope="session")
def checkpoint(checkpoint_dir):
    """name -> the tiny model's folder (written once per session by conftest's checkpoint_dir)."""
    return lambda name: checkpoint_dir(name)[0]


def decode_steps(model, compiled: bool) -> torch.Tensor:
    """Logits of IDS fed one token per forward pass, through the compiled step or the torch path."""
    previous = compiled_step.set_enabled(compiled)
    try:
        with torch.inference_mode():
            return torch.cat([model.transformer(IDS[i: i + 1], i) for i in range(len(IDS))])
    finally:
        compiled_step.set_enabled(previous)


def paired_steps(model) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """IDS fed one token per forward pass, each position through the torch path and then the compiled step, so
    both steps of a position read the same cache (the one the compiled steps wrote): a rounding flip of the int8
    activations at one position (assert_same_steps) does not follow either path into the next. A recurrent state
    (Gated DeltaNet), which cannot run a position twice, is put back as it was before the torch step. What the
    compiled step writes into the caches is checked against what the torch step wrote, position by position, as
    the logits are. Returns the compiled logits, the torch logits and what the torch steps added to each MoE block's
    heat."""
    moes = list(model.transformer.moe_blocks())
    caches = [[t for t in vars(c).values() if torch.is_tensor(t)] for c in model.transformer.caches]
    states = [c for c in model.transformer.caches if isinstance(c, RecurrentState)]
    got, expected, heat, cache_errors = [], [], [torch.zeros_like(m.heat) for m in moes], []
    with torch.inference_mode():
        for i in range(len(IDS)):
            before = [m.heat.clone() for m in moes]
            saved = [(c.conv.clone(), c.state.clone(), c.position) for c in states]
            previous = compiled_step.set_enabled(False)
            try:
                expected.append(model.transformer(IDS[i: i + 1], i).clone())
            finally:
                compiled_step.set_enabled(previous)
            for h, m, b in zip(heat, moes, before):
                h += m.heat - b
            written = [[t.clone() for t in tensors] for tensors in caches]
            for c, (conv, state, position) in zip(states, saved):
                c.conv.copy_(conv)
                c.state.copy_(state)
                c.position = position
            previous = compiled_step.set_enabled(True)
            try:
                got.append(model.transformer(IDS[i: i + 1], i).clone())
            finally:
                compiled_step.set_enabled(previous)
            cache_errors.append(max(rel_err(t, w) for tensors, ws in zip(caches, written) for t, w in zip(tensors, ws)))
    errors = torch.tensor(cache_errors)
    assert errors.median() < 2e-5 and errors.max() < 2e-2, errors.tolist()
    return torch.cat(got), torch.cat(expected), heat


def assert_same_steps(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """The compiled step's logits [positions, V] are the torch step's within float32 rounding. The int8 activations
    of the packed kernels are a step function of their input: where float32 rounding moves one value across a
    rounding boundary, that position differs by a quantum (~1e-3 relative; up to 1e-2 in these tiny models' short
    groups). Where each path runs on its own (decode_steps), a flipped quantum that reaches the KV cache stays
    there, so later positions may carry it (1.1e-2 measured on an Intel AVX-512/AMX host, whose torch kernels sum
    in another order); paired_steps keeps both paths on one cache. So: most positions within float32 rounding,
    none beyond half of int8's own bound against transformers (4e-2, test_cpu_model), the same greedy tokens.
    Returns whether every position agreed within float32 rounding."""
    errors = torch.tensor([rel_err(g, e) for g, e in zip(got, expected)])
    assert errors.median() < 2e-5 and errors.max() < 2e-2, errors.tolist()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.95
    return bool(errors.max() < 2e-5)


def compiled_parts(model) -> tuple[int, int]:
    """(layers whose attention ran compiled, layers whose MLP did)."""
    layers = [layer.__dict__.get("_compiled_step") for layer in model.transformer.layers]
    return (sum(c is not None and c.attn is not None for c in layers),
            sum(c is not None and c.mlp is not None for c in layers))


# (variant, experts format, dense format, whether attention compiles): GQA with per-head and full q/k norm, q/k/v
# and o bias, clip_qkv, sliding windows, partial RoPE; dense MLP layers, shared experts with and without the sigmoid
# gate; every routing variant; MLA in the absorbed form with and without q-LoRA, interleaved RoPE and YaRN;
# Qwen3-Next / Qwen3.5's Gated DeltaNet layers (both projection layouts), gated attention and (1 + w) norms;
# gpt-oss's sinks, router bias and clamped experts with biases; ERNIE-4.5's pair-wise RoPE, biased dense MLPs and
# shared experts, softmax routing with a selection bias; Hunyuan's q/k norms after RoPE; Llama-4's chunked
# attention, no-RoPE layers with the query temperature, L2 q/k norm and input-scaled experts (top-1 and top-2).
CASES = [
    ("qwen3_moe", "int8", "int8", True),
    ("qwen3_moe_bias", "int4", "int4", True),
    ("mixtral_window_linear_rope", "int8", "int8", True),
    ("olmoe_clip", "int4", "int8", True),
    ("qwen2_moe", "int8", "int8", True),
    ("glm4_moe", "int8", "int8", True),
    ("minimax_m2", "int4", "int8", True),
    ("dots1_window_bias", "int8", "int8", True),
    ("deepseek_v2_group_yarn", "int8", "int8", True),
    ("deepseek_v2", "int4", "int4", True),
    ("deepseek_v3", "bf16", "int8", True),
    ("deepseek_v3_no_interleave", "int8", "int8", True),
    ("glm4_moe_lite", "int8", "int8", True),
    ("qwen3_next", "int8", "int8", True),
    ("qwen3_5_moe", "int4", "int4", True),
    ("gpt_oss", "int4", "int8", True),
    ("ernie4_5_moe", "int8", "int8", True),
    ("hunyuan_v1_moe", "int8", "int8", True),
    ("llama4", "int8", "int8", True),
    ("llama4_text", "int4", "int8", True),
    ("qwen3_moe", "int4s", "int4s", True),
    ("deepseek_v2", "int4s", "int8", True),
    ("deepseek_v32", "int8", "int8", True),
    ("glm_moe_dsa", "int4", "int4", True),
]


@pytest.mark.parametrize("name, experts, dense, attention", CASES)
def test_compiled_step_equals_the_torch_step(checkpoint, name, experts, dense, attention):
    model = offload.load(checkpoint(name), device="cpu", experts=experts, dense=dense, max_context=64)
    got, expected, heat_torch = paired_steps(model)
    L = len(model.transformer.layers)
    assert compiled_parts(model) == ((L if attention else 0), L)
    if assert_same_steps(got, expected):  # the same routing choices, so the counts grew alike on both paths
        for moe, torch_part in zip(model.transformer.moe_blocks(), heat_torch):
            assert torch.equal(moe.heat, 2 * torch_part)


# A bf16 KV cache (load's kv_cache="bf16"): GQA with sinks and sliding windows, MLA (the packed absorbed form too),
# DSA (the indexer's keys stay float32), Gated DeltaNet beside gated attention.
@pytest.mark.parametrize("name, experts, dense", [("qwen3_moe", "int8", "int8"), ("gpt_oss", "int4", "int8"),
                                                  ("mixtral_window_linear_rope", "int8", "int8"),
                                                  ("deepseek_v2", "int4s", "int4s"), ("deepseek_v32", "int8", "int8"),
                                                  ("qwen3_next", "int8", "int8")])
def test_compiled_step_equals_the_torch_step_over_a_bf16_cache(checkpoint, name, experts, dense):
    model = offload.load(checkpoint(name), device="cpu", experts=experts, dense=dense, max_context=64,
                         kv_cache="bf16")
    cached = [(c.k, c.v) if hasattr(c, "k") else (c.c_kv, c.k_rope) for c in model.transformer.caches
              if not isinstance(c, RecurrentState)]
    assert cached and all(t.dtype == torch.bfloat16 for pair in cached for t in pair)
    got, expected, _ = paired_steps(model)
    L = len(model.transformer.layers)
    assert compiled_parts(model) == (L, L)
    assert_same_steps(got, expected)


def test_prefill_and_torch_weights_stay_on_the_torch_path(checkpoint):
    model = offload.load(checkpoint("qwen3_moe"), device="cpu", experts="int8", dense="int8", max_context=64)
    layer, x = model.transformer.layers[0], torch.zeros(1, model.transformer.cfg.hidden_size)
    assert isinstance(compiled_step.for_layer(layer, x), CompiledLayer)
    assert compiled_step.for_layer(layer, torch.zeros(compiled_step.MAX_TOKENS + 1, x.shape[1])) is None
    assert compiled_step.for_layer(layer, x.to(torch.bfloat16)) is None
    previous = compiled_step.set_enabled(False)
    try:
        assert compiled_step.for_layer(layer, x) is None
    finally:
        compiled_step.set_enabled(previous)
    # A module holding state the compiled code does not know (a new attention feature) keeps the torch path.
    layer.attn.novel_feature = True
    assert CompiledLayer.build(layer).attn is None
    del layer.attn.novel_feature
    assert CompiledLayer.build(layer).attn is not None
    # Dense weights in torch (no dense format): the attention stays in torch, the MoE block still compiles.
    torch_dense = offload.load(checkpoint("qwen3_moe"), device="cpu", experts="int8", max_context=64)
    decode_steps(torch_dense, compiled=True)
    assert compiled_parts(torch_dense)[0] == 0


# DeepSeek Sparse Attention: the lightning indexer runs inside the compiled MLA block (csrc_py.indexer_step), GLM-5's
# shared layer reading the choice of the layer before it; 20 positions take the sparse path past top-k 8 / 12.
@pytest.mark.parametrize("name, experts, dense", [("deepseek_v32", "bf16", "int4"), ("glm_moe_dsa", "int8", "int8")])
def test_compiled_step_runs_the_indexer_without_torch(checkpoint, monkeypatch, name, experts, dense):
    from offload.model.indexer import LightningIndexer

    model = offload.load(checkpoint(name), device="cpu", experts=experts, dense=dense, max_context=64)
    expected = decode_steps(model, compiled=False)
    calls = []
    monkeypatch.setattr(LightningIndexer, "forward", lambda *args: calls.append(args))
    got = decode_steps(model, compiled=True)
    assert calls == [] and compiled_parts(model)[0] == len(model.transformer.layers)
    topk = model.config.indexer.topk
    for layer in model.transformer.layers:  # the last step's choice, published for the shared layers
        assert layer.attn.selection.positions.shape == (1, topk)
    assert_same_steps(got, expected)

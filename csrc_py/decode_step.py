"""The compiled decode step: one decoder layer's attention block and MLP block, each one Numba call over
preallocated buffers, for a few tokens on the CPU.

    attention_block(x, out, ...)   out = x + o_proj(attend(rope(norms(qkv(rms_norm(x))))))   (cache written)
    mla_block(x, out, ...)         the same for MLA in its absorbed form                     (latent cache written)
                                   with DeepSeek Sparse Attention's indexer (csrc_py.indexer_step) where it has one
    deltanet_block(x, out, ...)    out = x + out_proj(gated_norm(delta_rule(conv(in_proj(rms_norm(x))))))
                                                                                       (recurrent state updated)
    moe_block(out, ...)            out += experts(route(h)) + gate * shared(h),  h = rms_norm(out)
    mlp_block(out, ...)            out += swiglu(rms_norm(out))
    head_block(x, ...)             logits = lm_head(rms_norm(x)) (+ bias)         (the final norm and the LM head)

The stages are the torch modules' math in the same order and in float32 (offload/model/*.py is the oracle of each
one; tests/test_decode_step.py checks them stage by stage and whole): Python and torch dispatch, ~100 ops per layer
on the torch path, are what this removes. The weight-reading kernels are the existing ones (csrc_py.linear,
csrc_py.expert_ffn), called from here; everything between them runs on the calling thread, since at decode sizes
it costs less than waking the thread pool, except the attention over the cache, which grows with the context and
is split over KV heads, and the gated delta rule, split over value heads.

A packed matrix travels as a tuple (q, d, m) of csrc_py.formats arrays (d, m as uint16 bits; m is d for int8, None
for int4s, d and m are empty for bf16): `packed_linear` picks the kernel from q's type when the caller is compiled.
Flags are numbers, not types, so one compiled signature serves every layer of a format combination: an empty
array means "absent" (bias, norm weight, correction bias, shared gate, sinks), 0 means "none" (window, chunk,
clip, L2 eps, temperature).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from csrc_py import indexer_step
from csrc_py.attend_simd import LANES, SCORE_LANES, WEIGH_CHUNKS, score_quad_tile, score_tile, weigh_tile
from csrc_py.expert_ffn import packed_experts, packed_format
from csrc_py.fast_math import exp_f32, exp_reduced
from csrc_py.latent_simd import HEADS_LANES, lanes_fma, latent_score_tile, latent_weigh_tile
from csrc_py.latent_simd import TILE as LATENT_TILE
from csrc_py.linear import linear_bf16, linear_q4, linear_q8
from csrc_py.simd import bits_to_f32, f32_to_bits, prefetch

# Routing codes (offload.model.routing.route's cases).
SOFTMAX, SIGMOID = 0, 1
GROUPS_NONE, GROUPS_MAX, GROUPS_TOP2_SUM = 0, 1, 2
# q/k norm codes (offload.model.attention.Attention.qk_norm).
QK_NORM_NONE, QK_NORM_HEAD, QK_NORM_FULL = 0, 1, 2


# ---------------------------------------------------------------- format dispatch


def packed_linear(x, w, y):
    """y[:, :Op] = x @ W.T for x float32 [T, K], W a packed (q, d, m) tuple, y float32 [T, >= padded O]; for a
    stack of E matrices (MLA's per-head maps) the rows split evenly over them, in order (csrc_py.linear)."""
    raise NotImplementedError("compiled code only")


@overload(packed_linear)
def _packed_linear(x, w, y):
    fmt = packed_format(w[0])
    if fmt == "bf16":
        def impl(x, w, y):
            linear_bf16(x, w[0], y)
    elif fmt == "int8":
        def impl(x, w, y):
            linear_q8(x, w[0], w[1], y)
    else:
        def impl(x, w, y):
            linear_q4(x, w[0], w[1], w[2], y)
    return impl


def widen(row, i):
    """row[i] as float32, for a float32 row or a row of bf16 bits (uint16): a weight, or a cached key / value /
    latent of a bf16 cache."""
    raise NotImplementedError("compiled code only")


@overload(widen, inline="always")
def _widen(row, i):
    if row.dtype == types.uint16:
        return lambda row, i: bits_to_f32(np.uint32(row[i]) << np.uint32(16))
    return lambda row, i: row[i]


BF16_NAN = np.uint16(0x7FC0)  # a quiet NaN (torch's scalar conversion writes it; its vectorized one 0xFFFF)


def store(row, i, x):
    """row[i] = the float32 x, for a float32 row, or as bf16 bits (uint16) rounded to nearest even, as torch's
    .to(torch.bfloat16) rounds: a bf16 cache holds the same values whichever path wrote it (a NaN as a NaN)."""
    raise NotImplementedError("compiled code only")


@overload(store, inline="always")
def _store(row, i, x):
    if row.dtype == types.uint16:
        def impl(row, i, x):
            bits = np.uint32(f32_to_bits(np.float32(x)))
            if x != x:
                row[i] = BF16_NAN
            else:
                row[i] = np.uint16((bits + ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF))
                                   >> np.uint32(16))
        return impl
    def impl(row, i, x):
        row[i] = x
    return impl


# ---------------------------------------------------------------- stages


@njit(nogil=True, cache=True)
def rms_norm(x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray) -> None:
    """out[t] = w * x[t] / sqrt(mean(x[t]^2) + eps) for x, out float32 [T, D] (RMSNorm in float32)."""
    T, D = x.shape
    for t in range(T):
        acc = 0.0
        for i in range(D):
            acc += np.float64(x[t, i]) * x[t, i]
        r = np.float32(1.0 / np.sqrt(acc / D + eps))
        for i in range(D):
            out[t, i] = w[i] * (x[t, i] * r)


@njit(nogil=True, cache=True)
def rms_norm_heads(v: np.ndarray, heads: int, d: int, w: np.ndarray, eps: float) -> None:
    """RMSNorm each of `heads` slices of width d of every row of v [T, >= heads*d], in place (per-head q/k norm;
    an empty w: no weight, Llama-4's L2 q/k norm)."""
    for t in range(v.shape[0]):
        row = v[t]
        for h in range(heads):
            seg = row[h * d: h * d + d]
            acc = 0.0
            for i in range(d):
                acc += np.float64(seg[i]) * seg[i]
            r = np.float32(1.0 / np.sqrt(acc / d + eps))
            if w.size:
                for i in range(d):
                    seg[i] = w[i] * (seg[i] * r)
            else:
                for i in range(d):
                    seg[i] = seg[i] * r


@njit(nogil=True, cache=True)
def query_temperature(q: np.ndarray, start: int, floor_scale: float, attn_scale: float) -> None:
    """q [T, ...] row t *= 1 + attn_scale * log1p(floor((start + t + 1) / floor_scale)), in place (Llama-4's
    no-RoPE layers; offload.model.attention.query_temperature)."""
    for t in range(q.shape[0]):
        position = np.float32(start + t)
        steps = np.floor((position + np.float32(1.0)) / np.float32(floor_scale))
        factor = np.float32(np.log1p(steps)) * np.float32(attn_scale) + np.float32(1.0)
        for i in range(q.shape[1]):
            q[t, i] *= factor


@njit(nogil=True, cache=True)
def rope(v: np.ndarray, heads: int, d: int, offset: int, interleaved: bool, cos: np.ndarray, sin: np.ndarray,
         start: int) -> None:
    """RotaryTable.apply in place: rotate 2*half channels from `offset` of each of `heads` slices of width d of row
    t of v [T, ...] for position start+t; cos, sin [P, half]. Half layout pairs channel i with i+half; interleaved
    pairs 2i with 2i+1 and leaves the result in half layout, as the table does."""
    half = cos.shape[1]
    pairs = np.empty(2 * half, np.float32)
    for t in range(v.shape[0]):
        c, s = cos[start + t], sin[start + t]
        row = v[t]
        for h in range(heads):
            seg = row[h * d + offset: h * d + offset + 2 * half]
            if interleaved:
                pairs[:] = seg
                for i in range(half):
                    seg[i], seg[i + half] = pairs[2 * i], pairs[2 * i + 1]
            for i in range(half):
                x1, x2 = seg[i], seg[i + half]
                seg[i] = x1 * c[i] - x2 * s[i]
                seg[i + half] = x2 * c[i] + x1 * s[i]


@njit(nogil=True, cache=True)
def clip(v: np.ndarray, limit: float) -> None:
    """v <- clamp(v, -limit, limit), in place."""
    lim = np.float32(limit)
    for t in range(v.shape[0]):
        for i in range(v.shape[1]):
            v[t, i] = min(max(v[t, i], -lim), lim)


@njit(nogil=True, cache=True)
def write_cache(k: np.ndarray, v: np.ndarray, kv_heads: int, d: int, kcache: np.ndarray, vcache: np.ndarray,
                start: int) -> None:
    """k, v [T, kv_heads*d] -> kcache, vcache [kv_heads, P, d] (float32, or bf16 bits) at positions
    start..start+T-1."""
    T = k.shape[0]
    for g in range(kv_heads):
        store_rows(k[:, g * d: g * d + d], kcache[g, start: start + T])
        store_rows(v[:, g * d: g * d + d], vcache[g, start: start + T])


@njit(nogil=True, cache=True)
def store_rows(x: np.ndarray, out: np.ndarray) -> None:
    """out = x for x [T, n] float32 and out [T, n] float32 or bf16 bits (store)."""
    for t in range(x.shape[0]):
        row = out[t]
        for i in range(x.shape[1]):
            store(row, i, x[t, i])


LINE = 64  # bytes per cache line


@njit(nogil=True, cache=True, inline="always")
def prefetch_rows(a: np.ndarray, first: int, stop: int) -> None:
    """Prefetch rows first..stop-1 of a C-contiguous 2-D array a (none past its last row)."""
    size = a.shape[1] * a.itemsize
    for at in range(first * size, min(stop, a.shape[0]) * size, LINE):
        prefetch(a, at)


SOFTMAX_EXP_MIN = np.float32(-87.0)  # a softmax numerator below exp(-87) is 0


@njit(nogil=True, cache=True, inline="always", fastmath={"contract"})
def exp_nonpositive(x: float) -> float:
    """exp(x) for a float32 x <= 0 (a softmax numerator; 0 below SOFTMAX_EXP_MIN), in code that vectorizes
    (csrc_py.fast_math.exp_reduced: a non-positive argument needs fewer selects than exp_f32, whose extra ones
    measured 3% slower over `attend`)."""
    p, k = exp_reduced(max(x, SOFTMAX_EXP_MIN))
    return p * bits_to_f32((np.int32(k) + np.int32(127)) << 23) if x > SOFTMAX_EXP_MIN else np.float32(0.0)


@njit(nogil=True, cache=True, inline="always", fastmath={"contract"})
def exp_shifted(s: np.ndarray, n: int, best: float) -> float:
    """s[:n] = exp(s[:n] - best) in place and their sum, for best >= max(s[:n]) (-inf entries give 0): softmax's
    numerators, vectorized."""
    total = np.float32(0.0)
    for j in range(n):
        s[j] = exp_nonpositive(s[j] - best)
        total += s[j]
    return total


# Positions per pass of the attention over the cache: the scores of KEYS_PER_PASS keys against four query rows (two
# on the 256-bit tiers) come from one pass over d (16 accumulators: each loaded query or key value feeds 4
# multiply-adds, where one dot product at a time fed one multiply-add per two loads; with 512-bit vectors four rows
# against four keys measured 1.4-1.7x faster than two rows against four). Without the value tile (d not a multiple
# of the vector width), VALUES_PER_PASS value rows go into a query row's accumulators per pass over d (one load and
# store of the accumulators per 8 value rows).
KEYS_PER_PASS = 4
VALUES_PER_PASS = 8
# Bytes of value rows per block of weigh_values: they stay in L1 (32-48 KiB on the hosts measured) while every pair
# of query rows passes over them. 16 KiB and 32 KiB measured alike (within 3%), 8 KiB 10% slower.
WEIGH_BLOCK_BYTES = 16384
# How far ahead of the pass the key and value rows are prefetched. A head's cached rows are short streams (a few
# hundred KiB) that the hardware prefetcher ramps up on late: from DRAM, 1.2-1.35x per call at 580-2048 positions
# (2048 and 8192 bytes measured slower than 4096).
ATTEND_AHEAD_BYTES = 4096


@njit(nogil=True, cache=True, inline="always", fastmath={"contract", "reassoc"})
def dots_4x4(qa: np.ndarray, qb: np.ndarray, qc: np.ndarray, qd: np.ndarray, k0: np.ndarray, k1: np.ndarray,
             k2: np.ndarray, k3: np.ndarray):
    """The 16 dot products of query rows qa..qd with key rows k0..k3 (all [d]), in one pass over d: row qa's four,
    then qb's, qc's, qd's."""
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = c0 = c1 = c2 = c3 = e0 = e1 = e2 = e3 = np.float32(0.0)
    for i in range(qa.size):
        x0, x1, x2, x3 = widen(k0, i), widen(k1, i), widen(k2, i), widen(k3, i)
        y = qa[i]
        a0, a1, a2, a3 = a0 + y * x0, a1 + y * x1, a2 + y * x2, a3 + y * x3
        y = qb[i]
        b0, b1, b2, b3 = b0 + y * x0, b1 + y * x1, b2 + y * x2, b3 + y * x3
        y = qc[i]
        c0, c1, c2, c3 = c0 + y * x0, c1 + y * x1, c2 + y * x2, c3 + y * x3
        y = qd[i]
        e0, e1, e2, e3 = e0 + y * x0, e1 + y * x1, e2 + y * x2, e3 + y * x3
    return a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, e0, e1, e2, e3


@njit(nogil=True, cache=True, inline="always", fastmath={"contract", "reassoc"})
def dots_2x4(qa: np.ndarray, qb: np.ndarray, k0: np.ndarray, k1: np.ndarray, k2: np.ndarray, k3: np.ndarray):
    """The 8 dot products of query rows qa, qb with key rows k0..k3 (all [d]), in one pass over d."""
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
    for i in range(qa.size):
        x, y = qa[i], qb[i]
        c0, c1, c2, c3 = widen(k0, i), widen(k1, i), widen(k2, i), widen(k3, i)
        a0 += x * c0
        a1 += x * c1
        a2 += x * c2
        a3 += x * c3
        b0 += y * c0
        b1 += y * c1
        b2 += y * c2
        b3 += y * c3
    return a0, a1, a2, a3, b0, b1, b2, b3


@njit(nogil=True, cache=True, inline="always", fastmath={"contract", "reassoc"})
def dots_1x4(qa: np.ndarray, k0: np.ndarray, k1: np.ndarray, k2: np.ndarray, k3: np.ndarray):
    """The 4 dot products of query row qa with key rows k0..k3 (all [d]), in one pass over d."""
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for i in range(qa.size):
        x = qa[i]
        a0 += x * widen(k0, i)
        a1 += x * widen(k1, i)
        a2 += x * widen(k2, i)
        a3 += x * widen(k3, i)
    return a0, a1, a2, a3


@njit(nogil=True, cache=True, inline="always", fastmath={"contract", "reassoc"})
def dot(x: np.ndarray, y: np.ndarray) -> float:
    """x . y for x [d] float32 and y [d] float32 or bf16 bits."""
    total = np.float32(0.0)
    for i in range(x.size):
        total += x[i] * widen(y, i)
    return total


@njit(nogil=True, cache=True, inline="always", fastmath={"contract", "reassoc"})
def store_scores(scores: np.ndarray, best: np.ndarray, a: int, j: int, s0: float, s1: float, s2: float,
                 s3: float) -> None:
    """scores[a, j..j+3] = s0..s3, and best[a] raised to their maximum."""
    scores[a, j], scores[a, j + 1], scores[a, j + 2], scores[a, j + 3] = s0, s1, s2, s3
    best[a] = max(best[a], max(max(s0, s1), max(s2, s3)))


@njit(nogil=True, cache=True, inline="always", fastmath={"contract", "reassoc"})
def score_key_quads(qs: np.ndarray, keys: np.ndarray, scores: np.ndarray, best: np.ndarray, ahead: int) -> None:
    """score_keys for a multiple of four query rows: four keys at a time against four rows (dots_4x4), then the
    keys left over one at a time."""
    rows, n = qs.shape[0], keys.shape[0]
    whole = n - n % KEYS_PER_PASS
    for j in range(0, whole, KEYS_PER_PASS):
        prefetch_rows(keys, j + ahead, j + ahead + KEYS_PER_PASS)
        k0, k1, k2, k3 = keys[j], keys[j + 1], keys[j + 2], keys[j + 3]
        for a in range(0, rows, 4):
            s = dots_4x4(qs[a], qs[a + 1], qs[a + 2], qs[a + 3], k0, k1, k2, k3)
            store_scores(scores, best, a, j, s[0], s[1], s[2], s[3])
            store_scores(scores, best, a + 1, j, s[4], s[5], s[6], s[7])
            store_scores(scores, best, a + 2, j, s[8], s[9], s[10], s[11])
            store_scores(scores, best, a + 3, j, s[12], s[13], s[14], s[15])
    score_keys_one_by_one(qs, keys, whole, scores, best)


@njit(nogil=True, cache=True, inline="always")
def row_strides(qs: np.ndarray, keys: np.ndarray, scores: np.ndarray) -> tuple[int, int, int]:
    """The row strides of a score tile's arrays, in elements (the tiles take element offsets)."""
    return qs.strides[0] // qs.itemsize, keys.strides[0] // keys.itemsize, scores.strides[0] // scores.itemsize


@njit(nogil=True, cache=True, inline="always")
def lowest_tops(rows: int) -> np.ndarray:
    """[rows * 4] float32 -inf: each row's running maxima in the four lanes of a score tile's output."""
    tops = np.empty(rows * 4, np.float32)
    for i in range(tops.size):
        tops[i] = -np.inf
    return tops


@njit(nogil=True, cache=True, inline="always")
def raise_best(best: np.ndarray, tops: np.ndarray, rows: int) -> None:
    """best[a] = max(best[a], its four running maxima tops[4a..4a+3]) for the first `rows` rows."""
    for a in range(rows):
        top = max(max(tops[4 * a], tops[4 * a + 1]), max(tops[4 * a + 2], tops[4 * a + 3]))
        best[a] = max(best[a], top)


@njit(nogil=True, cache=True, inline="always", fastmath={"contract", "reassoc"})
def score_key_quad_tiles(qs: np.ndarray, keys: np.ndarray, scores: np.ndarray, best: np.ndarray, ahead: int) -> None:
    """score_key_quads for d a multiple of LANES (16): each four rows against four keys one
    attend_simd.score_quad_tile (its 16 sums folded, each row's running maxima kept in four lanes), best raised from
    those maxima once the pass is over, the keys left over one at a time."""
    rows, n, d = qs.shape[0], keys.shape[0], qs.shape[1]
    whole = n - n % KEYS_PER_PASS
    tops = lowest_tops(rows)
    q_stride, k_stride, s_stride = row_strides(qs, keys, scores)
    for j in range(0, whole, KEYS_PER_PASS):
        prefetch_rows(keys, j + ahead, j + ahead + KEYS_PER_PASS)
        for a in range(0, rows, 4):
            score_quad_tile(qs, a * q_stride, q_stride, keys, j * k_stride, k_stride, d, scores, a * s_stride + j,
                            s_stride, tops, 4 * a)
    raise_best(best, tops, rows)
    score_keys_one_by_one(qs, keys, whole, scores, best)


@njit(nogil=True, cache=True, inline="always", fastmath={"contract", "reassoc"})
def score_key_pairs(qs: np.ndarray, keys: np.ndarray, scores: np.ndarray, best: np.ndarray, ahead: int) -> None:
    """score_keys for any number of query rows: four keys at a time against two rows (dots_2x4), then the odd row,
    then the keys left over one at a time."""
    rows, n = qs.shape[0], keys.shape[0]
    whole = n - n % KEYS_PER_PASS
    for j in range(0, whole, KEYS_PER_PASS):
        prefetch_rows(keys, j + ahead, j + ahead + KEYS_PER_PASS)
        k0, k1, k2, k3 = keys[j], keys[j + 1], keys[j + 2], keys[j + 3]
        for a in range(0, rows - 1, 2):
            a0, a1, a2, a3, b0, b1, b2, b3 = dots_2x4(qs[a], qs[a + 1], k0, k1, k2, k3)
            store_scores(scores, best, a, j, a0, a1, a2, a3)
            store_scores(scores, best, a + 1, j, b0, b1, b2, b3)
        if rows % 2:
            a0, a1, a2, a3 = dots_1x4(qs[rows - 1], k0, k1, k2, k3)
            store_scores(scores, best, rows - 1, j, a0, a1, a2, a3)
    score_keys_one_by_one(qs, keys, whole, scores, best)


@njit(nogil=True, cache=True, inline="always", fastmath={"contract", "reassoc"})
def score_key_pair_tiles(qs: np.ndarray, keys: np.ndarray, scores: np.ndarray, best: np.ndarray, ahead: int) -> None:
    """score_key_pairs for d a multiple of SCORE_LANES (8), on a CPU with AVX: each pair of rows against four keys
    is one attend_simd.score_tile (its sums folded: 1.12-1.35x dots_2x4's pass over a Qwen3 KV head's 528-4096
    positions on a 2-core Zen 3; each row's running maxima kept by the tile in four lanes); the odd row as there;
    best raised from those maxima once the pass is over."""
    rows, n, d = qs.shape[0], keys.shape[0], qs.shape[1]
    whole = n - n % KEYS_PER_PASS
    pairs = rows - rows % 2
    tops = lowest_tops(pairs)
    q_stride, k_stride, s_stride = row_strides(qs, keys, scores)
    for j in range(0, whole, KEYS_PER_PASS):
        prefetch_rows(keys, j + ahead, j + ahead + KEYS_PER_PASS)
        for a in range(0, pairs, 2):
            score_tile(qs, a * q_stride, q_stride, keys, j * k_stride, k_stride, d, scores, a * s_stride + j,
                       s_stride, tops, 4 * a)
        if rows % 2:
            a0, a1, a2, a3 = dots_1x4(qs[rows - 1], keys[j], keys[j + 1], keys[j + 2], keys[j + 3])
            store_scores(scores, best, rows - 1, j, a0, a1, a2, a3)
    raise_best(best, tops, pairs)
    score_keys_one_by_one(qs, keys, whole, scores, best)


# The pair pass of score_keys: folded tiles where the vector registers are 256 bits (LANES 8), dots_2x4 elsewhere;
# its four-row pass (16 lanes only): folded IR tiles (the 8-lane tiers never take it, nor compile the tile).
score_pair_pass = score_key_pair_tiles if LANES == 8 else score_key_pairs
score_quad_pass = score_key_quad_tiles if LANES == 16 else score_key_quads


@njit(nogil=True, cache=True, inline="always", fastmath={"contract", "reassoc"})
def score_keys_one_by_one(qs: np.ndarray, keys: np.ndarray, first: int, scores: np.ndarray, best: np.ndarray) -> None:
    """score_keys for the keys from `first` on (those after the last whole pass), one dot product at a time."""
    for j in range(first, keys.shape[0]):
        for a in range(qs.shape[0]):
            scores[a, j] = dot(qs[a], keys[j])
            best[a] = max(best[a], scores[a, j])


@njit(nogil=True, cache=True, inline="always", fastmath={"contract", "reassoc"})
def score_keys(qs: np.ndarray, keys: np.ndarray, scores: np.ndarray, best: np.ndarray, ahead: int) -> None:
    """scores[a, j] = qs[a] . keys[j] for the query rows qs [rows, d] and keys [n, d]; best[a] raised to the
    largest score of row a; the keys `ahead` rows on prefetched. The rows in fours (score_quad_pass: folded IR
    tiles where d is a multiple of 16, else score_key_quads), the two or three left over in a second pass over the
    keys (score_key_pairs): one loop handling both measured as slow as two rows at a time throughout (LLVM's code
    for the four-row body suffers from the other's presence). On the 256-bit tiers all rows go in pairs: their 16
    vector registers cannot hold 16 accumulators (four rows measured 0.56-0.75x of two there); with d a multiple of
    8 the pairs are attend_simd.score_tile's (score_pair_pass)."""
    rows = qs.shape[0]
    quads = rows - rows % 4 if LANES == 16 else 0
    if quads and qs.shape[1] % LANES == 0:
        score_quad_pass(qs[:quads], keys, scores[:quads], best[:quads], ahead)
    elif quads:
        score_key_quads(qs[:quads], keys, scores[:quads], best[:quads], ahead)
    if rows > quads:
        if qs.shape[1] % SCORE_LANES == 0:
            score_pair_pass(qs[quads:], keys, scores[quads:], best[quads:], ahead)
        else:
            score_key_pairs(qs[quads:], keys, scores[quads:], best[quads:], ahead)


@njit(nogil=True, cache=True, inline="always", fastmath={"contract", "reassoc"})
def weigh_values(weights: np.ndarray, values: np.ndarray, acc: np.ndarray, ahead: int) -> None:
    """acc[a] = sum over j of weights[a, j] * values[j] for values [n, d], weights [rows, >= n], acc [rows, d]
    (rows contiguous). With d a multiple of the vector width: blocks of positions whose value rows (about
    WEIGH_BLOCK_BYTES) stay in L1 while two query rows at a time pass over them (attend_simd.weigh_tile), the next
    block prefetched in shares before each call (the whole next block at once measured up to 1.2x slower from
    DRAM); otherwise weigh_value_rows, the values `ahead` rows on prefetched."""
    rows, n, d = acc.shape[0], values.shape[0], acc.shape[1]
    acc[:] = 0.0
    if d % LANES:
        weigh_value_rows(weights, values, acc, ahead)
        return
    block = max(WEIGH_BLOCK_BYTES // (d * values.itemsize), 1)
    w_stride, v_stride = weights.strides[0] // weights.itemsize, values.strides[0] // values.itemsize
    a_stride = acc.strides[0] // acc.itemsize
    calls = max(-(-d // (WEIGH_CHUNKS * LANES)) * ((rows + 1) // 2), 1)  # weigh_tile calls per block
    share = -(-block // calls)  # rows of the next block prefetched before each of them
    prefetch_rows(values, 0, block)
    for p0 in range(0, n, block):
        call = 0
        for c0 in range(0, d, WEIGH_CHUNKS * LANES):
            chunks = min(WEIGH_CHUNKS, (d - c0) // LANES)
            for a in range(0, rows, 2):
                prefetch_rows(values, p0 + block + call * share, p0 + block + (call + 1) * share)
                call += 1
                weigh_tile(weights, a * w_stride + p0, w_stride, values, p0 * v_stride + c0, v_stride,
                           min(block, n - p0), acc, a * a_stride + c0, a_stride, min(2, rows - a), chunks)


@njit(nogil=True, cache=True, inline="always", fastmath={"contract", "reassoc"})
def weigh_value_rows(weights: np.ndarray, values: np.ndarray, acc: np.ndarray, ahead: int) -> None:
    """acc[a] += sum over j of weights[a, j] * values[j], for any d: eight value rows per pass over a query row's
    accumulators, then the value rows left over one at a time; the values `ahead` rows on prefetched."""
    rows, n = acc.shape[0], values.shape[0]
    whole = n - n % VALUES_PER_PASS
    for j in range(0, whole, VALUES_PER_PASS):
        prefetch_rows(values, j + ahead, j + ahead + VALUES_PER_PASS)
        v0, v1, v2, v3 = values[j], values[j + 1], values[j + 2], values[j + 3]
        v4, v5, v6, v7 = values[j + 4], values[j + 5], values[j + 6], values[j + 7]
        for a in range(rows):
            w = weights[a]
            p0, p1, p2, p3, p4, p5, p6, p7 = w[j], w[j + 1], w[j + 2], w[j + 3], w[j + 4], w[j + 5], w[j + 6], w[j + 7]
            acc_a = acc[a]
            for i in range(acc_a.size):
                acc_a[i] += (p0 * widen(v0, i) + p1 * widen(v1, i) + p2 * widen(v2, i) + p3 * widen(v3, i)
                             + p4 * widen(v4, i) + p5 * widen(v5, i) + p6 * widen(v6, i) + p7 * widen(v7, i))
    for j in range(whole, n):
        value = values[j]
        for a in range(rows):
            p = weights[a, j]
            acc_a = acc[a]
            for i in range(acc_a.size):
                acc_a[i] += p * widen(value, i)


@njit(nogil=True, cache=True, inline="always")
def first_seen(position: int, window: int, chunk: int) -> int:
    """The first cached position a query at `position` attends to: the last `window` positions only and those of
    its `chunk` only (0: no limit)."""
    lo = max(0, position + 1 - window) if window > 0 else 0
    return max(lo, position // chunk * chunk) if chunk > 0 else lo


@njit(nogil=True, cache=True, inline="always", fastmath={"contract", "reassoc"})
def score_tails(qs: np.ndarray, keys: np.ndarray, group: int, common: int, scores: np.ndarray,
                best: np.ndarray) -> None:
    """The keys past a run's common part: token i of the run (rows i*group.. of qs) also sees keys[common:common+i]
    (the causal triangle); scores and best as score_keys."""
    for r in range(qs.shape[0]):
        for j in range(common, common + r // group):
            scores[r, j] = dot(qs[r], keys[j])
            best[r] = max(best[r], scores[r, j])


@njit(nogil=True, cache=True, inline="always", fastmath={"contract", "reassoc"})
def weigh_tails(weights: np.ndarray, values: np.ndarray, group: int, common: int, acc: np.ndarray) -> None:
    """acc[r] += the weighted value rows past a run's common part (rows of token i: values[common:common+i])."""
    for r in range(acc.shape[0]):
        acc_r = acc[r]
        for j in range(common, common + r // group):
            p, value = weights[r, j], values[j]
            for i in range(acc_r.size):
                acc_r[i] += p * widen(value, i)


@njit(parallel=True, nogil=True, cache=True, fastmath={"contract", "reassoc"})
def attend(q: np.ndarray, heads: int, kv_heads: int, d: int, kcache: np.ndarray, vcache: np.ndarray, start: int,
           window: int, chunk: int, scale: float, sinks: np.ndarray, out: np.ndarray) -> None:
    """Causal grouped-query attention of q [T, heads*d] (positions start..) over the cached keys / values
    [kv_heads, P, d] (float32, or bf16 bits read through widen; positions 0..start+T-1 already written), optionally
    only the last `window` and only within the query's `chunk` of positions (0: no limit), with one sink logit per
    head in every softmax where sinks [heads] is not empty; out [T, heads*d]. One KV head per thread, its query
    heads together, and the consecutive tokens that see the same first position (a run: all T unless a window moves
    or a chunk starts) together too: each key and value row is read once per run for all of them (score_keys,
    weigh_values over the positions the whole run sees, score_tails, weigh_tails for the causal triangle after
    them). The softmax's division is applied to the d outputs of a head, not to its n weights."""
    T = q.shape[0]
    group = heads // kv_heads
    ahead = max(ATTEND_AHEAD_BYTES // (d * kcache.itemsize), 1)  # rows
    for g in prange(kv_heads):
        scores = np.empty((T * group, start + T), np.float32)  # [token x query head of the group, position - lo]
        qs = np.empty((T * group, d), np.float32)
        acc = np.empty((T * group, d), np.float32)
        best = np.empty(T * group, np.float32)  # each row's largest logit, its sink included
        inv = np.empty(T * group, np.float32)  # 1 / each row's softmax denominator
        keys, values = kcache[g], vcache[g]
        t0 = 0
        while t0 < T:  # one run of tokens t0..t1-1
            lo = first_seen(start + t0, window, chunk)
            t1 = t0 + 1
            while t1 < T and first_seen(start + t1, window, chunk) == lo:
                t1 += 1
            for t in range(t0, t1):
                for a in range(group):
                    r = t * group + a
                    best[r] = np.float32(sinks[g * group + a]) if sinks.size else np.float32(-np.inf)
                    for i in range(d):
                        qs[r, i] = q[t, (g * group + a) * d + i] * np.float32(scale)
            rows = slice(t0 * group, t1 * group)
            common = start + t0 + 1 - lo  # positions every token of the run sees
            run_keys, run_values = keys[lo: start + t1], values[lo: start + t1]
            prefetch_rows(run_keys, 0, ahead)  # the stream's start, then score_keys keeps ahead of itself
            score_keys(qs[rows], run_keys[:common], scores[rows], best[rows], ahead)
            score_tails(qs[rows], run_keys, group, common, scores[rows], best[rows])
            prefetch_rows(run_values, 0, ahead)  # arriving while the softmax runs
            for t in range(t0, t1):  # scores -> softmax numerators
                for a in range(group):
                    r = t * group + a
                    sink = np.float32(sinks[g * group + a]) if sinks.size else np.float32(-np.inf)
                    total = exp_shifted(scores[r], common + t - t0, best[r]) + np.float32(np.exp(sink - best[r]))
                    inv[r] = np.float32(1.0) / total
            weigh_values(scores[rows], run_values[:common], acc[rows], ahead)
            weigh_tails(scores[rows], run_values, group, common, acc[rows])
            for t in range(t0, t1):
                for a in range(group):
                    r = t * group + a
                    o = out[t, (g * group + a) * d: (g * group + a + 1) * d]
                    for i in range(d):
                        o[i] = acc[r, i] * inv[r]
            t0 = t1


LATENT_QUAD = 4  # spans of the attended positions are whole quads of them
LATENT_CHUNK = 32  # cached positions per online-softmax step: their latents (64 KiB) stay in L1/L2 for both uses
LATENT_SPANS = 4  # spans the attended positions are cut into (flash-decoding), whatever the thread count
LATENT_SPAN_MIN = 16  # fewest positions per span
LATENT_AHEAD_BYTES = 8192  # how far ahead in a weight stream (W_UK, W_UV rows) the software prefetch runs


@njit(nogil=True, cache=True)
def latent_span(n_max: int) -> int:
    """Positions per span of latent_attend's split of the attended positions: about n_max / LATENT_SPANS, a whole
    number of quads, at least LATENT_SPAN_MIN. A function of the positions alone, so the split (and with it the
    float32 summation order) does not depend on the thread count."""
    span = (n_max + LATENT_SPANS - 1) // LATENT_SPANS
    span = (span + LATENT_QUAD - 1) // LATENT_QUAD * LATENT_QUAD
    return max(span, LATENT_SPAN_MIN)


@njit(nogil=True, cache=True, fastmath={"contract", "reassoc"})
def latent_query(q: np.ndarray, h: int, heads: int, nope: int, w_kv: np.ndarray, q_lat: np.ndarray,
                 q_rope: np.ndarray) -> None:
    """q_lat[t, h] [rank] = head h's q_nope through its W_UK (w_kv[h, :nope]), q_rope[t, h] [rope] its rope part,
    for q_lat [T, padded heads, rank] (zeros for a padding head h >= heads). Four W_UK rows per pass over
    q_lat[t, h], each row read once for all T queries, LATENT_AHEAD_BYTES of the rows prefetched ahead."""
    T, rank = q_lat.shape[0], q_lat.shape[2]
    rope_d = q_rope.shape[2]
    qd = nope + rope_d
    for t in range(T):
        q_lat[t, h] = 0.0
        q_rope[t, h] = 0.0
    if h >= heads:
        return
    w = w_kv[h]
    ahead = max(LATENT_AHEAD_BYTES // (rank * w_kv.itemsize), 1)
    for t in range(T):
        q_rope[t, h] = q[t, h * qd + nope: h * qd + qd]
    i = 0
    while i + 4 <= nope:
        for j in range(i + ahead, min(i + ahead + 4, nope)):
            prefetch_rows(w, j, j + 1)
        w0, w1, w2, w3 = w[i], w[i + 1], w[i + 2], w[i + 3]
        for t in range(T):
            x0, x1, x2, x3 = q[t, h * qd + i], q[t, h * qd + i + 1], q[t, h * qd + i + 2], q[t, h * qd + i + 3]
            acc = q_lat[t, h]
            for r in range(rank):
                acc[r] += (x0 * widen(w0, r) + x1 * widen(w1, r)) + (x2 * widen(w2, r) + x3 * widen(w3, r))
        i += 4
    for i in range(i, nope):
        w0 = w[i]
        for t in range(T):
            x0 = q[t, h * qd + i]
            acc = q_lat[t, h]
            for r in range(rank):
                acc[r] += x0 * widen(w0, r)


@njit(nogil=True, cache=True)
def latent_positions(selection: np.ndarray, selected: int, start: int, n: np.ndarray, idx: np.ndarray) -> int:
    """n[t] = the number of positions query t (at start + t) attends: with a selection (selected > 0) its selected
    positions up to itself, in idx[t, :n[t]] (latent_selected_positions), without one all of 0..start+t; the most."""
    for t in range(n.size):
        hi = start + t + 1
        n[t] = latent_selected_positions(selection, selected, t, hi, idx[t]) if selected > 0 else hi
    return n.max()


@njit(nogil=True, cache=True)
def latent_selected_positions(selection: np.ndarray, selected: int, t: int, hi: int, idx: np.ndarray) -> int:
    """idx[:n] = the positions of selection[t, :selected] that query t may attend (below hi), in order; n."""
    n = 0
    for i in range(selected):
        j = selection[t, i]
        if j < hi:
            idx[n] = j
            n += 1
    return n


@njit(nogil=True, cache=True)
def latent_transposed_queries(q_lat: np.ndarray, q_rope: np.ndarray, scale: float) -> np.ndarray:
    """qt [blocks, T, rank + rope, HEADS_LANES]: scale times the latent queries q_lat [T, blocks * HEADS_LANES, rank]
    with their rope parts q_rope [T, blocks * HEADS_LANES, rope] after them, each block's heads in the last axis
    (csrc_py.latent_simd's layout)."""
    T, padded, rank = q_lat.shape
    rope_d = q_rope.shape[2]
    blocks = padded // HEADS_LANES
    qt = np.empty((blocks, T, rank + rope_d, HEADS_LANES), np.float32)
    sc = np.float32(scale)
    for b in range(blocks):
        for t in range(T):
            for a in range(HEADS_LANES):
                h = b * HEADS_LANES + a
                for i in range(rank):
                    qt[b, t, i, a] = sc * q_lat[t, h, i]
                for i in range(rope_d):
                    qt[b, t, rank + i, a] = sc * q_rope[t, h, i]
    return qt


@njit(nogil=True, cache=True, inline="always")
def latent_new_maxima(best: np.ndarray, tops: np.ndarray, total: np.ndarray, shrink: np.ndarray) -> bool:
    """Where a head's running maximum rose (tops[a] > best[a]): shrink[a] = exp(best[a] - tops[a]) (0 on the first
    step: best -inf), total[a] scaled by it and best[a] raised; elsewhere shrink[a] = 1. Whether any rose (its
    running latent sums then need the same scaling: latent_weigh_tile's rescale)."""
    rose = False
    for a in range(HEADS_LANES):
        up = tops[a] > best[a]
        shrink[a] = np.float32(np.exp(best[a] - tops[a])) if up else np.float32(1.0)
        best[a] = tops[a] if up else best[a]
        total[a] *= shrink[a]
        rose |= up
    return rose


@njit(nogil=True, cache=True, inline="always", fastmath={"contract"})
def exp_lanes(s: np.ndarray, n: int, best: np.ndarray, total: np.ndarray) -> None:
    """s[16k + a] = exp(s[16k + a] - best[a]) in place for the n positions k of a chunk's scores (a position's
    HEADS_LANES heads side by side), best[a] >= every s of head a; total[a] += head a's, in position order."""
    for k in range(n):
        for a in range(HEADS_LANES):
            s[k * HEADS_LANES + a] = exp_nonpositive(s[k * HEADS_LANES + a] - best[a])
            total[a] += s[k * HEADS_LANES + a]


@njit(nogil=True, cache=True, fastmath={"contract", "reassoc"})
def latent_values(o_lat: np.ndarray, total: np.ndarray, h0: int, hb: int, nope: int, w_kv: np.ndarray,
                  out: np.ndarray) -> None:
    """out[t, h*v: (h+1)*v] = W_UV (w_kv[h, nope:]) @ o_lat[t, a] / total[t, a] for the heads h = h0 + a, a < hb;
    each W_UV row read once for all T queries, LATENT_AHEAD_BYTES of the rows prefetched ahead."""
    T, rank = o_lat.shape[0], o_lat.shape[2]
    v_dim = w_kv.shape[1] - nope
    ahead = max(LATENT_AHEAD_BYTES // (rank * w_kv.itemsize), 1)
    for t in range(T):
        for a in range(hb):
            inv = np.float32(1.0) / total[t, a]
            o = o_lat[t, a]
            for r in range(rank):
                o[r] *= inv
    for a in range(hb):
        h = h0 + a
        w = w_kv[h]
        for i in range(v_dim):
            if i + ahead < v_dim:
                prefetch_rows(w, nope + i + ahead, nope + i + ahead + 1)
            wrow = w[nope + i]
            for t in range(T):
                o = o_lat[t, a]
                acc = np.float32(0.0)
                for r in range(rank):
                    acc += o[r] * widen(wrow, r)
                out[t, h * v_dim + i] = acc


@njit(nogil=True, cache=True, fastmath={"contract", "reassoc"})
def latent_partial(qt: np.ndarray, c_cache: np.ndarray, r_cache: np.ndarray, k0: int, k1: int, n: np.ndarray,
                   idx: np.ndarray, selected: int, best: np.ndarray, total: np.ndarray, o_part: np.ndarray) -> None:
    """One span's online softmax for one block of HEADS_LANES heads, qt [T, rank + rope, HEADS_LANES] their scaled
    queries (latent_transposed_queries): each query t over its attended positions k0 <= k < min(k1, n[t]) (the
    positions idx[t, k] with a selection, k without), in chunks of LATENT_CHUNK: best, total [T, HEADS_LANES]
    (running maximum and sum), o_part [T, rank, HEADS_LANES] (the exp-weighted sum of the latents, relative to
    best). Prefetches each query's next chunk (past the span: the thread's next span is usually the next one)."""
    T = best.shape[0]
    o_part[:] = 0.0
    best[:] = -np.inf
    total[:] = 0.0
    n_max = n.max()
    offsets = np.arange(2 * LATENT_CHUNK)  # a chunk's and the next one's positions from its first, without a selection
    none = offsets[:0]
    s = np.empty(LATENT_CHUNK * HEADS_LANES, np.float32)  # a chunk's scores, then their exps: position-major
    tops = np.empty(HEADS_LANES, np.float32)
    shrink = np.empty(HEADS_LANES, np.float32)
    for c0 in range(k0, k1, LATENT_CHUNK):
        for t in range(T):
            c1 = min(c0 + LATENT_CHUNK, n[t], k1)
            if c1 <= c0:
                continue
            if selected > 0:  # each query its own positions: its next chunk (past this span too)
                base, chunk = 0, idx[t, c0: c1]
                ahead = idx[t, c1: min(c1 + LATENT_CHUNK, n[t])]
            else:  # the queries' positions are the same: the next chunk prefetched once
                base, chunk = c0, offsets[: c1 - c0]
                ahead = offsets[LATENT_CHUNK: LATENT_CHUNK + max(min(LATENT_CHUNK, n_max - c0 - LATENT_CHUNK), 0)] \
                    if t == 0 else none
            m = c1 - c0
            tops[:] = best[t]
            for k in range(0, m, LATENT_TILE):
                for i in range(k, min(k + LATENT_TILE, ahead.size)):
                    prefetch_rows(c_cache, base + ahead[i], base + ahead[i] + 1)
                    prefetch_rows(r_cache, base + ahead[i], base + ahead[i] + 1)
                latent_score_tile(qt[t], 0, c_cache, r_cache, base, chunk, k, min(LATENT_TILE, m - k), s,
                                  k * HEADS_LANES, tops)
            rescale = latent_new_maxima(best[t], tops, total[t], shrink)
            exp_lanes(s, m, best[t], total[t])
            for k in range(0, m, LATENT_TILE):
                latent_weigh_tile(s, k * HEADS_LANES, c_cache, base, chunk, k, min(LATENT_TILE, m - k), o_part[t],
                                  shrink, rescale and k == 0)


@njit(nogil=True, cache=True, fastmath={"contract", "reassoc"})
def latent_merge(best: np.ndarray, total: np.ndarray, o_part: np.ndarray, heads: int, o_lat: np.ndarray,
                 sums: np.ndarray) -> None:
    """o_lat[h, t, 0] = sum over spans of exp(best - m) * o_part[b, span, t, :, a], sums[h, t, 0] = sum of
    exp(best - m) * total, m the largest best, for the heads h = b * HEADS_LANES + a < heads (flash-decoding's
    merge of partial softmaxes, spans in order, a block's heads in vector lanes); best, total [blocks, spans, T,
    HEADS_LANES], o_part [blocks, spans, T, rank, HEADS_LANES], o_lat [heads, T, 1, rank]; a span a query does not
    reach adds nothing."""
    blocks, spans, T = best.shape[0], best.shape[1], best.shape[2]
    rank = o_part.shape[3]
    f = np.empty((spans, HEADS_LANES), np.float32)
    acc = np.empty((rank, HEADS_LANES), np.float32)
    tot = np.empty(HEADS_LANES, np.float32)
    for b in range(blocks):
        for t in range(T):
            for a in range(HEADS_LANES):
                m = np.float32(-np.inf)
                for sp in range(spans):
                    m = max(m, best[b, sp, t, a])
                for sp in range(spans):
                    reached = best[b, sp, t, a] > -np.inf
                    f[sp, a] = np.float32(np.exp(best[b, sp, t, a] - m)) if reached else np.float32(0.0)
            acc[:] = 0.0
            tot[:] = 0.0
            for sp in range(spans):
                lanes_fma(acc, o_part[b, sp, t], f[sp])
                for a in range(HEADS_LANES):
                    tot[a] += f[sp, a] * total[b, sp, t, a]
            for a in range(min(HEADS_LANES, heads - b * HEADS_LANES)):
                h = b * HEADS_LANES + a
                sums[h, t, 0] = tot[a]
                for i in range(rank):
                    o_lat[h, t, 0, i] = acc[i, a]


@njit(parallel=True, nogil=True, cache=True, fastmath={"contract", "reassoc"})
def latent_attend(q: np.ndarray, heads: int, nope: int, w_kv: np.ndarray, c_cache: np.ndarray, r_cache: np.ndarray,
                  start: int, scale: float, selection: np.ndarray, selected: int, out: np.ndarray) -> None:
    """MLA's absorbed attention (offload.model.mla.MLA._absorbed) for q [T, heads*(nope+rope)] at positions
    start..: per head, q_nope through W_UK into latent space, causal attention over the cached latents
    c_cache [P, rank] (keys: latent + rope key r_cache [P, rope]; values: latent; either cache float32 or bf16
    bits), the result through W_UV;
    out [T, heads*v]. w_kv is kv_b_proj's weight as [heads, nope + v, rank] (W_UK rows, then W_UV rows), float32
    or bf16 bits: whole contiguous rows, which vectorize where the strided W_UK / W_UV views would not. With
    selected > 0 each query attends only to the positions selection[t, :selected] (DeepSeek Sparse Attention,
    MLA._absorbed_selected; later positions than the query skipped).

    Three parallel stages, for inputs that come from DRAM (a decode step's previous layer evicted them):
    1. the heads' latent queries (latent_query), the W_UK rows split over the threads;
    2. latent_spans: the softmax over the cached latents, by spans of positions, the heads in vector lanes;
    3. the spans' partials merged in order (latent_merge, serial), then per head through W_UV (latent_values).
    Every split is a function of the shapes alone: the numbers do not depend on the thread count."""
    T = q.shape[0]
    rank, rope_d = c_cache.shape[1], r_cache.shape[1]
    padded = latent_blocks(heads) * HEADS_LANES
    q_lat = np.empty((T, padded, rank), np.float32)  # the padding heads' rows zeroed by latent_query
    q_rope = np.empty((T, padded, rope_d), np.float32)
    for h in prange(padded):
        latent_query(q, h, heads, nope, w_kv, q_lat, q_rope)
    qt = latent_transposed_queries(q_lat, q_rope, scale)
    best, total, o_part = latent_spans(qt, c_cache, r_cache, start, selection, selected)
    o_lat = np.empty((heads, T, 1, rank), np.float32)  # each head's merged latent and softmax sum
    sums = np.empty((heads, T, 1), np.float32)
    latent_merge(best, total, o_part, heads, o_lat, sums)
    for h in prange(heads):
        latent_values(o_lat[h], sums[h], h, 1, nope, w_kv, out)


# latent_attend_packed's copies between the token-major and the head-major layouts live in serial functions of
# their own: in a parallel=True function Numba turns every slice assignment and np.zeros outside a prange into a
# parallel region (~60 a call at DeepSeek-V2-Lite's 16 heads, 40-80 us of its ~250-450).


@njit(nogil=True, cache=True)
def q_nope_rows(q: np.ndarray, heads: int, nope: int, rope_d: int) -> np.ndarray:
    """The heads' q_nope parts of q [T, heads*(nope+rope)] as rows [heads*T, nope], head-major."""
    T, qd = q.shape[0], nope + rope_d
    rows = np.empty((heads * T, nope), np.float32)
    for h in range(heads):
        for t in range(T):
            rows[h * T + t] = q[t, h * qd: h * qd + nope]
    return rows


@njit(nogil=True, cache=True)
def latent_queries_of_rows(lat: np.ndarray, q: np.ndarray, heads: int, nope: int, q_lat: np.ndarray,
                           q_rope: np.ndarray) -> None:
    """q_lat [T, padded heads, rank] from the head-major W_UK products lat [heads*T, >= rank] and q_rope
    [T, padded heads, rope] from q's rope parts; zeros for the padding heads."""
    T, rank = q_lat.shape[0], q_lat.shape[2]
    qd = nope + q_rope.shape[2]
    q_lat[:, heads:] = 0.0
    q_rope[:, heads:] = 0.0
    for h in range(heads):
        for t in range(T):
            q_lat[t, h] = lat[h * T + t, :rank]
            q_rope[t, h] = q[t, h * qd + nope: h * qd + qd]


@njit(nogil=True, cache=True)
def heads_to_tokens(rows: np.ndarray, heads: int, out: np.ndarray) -> None:
    """out [T, heads*v] from head-major rows [heads*T, >= v]."""
    T = out.shape[0]
    v = out.shape[1] // heads
    for h in range(heads):
        for t in range(T):
            out[t, h * v: (h + 1) * v] = rows[h * T + t, :v]


@njit(nogil=True, cache=True, fastmath={"contract", "reassoc"})
def latent_attend_packed(q: np.ndarray, heads: int, nope: int, k_b: tuple, v_b: tuple, c_cache: np.ndarray,
                         r_cache: np.ndarray, start: int, scale: float, selection: np.ndarray, selected: int,
                         out: np.ndarray) -> None:
    """latent_attend with W_UK and W_UV packed per head (int8 / int4 / int4s; offload.model.mla.pack_absorbed):
    k_b [heads, rank, nope] and v_b [heads, v, rank] as (q, d, m) tuples. The two products are per-head GEMVs, each
    one grouped kernel call over every head (activations quantized per 32, as every packed matmul); between them
    the same softmax over the cached latents (latent_spans) and merge."""
    T = q.shape[0]
    rank, rope_d = c_cache.shape[1], r_cache.shape[1]
    padded = latent_blocks(heads) * HEADS_LANES
    rows = q_nope_rows(q, heads, nope, rope_d)
    lat = np.empty((heads * T, k_b[1].shape[1] * k_b[1].shape[3]), np.float32)  # [heads*T, panels * 16 >= rank]
    packed_linear(rows, k_b, lat)
    q_lat = np.empty((T, padded, rank), np.float32)
    q_rope = np.empty((T, padded, rope_d), np.float32)
    latent_queries_of_rows(lat, q, heads, nope, q_lat, q_rope)
    qt = latent_transposed_queries(q_lat, q_rope, scale)
    best, total, o_part = latent_spans(qt, c_cache, r_cache, start, selection, selected)
    o_lat = np.empty((heads, T, 1, rank), np.float32)
    sums = np.empty((heads, T, 1), np.float32)
    latent_merge(best, total, o_part, heads, o_lat, sums)
    o_rows = latent_rows_over_sums(o_lat, sums)
    o_out = np.empty((heads * T, v_b[1].shape[1] * v_b[1].shape[3]), np.float32)  # [heads*T, panels * 16 >= v]
    packed_linear(o_rows, v_b, o_out)
    heads_to_tokens(o_out, heads, out)


@njit(nogil=True, cache=True)
def latent_rows_over_sums(o_lat: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """The merged latents o_lat [heads, T, 1, rank] over their softmax sums [heads, T, 1], as head-major rows
    [heads*T, rank]."""
    heads, T, rank = o_lat.shape[0], o_lat.shape[1], o_lat.shape[3]
    rows = np.empty((heads * T, rank), np.float32)
    for h in range(heads):
        for t in range(T):
            inv = np.float32(1.0) / sums[h, t, 0]
            for r in range(rank):
                rows[h * T + t, r] = o_lat[h, t, 0, r] * inv
    return rows


@njit(nogil=True, cache=True)
def latent_blocks(heads: int) -> int:
    """Blocks of HEADS_LANES heads the softmax over the cached latents takes the heads in (zero heads pad the
    last)."""
    return (heads + HEADS_LANES - 1) // HEADS_LANES


@njit(parallel=True, nogil=True, cache=True, fastmath={"contract", "reassoc"})
def latent_spans(qt: np.ndarray, c_cache: np.ndarray, r_cache: np.ndarray, start: int, selection: np.ndarray,
                 selected: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flash-decoding over the cached latents for the scaled latent queries qt [blocks, T, rank + rope,
    HEADS_LANES] (latent_transposed_queries): the attended positions cut into spans (latent_span: LATENT_SPANS of
    them, whatever the thread count), one online softmax (latent_partial) per span and block of heads, so each
    cached latent is read from memory once per block in all, not once per thread, each chunk's successor
    prefetched while it computes. Returns the partials best, total [blocks, spans, T, HEADS_LANES] and o_part
    [blocks, spans, T, rank, HEADS_LANES]."""
    blocks, T = qt.shape[0], qt.shape[1]
    rank = c_cache.shape[1]
    n = np.empty(T, np.int64)  # positions each query attends: in idx[t] with a selection, 0.. without
    idx = np.empty((T, max(selected, 0)), np.int64)
    n_max = latent_positions(selection, selected, start, n, idx)
    span = latent_span(n_max)
    spans = (n_max + span - 1) // span
    best = np.empty((blocks, spans, T, HEADS_LANES), np.float32)
    total = np.empty((blocks, spans, T, HEADS_LANES), np.float32)
    o_part = np.empty((blocks, spans, T, rank, HEADS_LANES), np.float32)
    for item in prange(blocks * spans):
        b, sp = item // spans, item % spans
        latent_partial(qt[b], c_cache, r_cache, sp * span, (sp + 1) * span, n, idx, selected, best[b, sp],
                       total[b, sp], o_part[b, sp])
    return best, total, o_part


def absorbed_attend(q, heads, nope, w, c_cache, r_cache, start, scale, selection, selected, out):
    """MLA's absorbed attention: latent_attend for kv_b_proj's weight as one array w [heads, nope + v, rank],
    latent_attend_packed for (k_b, v_b) packed per head."""
    raise NotImplementedError("compiled code only")


@overload(absorbed_attend)
def _absorbed_attend(q, heads, nope, w, c_cache, r_cache, start, scale, selection, selected, out):
    if isinstance(w, types.Array):
        def impl(q, heads, nope, w, c_cache, r_cache, start, scale, selection, selected, out):
            latent_attend(q, heads, nope, w, c_cache, r_cache, start, scale, selection, selected, out)
    else:
        def impl(q, heads, nope, w, c_cache, r_cache, start, scale, selection, selected, out):
            latent_attend_packed(q, heads, nope, w[0], w[1], c_cache, r_cache, start, scale, selection, selected,
                                 out)
    return impl


@njit(nogil=True, cache=True)
def route(logits: np.ndarray, top_k: int, scoring: int, groups: int, n_group: int, topk_group: int, norm: bool,
          scaling: float, norm_min: float, correction_bias: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> None:
    """offload.model.routing.route for logits float32 [T, E] -> ids int64 [T, K], weights float32 [T, K].

    scoring SOFTMAX | SIGMOID; groups GROUPS_NONE | GROUPS_MAX (rank groups by their best score; softmax) |
    GROUPS_TOP2_SUM (by the sum of their two best choices; sigmoid); correction_bias [E] or empty (steers the
    choice, not the weights); softmax weights are normalised by their sum clamped from below at norm_min."""
    T, E = logits.shape
    scores = np.empty(E, np.float32)
    choice = np.empty(E, np.float32)
    per_group = E // max(n_group, 1)
    group_rank = np.empty(max(n_group, 1), np.float32)
    for t in range(T):
        row = logits[t]
        if scoring == SIGMOID:
            for e in range(E):
                scores[e] = np.float32(1.0) / (np.float32(1.0) + np.exp(-row[e]))
                choice[e] = scores[e] + correction_bias[e] if correction_bias.size else scores[e]
        else:
            best = row.max()
            total = np.float32(0.0)
            for e in range(E):
                scores[e] = np.exp(row[e] - best)
                total += scores[e]
            for e in range(E):
                scores[e] /= total
                choice[e] = scores[e]  # the selection bias joins after the groups are ranked
        if groups != GROUPS_NONE and n_group > 1:
            for g in range(n_group):
                seg = choice[g * per_group: (g + 1) * per_group]
                if groups == GROUPS_MAX:
                    group_rank[g] = seg.max()
                else:
                    first = np.argmax(seg)
                    second = -np.inf
                    for i in range(per_group):
                        if i != first:
                            second = max(second, seg[i])
                    group_rank[g] = seg[first] + second
            kept = np.argsort(-group_rank)[:topk_group]
            dropped = np.float32(-np.inf) if groups == GROUPS_TOP2_SUM else np.float32(0.0)
            for g in range(n_group):
                if not (kept == g).any():
                    choice[g * per_group: (g + 1) * per_group] = dropped
        if scoring == SOFTMAX:  # the weights are the scores left after the group mask
            for e in range(E):
                scores[e] = choice[e]
                if correction_bias.size:
                    choice[e] += correction_bias[e]
        order = np.argsort(-choice, kind="mergesort")[:top_k]
        total = np.float32(0.0)
        for k in range(top_k):
            ids[t, k] = order[k]
            weights[t, k] = scores[order[k]]
            total += weights[t, k]
        if norm:
            denom = total + np.float32(1e-20) if scoring == SIGMOID else max(total, np.float32(norm_min))
            for k in range(top_k):
                weights[t, k] /= denom
        for k in range(top_k):
            weights[t, k] *= np.float32(scaling)


# Router weights (experts x hidden values) from which the decode threads share the logits. Cold, two threads
# against one (tools/bench_router.py on the Intel host): DeepSeek-V2-Lite's 64 x 2048 1.34x, Qwen3-30B-A3B's
# 128 x 2048 1.32x, DeepSeek-V3's 256 x 7168 1.26x; Mixtral's 8 x 4096 stays on one thread.
ROUTER_PARALLEL_MIN = 1 << 17


@njit(nogil=True, cache=True, inline="always", fastmath={"contract", "reassoc"})
def _router_logit(h: np.ndarray, router: np.ndarray, bias: np.ndarray, logits: np.ndarray, t: int, e: int) -> None:
    x, w = h[t], router[e]
    acc = np.float32(0.0)
    for i in range(x.size):
        acc += x[i] * widen(w, i)
    logits[t, e] = acc + bias[e] if bias.size else acc


@njit(parallel=True, nogil=True, cache=True, fastmath={"contract", "reassoc"})
def _router_logits_parallel(h: np.ndarray, router: np.ndarray, bias: np.ndarray, logits: np.ndarray) -> None:
    for e in prange(router.shape[0]):
        for t in range(h.shape[0]):
            _router_logit(h, router, bias, logits, t, e)


@njit(nogil=True, cache=True, fastmath={"contract", "reassoc"})
def router_logits(h: np.ndarray, router: np.ndarray, bias: np.ndarray, logits: np.ndarray) -> None:
    """logits [T, E] = h [T, H] @ router [E, H].T (+ bias [E] unless empty) in float32; router float32 or bf16
    bits (a bf16 checkpoint's router, exact in half the bytes). A router of ROUTER_PARALLEL_MIN values or more is
    split over the threads by expert; every logit is the same sum in the same order either way."""
    if router.size >= ROUTER_PARALLEL_MIN:
        _router_logits_parallel(h, router, bias, logits)
        return
    for t in range(h.shape[0]):
        for e in range(router.shape[0]):
            _router_logit(h, router, bias, logits, t, e)


@njit(nogil=True, cache=True, fastmath={"contract", "afn", "arcp", "reassoc"}, error_model="numpy")
def silu_mul(g: np.ndarray, u: np.ndarray, out: np.ndarray) -> None:
    """out = silu(g) * u, elementwise over [T, I] views."""
    for t in range(g.shape[0]):
        for i in range(g.shape[1]):
            out[t, i] = g[t, i] / (np.float32(1.0) + exp_f32(-g[t, i])) * u[t, i]


@njit(nogil=True, cache=True)
def add_bias(y: np.ndarray, bias: np.ndarray) -> None:
    """y[:, :bias.size] += bias (nothing for an empty bias)."""
    for t in range(y.shape[0]):
        for i in range(bias.size):
            y[t, i] += bias[i]


@njit(nogil=True, cache=True, fastmath={"contract", "afn", "arcp", "reassoc"})
def short_conv(v: np.ndarray, w: np.ndarray, window: np.ndarray) -> None:
    """One position through Gated DeltaNet's causal depthwise convolution and SiLU, in place: v [C] (the new
    inputs) <- silu(sum_j window[c, j] w[c, j] + v[c] w[c, -1]) with w [C, kernel] and window [C, kernel-1] the
    previous inputs, which then shift by one to take v's (GatedDeltaNet.conv for one token)."""
    C, past = window.shape
    for c in range(C):
        new = v[c]
        acc = new * w[c, past]
        for j in range(past):
            acc += window[c, j] * w[c, j]
        for j in range(past - 1):
            window[c, j] = window[c, j + 1]
        if past > 0:
            window[c, past - 1] = new
        v[c] = acc / (np.float32(1.0) + np.exp(-acc))


@njit(nogil=True, cache=True)
def l2_normalise_heads(v: np.ndarray, heads: int, d: int, eps: float, scale: float) -> None:
    """Each of `heads` slices of width d of v [>= heads*d] <- slice / sqrt(|slice|^2 + eps) * scale, in place
    (offload.model.gated_deltanet.l2norm on q and k)."""
    for h in range(heads):
        seg = v[h * d: h * d + d]
        acc = np.float32(0.0)
        for i in range(d):
            acc += seg[i] * seg[i]
        r = np.float32(1.0) / np.sqrt(acc + np.float32(eps))
        for i in range(d):
            seg[i] = seg[i] * r * np.float32(scale)


@njit(parallel=True, nogil=True, cache=True, fastmath={"contract", "reassoc"})
def gated_delta_step(qkv: np.ndarray, z: np.ndarray, b: np.ndarray, a: np.ndarray, dims, neg_A: np.ndarray,
                     dt_bias: np.ndarray, state: np.ndarray, norm_w: np.ndarray, eps: float, delta: np.ndarray,
                     out: np.ndarray) -> None:
    """One position of the gated delta rule on every value head's state [Hv, dk, dv], in place, then the gated
    RMSNorm: out [Hv*dv] = RMSNorm(S^T q) * norm_w * silu(z) per head (offload.model.gated_deltanet's
    recurrent_gated_delta_rule and gated_rms_norm for one token).

    qkv [2*Hk*dk + Hv*dv]: the convolved q (normalised and scaled), k (normalised), v; z [Hv*dv]; b, a [Hv];
    dims = (Hk, Hv, dk, dv), value head h reading key head h // (Hv/Hk); delta [Hv, dv] scratch. Two passes over
    each state: decay and S^T k, then the update and S^T q. One value head per thread."""
    k_heads, v_heads, dk, dv = dims
    group = v_heads // k_heads
    k0, v0 = k_heads * dk, 2 * k_heads * dk
    for hv in prange(v_heads):
        kh = hv // group
        q, k = qkv[kh * dk: kh * dk + dk], qkv[k0 + kh * dk: k0 + kh * dk + dk]
        v = qkv[v0 + hv * dv: v0 + hv * dv + dv]
        x = a[hv] + dt_bias[hv]
        softplus = x if x > np.float32(20.0) else np.float32(np.log1p(np.exp(x)))
        decay = np.float32(np.exp(neg_A[hv] * softplus))
        beta = np.float32(1.0) / (np.float32(1.0) + np.exp(-b[hv]))
        S, d, o = state[hv], delta[hv], out[hv * dv: hv * dv + dv]
        d[:] = 0.0
        for i in range(dk):
            row = S[i]
            for j in range(dv):
                row[j] *= decay
                d[j] += k[i] * row[j]
        for j in range(dv):
            d[j] = (v[j] - d[j]) * beta
        o[:] = 0.0
        for i in range(dk):
            row = S[i]
            for j in range(dv):
                row[j] += k[i] * d[j]
                o[j] += q[i] * row[j]
        acc = np.float32(0.0)
        for j in range(dv):
            acc += o[j] * o[j]
        r = np.float32(1.0) / np.sqrt(acc / dv + np.float32(eps))
        zs = z[hv * dv: hv * dv + dv]
        for j in range(dv):
            o[j] = norm_w[j] * (o[j] * r) * (zs[j] / (np.float32(1.0) + np.exp(-zs[j])))


# ---------------------------------------------------------------- blocks


@njit(nogil=True, cache=True)
def swiglu(h: np.ndarray, mlp, dims, gu: np.ndarray, act: np.ndarray, y: np.ndarray) -> None:
    """y[:, :padded] = down(silu(gate h) * up h) with gate/up fused in one packed matrix; offload.model.layers.SwiGLU
    over a FusedLinear. mlp = (gate_up packed, its bias [gate+up] or empty, down packed, its bias [H] or empty);
    dims = (up_start: the column where up starts, width); scratch gu [T, padded gate+up], act [T, width]."""
    gate_up, gate_up_bias, down, down_bias = mlp
    up_start, width = dims
    packed_linear(h, gate_up, gu)
    add_bias(gu, gate_up_bias)
    silu_mul(gu[:, :width], gu[:, up_start: up_start + width], act)
    packed_linear(act, down, y)
    add_bias(y, down_bias)


@njit(nogil=True, cache=True)
def add_rows(x: np.ndarray, y: np.ndarray, out: np.ndarray) -> None:
    """out = x + y over x's columns (y may be panel-padded wider): a block's residual."""
    for t in range(x.shape[0]):
        for i in range(x.shape[1]):
            out[t, i] = x[t, i] + y[t, i]


@njit(nogil=True, cache=True)
def split_gate(qkv_out: np.ndarray, q0: int, heads: int, d: int, qg: np.ndarray) -> None:
    """Qwen3-Next's gated query: each head's query then its gate, from column q0 of qkv_out [T, ...], into
    qg [T, 2*heads*d] as all the queries, then all the gates."""
    for t in range(qkv_out.shape[0]):
        for h in range(heads):
            src = q0 + 2 * h * d
            for i in range(d):
                qg[t, h * d + i] = qkv_out[t, src + i]
                qg[t, (heads + h) * d + i] = qkv_out[t, src + d + i]


@njit(nogil=True, cache=True, fastmath={"contract", "afn", "arcp", "reassoc"}, error_model="numpy")
def mul_sigmoid(v: np.ndarray, gate: np.ndarray) -> None:
    """v *= sigmoid(gate), elementwise over [T, D] views (the output gate)."""
    for t in range(v.shape[0]):
        for i in range(v.shape[1]):
            v[t, i] *= np.float32(1.0) / (np.float32(1.0) + exp_f32(-gate[t, i]))


@njit(nogil=True, cache=True)
def attention_block(x, out, norm_w, eps, qkv, qkv_bias, dims, flags, q_norm_w, k_norm_w, q_scale, clip_qkv, cos, sin,
                    start, kcache, vcache, span, scale, sinks, o_proj, o_bias, h, qkv_out, qg, att, o_out) -> None:
    """out = x + Attention(RMSNorm(x)) for x [T, H] at positions start.. (offload.model.attention.Attention).

    dims = (heads, kv_heads, head_dim, q_start, k_start, v_start): the column where each part of the fused
    q/k/v output starts. flags = (qk_norm: QK_NORM_*, q/k norm after RoPE, interleaved RoPE, output gate, RoPE
    applies). q_scale = (L2 q/k norm eps, 0: none; query temperature floor_scale, 0: none; its attn_scale).
    span = (sliding window, attention chunk; 0: none). sinks [heads] or empty. Scratch: h [T, H], qkv_out
    [T, padded qkv width], qg [T, 2*heads*head_dim] with the output gate (else [T, 0]), att [T, heads*head_dim],
    o_out [T, padded H]."""
    heads, kv_heads, d, q0, k0, v0 = dims
    qk_norm, norm_after_rope, interleaved, output_gate, rope_layer = flags
    l2_eps, floor_scale, attn_scale = q_scale
    rms_norm(x, norm_w, eps, h)
    packed_linear(h, qkv, qkv_out)
    add_bias(qkv_out, qkv_bias)
    if output_gate:
        split_gate(qkv_out, q0, heads, d, qg)
        q = qg[:, :heads * d]
    else:
        q = qkv_out[:, q0: q0 + heads * d]
    k = qkv_out[:, k0: k0 + kv_heads * d]
    v = qkv_out[:, v0: v0 + kv_heads * d]
    if qk_norm == QK_NORM_FULL:
        rms_norm(q.copy(), q_norm_w, eps, q)
        rms_norm(k.copy(), k_norm_w, eps, k)
    if clip_qkv > 0:
        clip(q, clip_qkv)
        clip(k, clip_qkv)
        clip(v, clip_qkv)
    if qk_norm == QK_NORM_HEAD and not norm_after_rope:
        rms_norm_heads(q, heads, d, q_norm_w, eps)
        rms_norm_heads(k, kv_heads, d, k_norm_w, eps)
    if rope_layer:
        rope(q, heads, d, 0, interleaved != 0, cos, sin, start)
        rope(k, kv_heads, d, 0, interleaved != 0, cos, sin, start)
    if qk_norm == QK_NORM_HEAD and norm_after_rope:
        rms_norm_heads(q, heads, d, q_norm_w, eps)
        rms_norm_heads(k, kv_heads, d, k_norm_w, eps)
    if l2_eps > 0:
        no_weight = np.zeros(0, np.float32)
        rms_norm_heads(q, heads, d, no_weight, l2_eps)
        rms_norm_heads(k, kv_heads, d, no_weight, l2_eps)
    if floor_scale > 0:
        query_temperature(q, start, floor_scale, attn_scale)
    write_cache(k, v, kv_heads, d, kcache, vcache, start)
    attend(q, heads, kv_heads, d, kcache, vcache, start, span[0], span[1], scale, sinks, att)
    if output_gate:
        mul_sigmoid(att, qg[:, heads * d:])
    packed_linear(att, o_proj, o_out)
    add_bias(o_out, o_bias)
    add_rows(x, o_out, out)


@njit(nogil=True, cache=True)
def mla_block(x, out, norm_w, eps, in_proj, in_bias, dims, q_a_norm_w, q_b, kv_a_norm_w, cos, sin, interleaved, start,
              c_cache, r_cache, w_kv, scale, o_proj, o_bias, h, proj_out, q_a, q_out, att, o_out, latent, indexer,
              index_k, selection, selected) -> int:
    """out = x + MLA(RMSNorm(x)) in the absorbed form, for x [T, H] at positions start.. (offload.model.mla.MLA).

    in_proj: q_proj or q_a_proj fused with kv_a_proj_with_mqa (from column kv_start); dims = (heads, nope, rope,
    q_lora_rank (0: no q-LoRA, q_b is not read), kv_start); eps = (input norm, q_a norm, kv_a norm). The latent
    cache c_cache [P, rank] / r_cache [P, rope] (float32, or bf16 bits) gets the normalised latent and the rotated
    rope key; w_kv is kv_b_proj's weight [heads, nope + v, rank] or W_UK / W_UV packed per head (absorbed_attend).
    Scratch: h [T, H], proj_out [T, padded in_proj width], q_a [T, q_lora_rank], q_out [T, padded q_b width],
    att [T, heads*v], o_out [T, padded H], latent [T, rank + rope] (the cache rows before they are stored).

    DeepSeek Sparse Attention: with a lightning indexer (csrc_py.indexer_step.index_step's argument; None: none)
    the layer writes its keys to index_k and selects each query's positions into selection [T, top-k]; without one,
    the queries attend to selection[:, :selected] (another layer's choice; 0: every causal position). Returns the
    number of positions per query attended (0: every causal one)."""
    heads, nope, rope_d, q_lora, kv0 = dims
    T, rank, qd = x.shape[0], c_cache.shape[1], nope + rope_d
    rms_norm(x, norm_w, eps[0], h)
    packed_linear(h, in_proj, proj_out)
    add_bias(proj_out, in_bias)
    if q_lora > 0:
        rms_norm(proj_out[:, :q_lora], q_a_norm_w, eps[1], q_a)
        packed_linear(q_a, q_b, q_out)
        q = q_out[:, :heads * qd]
    else:
        q = proj_out[:, :heads * qd]
    rms_norm(proj_out[:, kv0: kv0 + rank], kv_a_norm_w, eps[2], latent[:, :rank])
    latent[:, rank:] = proj_out[:, kv0 + rank: kv0 + rank + rope_d]
    rope(latent[:, rank:], 1, rope_d, 0, interleaved, cos, sin, start)
    store_rows(latent[:, :rank], c_cache[start: start + T])
    store_rows(latent[:, rank:], r_cache[start: start + T])
    rope(q, heads, qd, nope, interleaved, cos, sin, start)
    if indexer is not None:
        selected = indexer_step.index_step(h, q_a, start, cos, sin, indexer, index_k, selection)
    absorbed_attend(q, heads, nope, w_kv, c_cache, r_cache, start, scale, selection, selected, att)
    packed_linear(att, o_proj, o_out)
    add_bias(o_out, o_bias)
    add_rows(x, o_out, out)
    return selected


@njit(nogil=True, cache=True)
def deltanet_block(x, out, norm_w, eps, in_proj, cols, dims, conv_w, conv_window, neg_A, dt_bias, state, norm_out_w,
                   l2_eps, o_proj, h, proj_out, mixed, delta, core, o_out) -> None:
    """out = x + GatedDeltaNet(RMSNorm(x)) for x [T, H], folding each token into the recurrent state in place
    (offload.model.gated_deltanet.GatedDeltaNet; the cache's conv window [C, kernel-1] and state [Hv, dk, dv]).

    in_proj: the layer's fused input projections; cols [C + Hv*dv + 2*Hv] the column of each of q|k|v (the
    convolution's channel order), z, b, a in its output, whichever projection layout the checkpoint has;
    dims = (Hk, Hv, dk, dv); eps = (input norm, gated norm); conv_w [C, kernel]. Scratch: h [T, H],
    proj_out [T, padded in_proj width], mixed [T, cols.size], delta [Hv, dv], core [T, Hv*dv], o_out [T, padded H].
    """
    k_heads, v_heads, dk, dv = dims
    C = conv_window.shape[0]
    b0, a0 = C + v_heads * dv, C + v_heads * dv + v_heads
    rms_norm(x, norm_w, eps[0], h)
    packed_linear(h, in_proj, proj_out)
    for t in range(x.shape[0]):
        row = mixed[t]
        for i in range(cols.size):
            row[i] = proj_out[t, cols[i]]
        short_conv(row[:C], conv_w, conv_window)
        l2_normalise_heads(row, k_heads, dk, l2_eps, 1.0 / np.sqrt(dk))
        l2_normalise_heads(row[k_heads * dk:], k_heads, dk, l2_eps, 1.0)
        gated_delta_step(row[:C], row[C: b0], row[b0: a0], row[a0:], dims, neg_A, dt_bias, state, norm_out_w,
                         eps[1], delta, core[t])
    packed_linear(core, o_proj, o_out)
    add_rows(x, o_out, out)


@njit(nogil=True, cache=True)
def mlp_block(x, norm_w, eps, mlp, dims, h, gu, act, y) -> None:
    """x += SwiGLU(RMSNorm(x)) (a dense MLP layer; mlp, dims as swiglu's), in place; scratch h [T, H], gu, act,
    y [T, padded H]."""
    H = x.shape[1]
    rms_norm(x, norm_w, eps, h)
    swiglu(h, mlp, dims, gu, act, y)
    for t in range(x.shape[0]):
        for i in range(H):
            x[t, i] += y[t, i]


@njit(nogil=True, cache=True)
def experts_of_scaled_inputs(h, ids, weights, gate, up, down, biases, act, pairs, routed) -> None:
    """routed[t] = sum_k expert_{ids[t, k]}(weights[t, k] * h[t]) (Llama-4: the routing weight scales the expert's
    input, not its output), as one fused-kernel call over the T*K (token, choice) rows with weight 1, summed in
    choice order. pairs = (x [T*K, H], ids [T*K, 1], ones [T*K, 1], y [T*K, H]) scratch."""
    pair_x, pair_ids, ones, pair_y = pairs
    T, K = ids.shape
    for t in range(T):
        for k in range(K):
            r = t * K + k
            pair_ids[r, 0] = ids[t, k]
            ones[r, 0] = 1.0
            for i in range(h.shape[1]):
                pair_x[r, i] = h[t, i] * weights[t, k]
    packed_experts(pair_x, pair_ids, ones, gate, up, down, biases, act, pair_y)
    for t in range(T):
        routed[t] = pair_y[t * K]
        for k in range(1, K):
            routed[t] += pair_y[t * K + k]


@njit(nogil=True, cache=True)
def moe_block(x, norm_w, eps, router, router_bias, correction_bias, routing, weighting, heat, gate, up, down,
              expert_biases, expert_act, pairs, shared, shared_dims, shared_gate, h, logits, ids, weights, routed, gu,
              act, y) -> None:
    """x += MoE(RMSNorm(x)), in place (offload.model.moe.MoE): router (with its bias [E] or empty), routed experts
    (with their biases and activation, csrc_py.expert_ffn's arguments), shared expert with its optional sigmoid
    gate (shared_gate [H] or empty); heat [E] counts the routing choices.

    routing = (top_k, scoring, groups, n_group, topk_group, norm, input-scaled experts); weighting =
    (routed_scaling_factor, norm_min); pairs: experts_of_scaled_inputs's scratch (0 rows where the weights scale
    the outputs); shared, shared_dims: swiglu's mlp and dims, or with shared_dims[1] == 0 no shared expert.
    Scratch: h [T, H], logits [T, E], ids / weights [T, K], routed [T, H], gu / act / y the shared expert's
    (y [T, padded H])."""
    top_k, scoring, groups, n_group, topk_group, norm, scales_input = routing
    T, H = x.shape
    rms_norm(x, norm_w, eps, h)
    router_logits(h, router, router_bias, logits)
    route(logits, top_k, scoring, groups, n_group, topk_group, norm != 0, weighting[0], weighting[1], correction_bias,
          ids, weights)
    for t in range(T):
        for k in range(top_k):
            heat[ids[t, k]] += 1
    if scales_input:
        experts_of_scaled_inputs(h, ids, weights, gate, up, down, expert_biases, expert_act, pairs, routed)
    else:
        packed_experts(h, ids, weights, gate, up, down, expert_biases, expert_act, routed)
    width = shared_dims[1]
    if width > 0:
        swiglu(h, shared, shared_dims, gu, act, y)
    for t in range(T):
        g = np.float32(1.0)
        if shared_gate.size:
            z = np.float32(0.0)
            for i in range(H):
                z += h[t, i] * shared_gate[i]
            g = np.float32(1.0) / (np.float32(1.0) + np.exp(-z))
        for i in range(H):
            s = g * y[t, i] if width > 0 else np.float32(0.0)
            x[t, i] += routed[t, i] + s


@njit(nogil=True, cache=True)
def head_block(x, norm_w, eps, lm_head, bias, h, logits) -> None:
    """logits[:, :V] = RMSNorm(x) @ lm_head.T (+ bias [V] unless empty) for x [T, H]: the model's final norm and
    its packed LM head (offload.model.transformer.Transformer.forward). Scratch h [T, H]; logits [T, padded V]."""
    rms_norm(x, norm_w, eps, h)
    packed_linear(h, lm_head, logits)
    add_bias(logits, bias)

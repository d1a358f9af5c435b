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
from csrc_py.expert_ffn import moe_bf16, moe_q4, moe_q8
from csrc_py.linear import linear_bf16, linear_q4, linear_q8
from csrc_py.simd import bits_to_f32

# Routing codes (offload.model.routing.route's cases).
SOFTMAX, SIGMOID = 0, 1
GROUPS_NONE, GROUPS_MAX, GROUPS_TOP2_SUM = 0, 1, 2
# q/k norm codes (offload.model.attention.Attention.qk_norm).
QK_NORM_NONE, QK_NORM_HEAD, QK_NORM_FULL = 0, 1, 2


# ---------------------------------------------------------------- format dispatch


def packed_linear(x, w, y):
    """y[:, :Op] = x @ W.T for x float32 [T, K], W a packed (q, d, m) tuple, y float32 [T, >= padded O]."""
    raise NotImplementedError("compiled code only")


def packed_experts(x, ids, weights, gate, up, down, biases, act, y):
    """y = the routed experts of x (csrc_py.expert_ffn.moe_q8 / moe_q4 / moe_bf16 picked by the q arrays), with
    biases = (gate [E, I], up [E, I], down [E, H]; [0, 0] arrays for none) and act = [kind, alpha, limit]."""
    raise NotImplementedError("compiled code only")


def _fmt_of(q: types.Array) -> str:
    if q.dtype == types.uint16 and q.ndim == 3:
        return "bf16"
    if q.dtype == types.int8 and q.ndim == 5:
        return "int8"
    if q.dtype == types.uint8 and q.ndim == 5:
        return "int4"  # or int4s, whose m is None: the int4 kernels compile their symmetric form for it
    raise TypeError(f"not a packed weight array: {q}")


@overload(packed_linear)
def _packed_linear(x, w, y):
    fmt = _fmt_of(w[0])
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


@overload(packed_experts)
def _packed_experts(x, ids, weights, gate, up, down, biases, act, y):
    fmt = _fmt_of(gate[0])
    if fmt == "bf16":
        def impl(x, ids, weights, gate, up, down, biases, act, y):
            moe_bf16(x, ids, weights, gate[0], up[0], down[0], biases[0], biases[1], biases[2], act, y)
    elif fmt == "int8":
        def impl(x, ids, weights, gate, up, down, biases, act, y):
            moe_q8(x, ids, weights, gate[0], gate[1], up[0], up[1], down[0], down[1], biases[0], biases[1], biases[2],
                   act, y)
    else:
        def impl(x, ids, weights, gate, up, down, biases, act, y):
            moe_q4(x, ids, weights, gate[0], gate[1], gate[2], up[0], up[1], up[2], down[0], down[1], down[2],
                   biases[0], biases[1], biases[2], act, y)
    return impl


def weight(row, i):
    """row[i] as float32, for a float32 row or a row of bf16 bits (uint16)."""
    raise NotImplementedError("compiled code only")


@overload(weight, inline="always")
def _weight(row, i):
    if row.dtype == types.uint16:
        return lambda row, i: bits_to_f32(np.uint32(row[i]) << np.uint32(16))
    return lambda row, i: row[i]


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
    """k, v [T, kv_heads*d] -> kcache, vcache [kv_heads, P, d] at positions start..start+T-1."""
    for t in range(k.shape[0]):
        for g in range(kv_heads):
            kcache[g, start + t] = k[t, g * d: g * d + d]
            vcache[g, start + t] = v[t, g * d: g * d + d]


# Cephes' expf: exp(x) = 2^k exp(r), x = k ln2 + r, |r| <= ln2 / 2, ln2 in two parts; 1-2 ulp.
LOG2E = np.float32(1.4426950408889634)
LN2_HI, LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
EXP_MIN = np.float32(-87.0)  # below it exp underflows float32's normal range: 0


@njit(nogil=True, cache=True, inline="always", fastmath={"contract"})
def exp_shifted(s: np.ndarray, n: int, best: float) -> float:
    """s[:n] = exp(s[:n] - best) in place and their sum, for best >= max(s[:n]) (-inf entries give 0): softmax's
    numerators. Written as plain arithmetic so the loop vectorizes (np.exp is a scalar libm call per value without
    Intel's SVML)."""
    total = np.float32(0.0)
    for j in range(n):
        x = s[j] - best
        c = max(x, EXP_MIN)
        k = np.floor(c * LOG2E + np.float32(0.5))
        r = c - k * LN2_HI - k * LN2_LO
        y = np.float32(1.9875691500e-4)
        y = y * r + np.float32(1.3981999507e-3)
        y = y * r + np.float32(8.3334519073e-3)
        y = y * r + np.float32(4.1665795894e-2)
        y = y * r + np.float32(1.6666665459e-1)
        y = y * r + np.float32(5.0000001201e-1)
        pow2 = bits_to_f32((np.int32(k) + np.int32(127)) << 23) if x > EXP_MIN else np.float32(0.0)  # 2^k
        s[j] = (y * r * r + r + np.float32(1.0)) * pow2
        total += s[j]
    return total


@njit(parallel=True, nogil=True, cache=True, fastmath={"contract", "reassoc"})
def attend(q: np.ndarray, heads: int, kv_heads: int, d: int, kcache: np.ndarray, vcache: np.ndarray, start: int,
           window: int, chunk: int, scale: float, sinks: np.ndarray, out: np.ndarray) -> None:
    """Causal grouped-query attention of q [T, heads*d] (positions start..) over the cached keys / values
    [kv_heads, P, d] (positions 0..start+T-1 already written), optionally only the last `window` and only within
    the query's `chunk` of positions (0: no limit), with one sink logit per head in every softmax where
    sinks [heads] is not empty; out [T, heads*d]. One KV head per thread, its query heads together: each key and
    value row is read once for the whole group."""
    T = q.shape[0]
    group = heads // kv_heads
    for g in prange(kv_heads):
        scores = np.empty((group, start + T), np.float32)  # [query head of the group, position from lo]
        qs = np.empty((group, d), np.float32)
        acc = np.empty((group, d), np.float32)
        keys, values = kcache[g], vcache[g]
        for t in range(T):
            hi = start + t + 1
            lo = max(0, hi - window) if window > 0 else 0
            if chunk > 0:
                lo = max(lo, (hi - 1) // chunk * chunk)
            n = hi - lo
            for a in range(group):
                for i in range(d):
                    qs[a, i] = q[t, (g * group + a) * d + i] * np.float32(scale)
            for j in range(n):
                key = keys[lo + j]
                for a in range(group):
                    dot = np.float32(0.0)
                    for i in range(d):
                        dot += qs[a, i] * key[i]
                    scores[a, j] = dot
            for a in range(group):
                sink = np.float32(sinks[g * group + a]) if sinks.size else np.float32(-np.inf)
                row = scores[a]
                best = sink
                for j in range(n):
                    best = max(best, row[j])
                inv = np.float32(1.0) / (exp_shifted(row, n, best) + np.float32(np.exp(sink - best)))
                for j in range(n):
                    row[j] *= inv
            acc[:] = 0.0
            for j in range(n):
                value = values[lo + j]
                for a in range(group):
                    p = scores[a, j]
                    for i in range(d):
                        acc[a, i] += p * value[i]
            for a in range(group):
                out[t, (g * group + a) * d: (g * group + a + 1) * d] = acc[a]


LATENT_HEADS_PER_BLOCK = 4  # MLA query heads that share one pass over the latent cache (a block per prange item)


@njit(parallel=True, nogil=True, cache=True, fastmath={"contract", "reassoc"})
def latent_attend(q: np.ndarray, heads: int, nope: int, w_kv: np.ndarray, c_cache: np.ndarray, r_cache: np.ndarray,
                  start: int, scale: float, selection: np.ndarray, selected: int, out: np.ndarray) -> None:
    """MLA's absorbed attention (offload.model.mla.MLA._absorbed) for q [T, heads*(nope+rope)] at positions
    start..: per head, q_nope through W_UK into latent space, causal attention over the cached latents
    c_cache [P, rank] (keys: latent + rope key r_cache [P, rope]; values: latent), the result through W_UV;
    out [T, heads*v]. w_kv is kv_b_proj's weight as [heads, nope + v, rank] (W_UK rows, then W_UV rows), float32
    or bf16 bits: whole contiguous rows, which vectorize where the strided W_UK / W_UV views would not. With
    selected > 0 each query attends only to the positions selection[t, :selected] (DeepSeek Sparse Attention,
    MLA._absorbed_selected; later positions than the query skipped). The heads go to the threads in blocks
    of LATENT_HEADS_PER_BLOCK: each cached latent is read once per block, not once per head."""
    T = q.shape[0]
    rank, rope_d, v_dim = c_cache.shape[1], r_cache.shape[1], w_kv.shape[1] - nope
    qd = nope + rope_d
    per = LATENT_HEADS_PER_BLOCK
    for b in prange((heads + per - 1) // per):
        h0 = b * per
        hb = min(per, heads - h0)
        q_lat = np.empty((hb, rank), np.float32)
        q_rope = np.empty((hb, rope_d), np.float32)
        o_lat = np.empty((hb, rank), np.float32)
        n_max = selected if selected > 0 else start + T
        scores = np.empty((hb, n_max), np.float32)  # [head of the block, attended position]
        for t in range(T):
            q_lat[:] = 0.0
            for a in range(hb):
                h = h0 + a
                for i in range(nope):
                    qi = q[t, h * qd + i]
                    wrow = w_kv[h, i]
                    for r in range(rank):
                        q_lat[a, r] += qi * weight(wrow, r)
                q_rope[a] = q[t, h * qd + nope: h * qd + qd]
            hi = start + t + 1
            n = selected if selected > 0 else hi
            for i in range(n):
                j = selection[t, i] if selected > 0 else i
                if j >= hi:
                    scores[:, i] = -np.inf
                    continue
                c, kr = c_cache[j], r_cache[j]
                for a in range(hb):
                    acc = np.float32(0.0)
                    for r in range(rank):
                        acc += q_lat[a, r] * c[r]
                    for r in range(rope_d):
                        acc += q_rope[a, r] * kr[r]
                    scores[a, i] = acc * np.float32(scale)
            for a in range(hb):
                row = scores[a]
                best = np.float32(-np.inf)
                for i in range(n):
                    best = max(best, row[i])
                inv = np.float32(1.0) / exp_shifted(row, n, best)
                for i in range(n):
                    row[i] *= inv
            o_lat[:] = 0.0
            for i in range(n):
                j = selection[t, i] if selected > 0 else i
                if j >= hi:
                    continue
                c = c_cache[j]
                for a in range(hb):
                    p = scores[a, i]
                    for r in range(rank):
                        o_lat[a, r] += p * c[r]
            for a in range(hb):
                h = h0 + a
                for i in range(v_dim):
                    wrow = w_kv[h, nope + i]
                    acc = np.float32(0.0)
                    for r in range(rank):
                        acc += o_lat[a, r] * weight(wrow, r)
                    out[t, h * v_dim + i] = acc


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


# Router weights (experts x hidden values) from which the decode threads share the logits: one thread reads a
# cold router at ~5-8 GB/s (Qwen3-30B-A3B's 128 x 2048 bf16: ~0.1 ms), a parallel region costs a few us.
ROUTER_PARALLEL_MIN = 1 << 18


@njit(nogil=True, cache=True, inline="always", fastmath={"contract", "reassoc"})
def _router_logit(h: np.ndarray, router: np.ndarray, bias: np.ndarray, logits: np.ndarray, t: int, e: int) -> None:
    x, w = h[t], router[e]
    acc = np.float32(0.0)
    for i in range(x.size):
        acc += x[i] * weight(w, i)
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


@njit(nogil=True, cache=True, fastmath={"contract", "afn", "arcp", "reassoc"})
def silu_mul(g: np.ndarray, u: np.ndarray, out: np.ndarray) -> None:
    """out = silu(g) * u, elementwise over [T, I] views."""
    for t in range(g.shape[0]):
        for i in range(g.shape[1]):
            out[t, i] = g[t, i] / (np.float32(1.0) + np.exp(-g[t, i])) * u[t, i]


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


@njit(nogil=True, cache=True, fastmath={"contract", "afn", "arcp", "reassoc"})
def mul_sigmoid(v: np.ndarray, gate: np.ndarray) -> None:
    """v *= sigmoid(gate), elementwise over [T, D] views (the output gate)."""
    for t in range(v.shape[0]):
        for i in range(v.shape[1]):
            v[t, i] *= np.float32(1.0) / (np.float32(1.0) + np.exp(-gate[t, i]))


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
              c_cache, r_cache, w_kv, scale, o_proj, o_bias, h, proj_out, q_a, q_out, att, o_out, indexer, index_k,
              selection, selected) -> int:
    """out = x + MLA(RMSNorm(x)) in the absorbed form, for x [T, H] at positions start.. (offload.model.mla.MLA).

    in_proj: q_proj or q_a_proj fused with kv_a_proj_with_mqa (from column kv_start); dims = (heads, nope, rope,
    q_lora_rank (0: no q-LoRA, q_b is not read), kv_start); eps = (input norm, q_a norm, kv_a norm). The latent
    cache c_cache [P, rank] / r_cache [P, rope] gets the normalised latent and the rotated rope key. Scratch: h [T, H],
    proj_out [T, padded in_proj width], q_a [T, q_lora_rank], q_out [T, padded q_b width], att [T, heads*v],
    o_out [T, padded H].

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
    rms_norm(proj_out[:, kv0: kv0 + rank], kv_a_norm_w, eps[2], c_cache[start: start + T])
    r_cache[start: start + T] = proj_out[:, kv0 + rank: kv0 + rank + rope_d]
    rope(r_cache[start: start + T], 1, rope_d, 0, interleaved, cos, sin, start)
    rope(q, heads, qd, nope, interleaved, cos, sin, start)
    if indexer is not None:
        selected = indexer_step.index_step(h, q_a, start, cos, sin, indexer, index_k, selection)
    latent_attend(q, heads, nope, w_kv, c_cache, r_cache, start, scale, selection, selected, att)
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

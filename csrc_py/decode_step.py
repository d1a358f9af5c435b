"""The compiled decode step: one decoder layer's attention block and MLP block, each one Numba call over
preallocated buffers, for a few tokens on the CPU.

    attention_block(x, out, ...)   out = x + o_proj(attend(rope(norms(qkv(rms_norm(x))))))   (cache written)
    moe_block(out, ...)            out += experts(route(h)) + gate * shared(h),  h = rms_norm(out)
    mlp_block(out, ...)            out += swiglu(rms_norm(out))

The stages are the torch modules' math in the same order and in float32 (offload/model/*.py is the oracle of each
one; tests/test_decode_step.py checks them stage by stage and whole): Python and torch dispatch, ~100 ops per layer
on the torch path, are what this removes. The weight-reading kernels are the existing ones (csrc_py.linear,
csrc_py.expert_ffn), called from here; everything between them runs on the calling thread, since at decode sizes
it costs less than waking the thread pool, except the attention over the cache, which grows with the context and
is split over KV heads.

A packed matrix travels as a tuple (q, d, m) of csrc_py.formats arrays (d, m as uint16 bits; m is d for int8, d
and m are empty for bf16): `packed_linear` picks the kernel from q's type when the caller is compiled.
Flags are numbers, not types, so one compiled signature serves every layer of a format combination: an empty
array means "absent" (bias, norm weight, correction bias, shared gate), 0 means "none" (window, clip).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from csrc_py.expert_ffn import moe_bf16, moe_q4, moe_q8
from csrc_py.linear import linear_bf16, linear_q4, linear_q8

# Routing codes (offload.model.routing.route's cases).
SOFTMAX, SIGMOID = 0, 1
GROUPS_NONE, GROUPS_MAX, GROUPS_TOP2_SUM = 0, 1, 2
# q/k norm codes (offload.model.attention.Attention.qk_norm).
QK_NORM_NONE, QK_NORM_HEAD, QK_NORM_FULL = 0, 1, 2


# ---------------------------------------------------------------- format dispatch


def packed_linear(x, w, y):
    """y[:, :Op] = x @ W.T for x float32 [T, K], W a packed (q, d, m) tuple, y float32 [T, >= padded O]."""
    raise NotImplementedError("compiled code only")


def packed_experts(x, ids, weights, gate, up, down, y):
    """y = the routed experts of x (csrc_py.expert_ffn.moe_q8 / moe_q4 / moe_bf16 picked by the q arrays)."""
    raise NotImplementedError("compiled code only")


def _fmt_of(q: types.Array) -> str:
    if q.dtype == types.uint16 and q.ndim == 3:
        return "bf16"
    if q.dtype == types.int8 and q.ndim == 5:
        return "int8"
    if q.dtype == types.uint8 and q.ndim == 5:
        return "int4"
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
def _packed_experts(x, ids, weights, gate, up, down, y):
    """Plain SwiGLU experts only (no biases, act = SILU: zeros): offload.model.compiled_step declines the others."""
    fmt = _fmt_of(gate[0])
    if fmt == "bf16":
        def impl(x, ids, weights, gate, up, down, y):
            none, silu = np.zeros((0, 0), np.float32), np.zeros(3, np.float32)
            moe_bf16(x, ids, weights, gate[0], up[0], down[0], none, none, none, silu, y)
    elif fmt == "int8":
        def impl(x, ids, weights, gate, up, down, y):
            none, silu = np.zeros((0, 0), np.float32), np.zeros(3, np.float32)
            moe_q8(x, ids, weights, gate[0], gate[1], up[0], up[1], down[0], down[1], none, none, none, silu, y)
    else:
        def impl(x, ids, weights, gate, up, down, y):
            none, silu = np.zeros((0, 0), np.float32), np.zeros(3, np.float32)
            moe_q4(x, ids, weights, gate[0], gate[1], gate[2], up[0], up[1], up[2], down[0], down[1], down[2],
                   none, none, none, silu, y)
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
    """RMSNorm each of `heads` slices of width d of every row of v [T, >= heads*d], in place (per-head q/k norm)."""
    for t in range(v.shape[0]):
        row = v[t]
        for h in range(heads):
            seg = row[h * d: h * d + d]
            acc = 0.0
            for i in range(d):
                acc += np.float64(seg[i]) * seg[i]
            r = np.float32(1.0 / np.sqrt(acc / d + eps))
            for i in range(d):
                seg[i] = w[i] * (seg[i] * r)


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


@njit(nogil=True, cache=True, inline="always")
def _attend_head(q: np.ndarray, keys: np.ndarray, values: np.ndarray, lo: int, hi: int, scale: float,
                 scores: np.ndarray, out: np.ndarray) -> None:
    """out = softmax(scale * keys[lo:hi] q) values[lo:hi] for one query q [d] (out [dv])."""
    qs = q * np.float32(scale)
    best = -np.inf
    for j in range(lo, hi):
        key = keys[j]
        acc = np.float32(0.0)
        for i in range(q.size):
            acc += qs[i] * key[i]
        scores[j] = acc
        best = max(best, acc)
    total = np.float32(0.0)
    for j in range(lo, hi):
        e = np.float32(np.exp(scores[j] - best))
        scores[j] = e
        total += e
    out[:] = 0.0
    for j in range(lo, hi):
        p = scores[j] / total
        value = values[j]
        for i in range(out.size):
            out[i] += p * value[i]


@njit(parallel=True, nogil=True, cache=True, fastmath={"contract", "reassoc"})
def attend(q: np.ndarray, heads: int, kv_heads: int, d: int, kcache: np.ndarray, vcache: np.ndarray, start: int,
           window: int, scale: float, out: np.ndarray) -> None:
    """Causal grouped-query attention of q [T, heads*d] (positions start..) over the cached keys / values
    [kv_heads, P, d] (positions 0..start+T-1 already written), optionally only the last `window` (0: all);
    out [T, heads*d]. One KV head's query heads run on one thread, so its keys are read once from memory."""
    T = q.shape[0]
    group = heads // kv_heads
    for g in prange(kv_heads):
        scores = np.empty(start + T, np.float32)
        keys, values = kcache[g], vcache[g]
        for h in range(g * group, g * group + group):
            for t in range(T):
                hi = start + t + 1
                lo = max(0, hi - window) if window > 0 else 0
                _attend_head(q[t, h * d: h * d + d], keys, values, lo, hi, scale, scores, out[t, h * d: h * d + d])


@njit(parallel=True, nogil=True, cache=True, fastmath={"contract", "reassoc"})
def latent_attend(q: np.ndarray, heads: int, nope: int, w_kv: np.ndarray, c_cache: np.ndarray, r_cache: np.ndarray,
                  start: int, scale: float, out: np.ndarray) -> None:
    """MLA's absorbed attention (offload.model.mla.MLA._absorbed) for q [T, heads*(nope+rope)] at positions
    start..: per head, q_nope through W_UK into latent space, causal attention over the cached latents
    c_cache [P, rank] (keys: latent + rope key r_cache [P, rope]; values: latent), the result through W_UV;
    out [T, heads*v]. w_kv is kv_b_proj's weight as [heads, nope + v, rank] (W_UK rows, then W_UV rows): whole
    contiguous rows, which vectorize where the strided W_UK / W_UV views would not. One head per thread."""
    T = q.shape[0]
    rank, rope_d, v_dim = c_cache.shape[1], r_cache.shape[1], w_kv.shape[1] - nope
    qd = nope + rope_d
    for h in prange(heads):
        q_lat = np.empty(rank, np.float32)
        o_lat = np.empty(rank, np.float32)
        scores = np.empty(start + T, np.float32)
        for t in range(T):
            qn, qr = q[t, h * qd: h * qd + nope], q[t, h * qd + nope: h * qd + qd]
            q_lat[:] = 0.0
            for i in range(nope):
                wrow = w_kv[h, i]
                for r in range(rank):
                    q_lat[r] += qn[i] * wrow[r]
            hi = start + t + 1
            best = -np.inf
            for j in range(hi):
                c, kr = c_cache[j], r_cache[j]
                acc = np.float32(0.0)
                for r in range(rank):
                    acc += q_lat[r] * c[r]
                for r in range(rope_d):
                    acc += qr[r] * kr[r]
                scores[j] = acc * np.float32(scale)
                best = max(best, scores[j])
            total = np.float32(0.0)
            for j in range(hi):
                scores[j] = np.exp(scores[j] - best)
                total += scores[j]
            o_lat[:] = 0.0
            for j in range(hi):
                p = scores[j] / total
                c = c_cache[j]
                for r in range(rank):
                    o_lat[r] += p * c[r]
            for i in range(v_dim):
                wrow = w_kv[h, nope + i]
                acc = np.float32(0.0)
                for r in range(rank):
                    acc += o_lat[r] * wrow[r]
                out[t, h * v_dim + i] = acc


@njit(nogil=True, cache=True)
def route(logits: np.ndarray, top_k: int, scoring: int, groups: int, n_group: int, topk_group: int, norm: bool,
          scaling: float, correction_bias: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> None:
    """offload.model.routing.route for logits float32 [T, E] -> ids int64 [T, K], weights float32 [T, K].

    scoring SOFTMAX | SIGMOID; groups GROUPS_NONE | GROUPS_MAX (rank groups by their best score; softmax) |
    GROUPS_TOP2_SUM (by the sum of their two best choices; sigmoid); correction_bias [E] or empty (sigmoid:
    steers the choice, not the weights)."""
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
                choice[e] = scores[e]
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
        order = np.argsort(-choice, kind="mergesort")[:top_k]
        total = np.float32(0.0)
        for k in range(top_k):
            ids[t, k] = order[k]
            weights[t, k] = scores[order[k]] if scoring == SIGMOID else choice[order[k]]
            total += weights[t, k]
        if norm:
            denom = total + np.float32(1e-20) if scoring == SIGMOID else total
            for k in range(top_k):
                weights[t, k] /= denom
        for k in range(top_k):
            weights[t, k] *= np.float32(scaling)


@njit(nogil=True, cache=True, fastmath={"contract", "reassoc"})
def router_logits(h: np.ndarray, router: np.ndarray, logits: np.ndarray) -> None:
    """logits [T, E] = h [T, H] @ router [E, H].T in float32."""
    for t in range(h.shape[0]):
        x = h[t]
        for e in range(router.shape[0]):
            w = router[e]
            acc = np.float32(0.0)
            for i in range(x.size):
                acc += x[i] * w[i]
            logits[t, e] = acc


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


# ---------------------------------------------------------------- blocks


@njit(nogil=True, cache=True)
def swiglu(h: np.ndarray, gate_up, up_start: int, width: int, down, gu: np.ndarray,
           act: np.ndarray, y: np.ndarray) -> None:
    """y[:, :padded] = down(silu(gate h) * up h) with gate/up fused in one packed matrix (up from row up_start),
    scratch gu [T, padded gate+up], act [T, width]; offload.model.layers.SwiGLU over a FusedLinear."""
    packed_linear(h, gate_up, gu)
    silu_mul(gu[:, :width], gu[:, up_start: up_start + width], act)
    packed_linear(act, down, y)


@njit(nogil=True, cache=True)
def add_rows(x: np.ndarray, y: np.ndarray, out: np.ndarray) -> None:
    """out = x + y over x's columns (y may be panel-padded wider): a block's residual."""
    for t in range(x.shape[0]):
        for i in range(x.shape[1]):
            out[t, i] = x[t, i] + y[t, i]


@njit(nogil=True, cache=True)
def attention_block(x, out, norm_w, eps, qkv, qkv_bias, dims, qk_norm, q_norm_w, k_norm_w, clip_qkv, cos, sin,
                    start, kcache, vcache, window, scale, o_proj, o_bias, h, qkv_out, att, o_out) -> None:
    """out = x + Attention(RMSNorm(x)) for x [T, H] at positions start.. (offload.model.attention.Attention).

    dims = (heads, kv_heads, head_dim, q_start, k_start, v_start): the column where each part of the fused
    q/k/v output starts. Scratch: h [T, H], qkv_out [T, padded qkv width], att [T, heads*head_dim],
    o_out [T, padded H]."""
    heads, kv_heads, d, q0, k0, v0 = dims
    rms_norm(x, norm_w, eps, h)
    packed_linear(h, qkv, qkv_out)
    add_bias(qkv_out, qkv_bias)
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
    if qk_norm == QK_NORM_HEAD:
        rms_norm_heads(q, heads, d, q_norm_w, eps)
        rms_norm_heads(k, kv_heads, d, k_norm_w, eps)
    rope(q, heads, d, 0, False, cos, sin, start)
    rope(k, kv_heads, d, 0, False, cos, sin, start)
    write_cache(k, v, kv_heads, d, kcache, vcache, start)
    attend(q, heads, kv_heads, d, kcache, vcache, start, window, scale, att)
    packed_linear(att, o_proj, o_out)
    add_bias(o_out, o_bias)
    add_rows(x, o_out, out)


@njit(nogil=True, cache=True)
def mla_block(x, out, norm_w, eps, in_proj, in_bias, dims, q_a_norm_w, q_b, kv_a_norm_w, cos, sin, interleaved, start,
              c_cache, r_cache, w_kv, scale, o_proj, o_bias, h, proj_out, q_a, q_out, att, o_out) -> None:
    """out = x + MLA(RMSNorm(x)) in the absorbed form, for x [T, H] at positions start.. (offload.model.mla.MLA).

    in_proj: q_proj or q_a_proj fused with kv_a_proj_with_mqa (from column kv_start); dims = (heads, nope, rope,
    q_lora_rank (0: no q-LoRA, q_b is not read), kv_start); eps = (input norm, q_a norm, kv_a norm). The latent
    cache c_cache [P, rank] / r_cache [P, rope] gets the normalised latent and the rotated rope key. Scratch: h [T, H],
    proj_out [T, padded in_proj width], q_a [T, q_lora_rank], q_out [T, padded q_b width], att [T, heads*v],
    o_out [T, padded H]."""
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
    latent_attend(q, heads, nope, w_kv, c_cache, r_cache, start, scale, att)
    packed_linear(att, o_proj, o_out)
    add_bias(o_out, o_bias)
    add_rows(x, o_out, out)


@njit(nogil=True, cache=True)
def mlp_block(x, norm_w, eps, gate_up, up_start, width, down, h, gu, act, y) -> None:
    """x += SwiGLU(RMSNorm(x)) (a dense MLP layer), in place; scratch h [T, H], gu, act, y [T, padded H]."""
    H = x.shape[1]
    rms_norm(x, norm_w, eps, h)
    swiglu(h, gate_up, up_start, width, down, gu, act, y)
    for t in range(x.shape[0]):
        for i in range(H):
            x[t, i] += y[t, i]


@njit(nogil=True, cache=True)
def moe_block(x, norm_w, eps, router, correction_bias, routing, scaling, heat, gate, up, down, shared, shared_dims,
              shared_gate, h, logits, ids, weights, routed, gu, act, y) -> None:
    """x += MoE(RMSNorm(x)), in place (offload.model.moe.MoE): router, routed experts, shared expert with its
    optional sigmoid gate (shared_gate [H] or empty); heat [E] counts the routing choices.

    routing = (top_k, scoring, groups, n_group, topk_group, norm); shared = (gate_up, down) packed or, with
    shared_dims[1] == 0, no shared expert; shared_dims = (up_start, width). Scratch: h [T, H], logits [T, E],
    ids / weights [T, K], routed [T, H], gu / act / y the shared expert's (y [T, padded H])."""
    top_k, scoring, groups, n_group, topk_group, norm = routing
    T, H = x.shape
    rms_norm(x, norm_w, eps, h)
    router_logits(h, router, logits)
    route(logits, top_k, scoring, groups, n_group, topk_group, norm != 0, scaling, correction_bias, ids, weights)
    for t in range(T):
        for k in range(top_k):
            heat[ids[t, k]] += 1
    packed_experts(h, ids, weights, gate, up, down, routed)
    up_start, width = shared_dims
    if width > 0:
        swiglu(h, shared[0], up_start, width, shared[1], gu, act, y)
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

"""DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2, GLM-5) as a stage of the compiled decode step: for
a few new tokens, which cached positions MLA's absorbed attention reads (csrc_py.decode_step.mla_block calls
`index_step` between the query and the attention).

    index_step(h, q_a, start, cos, sin, indexer, index_k, selection) -> selected
        k = rope(LayerNorm(wk h))              written to the indexer key cache at positions start..
        q = rope(wq_b q_a)                     [T, n heads, d]
        w = (h @ weights_proj.T) * n^-0.5      [T, n], float32
        score[t, s] = sum_h w[t, h] relu(q[t, h] . k[s] d^-0.5)   over the S = start+T cached keys
        selection[t] = the top-k positions of score[t], later positions than the query's ranked last

offload/model/indexer.py is the oracle (tests/test_indexer_step.py checks each stage and the whole against it).
While the context is no longer than top-k every causal position is attended and the scoring is skipped, as there:
`index_step` then returns 0 (selection unused), else k.

Ties: torch.topk leaves the order among exactly equal scores to std::nth_element; here the lower position wins a
tie at the k-th score. Only exact float32 equality is affected (in practice positions whose every head's product is
negative, which all score 0).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from csrc_py import decode_step as ds


@njit(nogil=True, cache=True)
def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float, out: np.ndarray) -> None:
    """out[t] = (x[t] - mean) / sqrt(var + eps) * w + b for x, out float32 [T, D] (the indexer's key LayerNorm,
    biased variance, statistics accumulated in float64)."""
    T, D = x.shape
    for t in range(T):
        total = 0.0
        for i in range(D):
            total += x[t, i]
        mean = total / D
        var = 0.0
        for i in range(D):
            c = x[t, i] - mean
            var += c * c
        r = 1.0 / np.sqrt(var / D + eps)
        for i in range(D):
            out[t, i] = np.float32((x[t, i] - mean) * r) * w[i] + b[i]


@njit(parallel=True, nogil=True, cache=True, fastmath={"contract", "reassoc"})
def index_scores(q: np.ndarray, heads: int, d: int, keys: np.ndarray, S: int, weights: np.ndarray,
                 scores: np.ndarray) -> None:
    """scores[t, s] = sum_h weights[t, h] * relu(q[t, h] . keys[s] * d^-0.5) for s < S (offload.model.indexer.
    index_scores): q [T, heads*d], keys [P, d], weights [T, heads], scores [T, >= S]. Four heads share each load
    of a key (four dot products in one loop: 2.3x faster than one head at a time, measured on the DeepSeek-V3.2
    shape); positions run in parallel."""
    T = q.shape[0]
    q = np.ascontiguousarray(q)  # a view of a padded projection output: unit strides let the loops vectorize
    scale = np.float32(d ** -0.5)
    zero = np.float32(0.0)
    fours = heads // 4 * 4
    for s in prange(S):
        key = keys[s]
        for t in range(T):
            w, total = weights[t], zero
            for h in range(0, fours, 4):
                q4 = q[t, h * d: h * d + 4 * d]
                a0 = a1 = a2 = a3 = zero
                for i in range(d):
                    k = key[i]
                    a0 += q4[i] * k
                    a1 += q4[d + i] * k
                    a2 += q4[2 * d + i] * k
                    a3 += q4[3 * d + i] * k
                total += w[h] * max(a0 * scale, zero) + w[h + 1] * max(a1 * scale, zero) + \
                    w[h + 2] * max(a2 * scale, zero) + w[h + 3] * max(a3 * scale, zero)
            for h in range(fours, heads):
                qh = q[t, h * d: h * d + d]
                acc = zero
                for i in range(d):
                    acc += qh[i] * key[i]
                total += w[h] * max(acc * scale, zero)
            scores[t, s] = total


@njit(nogil=True, cache=True)
def top_positions(scores: np.ndarray, causal: int, k: int, out: np.ndarray) -> None:
    """The k highest of scores [S] with positions >= causal ranked below every other, ascending -> out [k]
    (offload.model.indexer.select_positions for one query; the lower position wins a tie at the k-th score)."""
    S = scores.size
    ranked = scores.copy()
    for s in range(causal, S):
        ranked[s] = -np.inf
    kth = np.partition(ranked, S - k)[S - k]  # the k-th highest score
    n = 0
    for s in range(S):  # every position above it ...
        if ranked[s] > kth:
            out[n] = s
            n += 1
    for s in range(S):  # ... then the ties at it, lowest first
        if n == k:
            break
        if ranked[s] == kth:
            out[n] = s
            n += 1
    out[:n].sort()


@njit(nogil=True, cache=True)
def index_step(h, q_a, start, cos, sin, indexer, index_k, selection) -> int:
    """The indexer's work for x = h [T, H] (the attention's normalised input) and q_a [T, q_lora_rank] (the MLA's
    normalised query latent) at positions start.. (offload.model.indexer.LightningIndexer.forward): writes the new
    keys to index_k [P, d], and where the context start+T is longer than top-k, each query's top-k positions to
    selection [T, top-k] (int64). Returns the number of positions selected per query, 0 for 'every causal one'.

    indexer = (wq_b packed, wk packed, key norm (weight [d], bias [d], eps), weights_proj [n, H] float32,
    (heads, d, top-k, interleaved RoPE), scratch (k_out [T, padded d], q_out [T, padded n*d], weights [T, n],
    scores [T, P]))."""
    wq_b, wk, k_norm, weights_proj, dims, scratch = indexer
    heads, d, topk, interleaved = dims
    k_out, q_out, weights, scores = scratch
    T = h.shape[0]
    S = start + T
    ds.packed_linear(h, wk, k_out)
    keys = index_k[start: S]
    layer_norm(k_out[:, :d], k_norm[0], k_norm[1], k_norm[2], keys)
    ds.rope(keys, 1, d, 0, interleaved != 0, cos, sin, start)
    if S <= topk:
        return 0
    ds.packed_linear(q_a, wq_b, q_out)
    q = q_out[:, :heads * d]
    ds.rope(q, heads, d, 0, interleaved != 0, cos, sin, start)
    ds.router_logits(h, weights_proj, np.zeros(0, np.float32), weights)
    weights *= np.float32(heads ** -0.5)
    index_scores(q, heads, d, index_k, S, weights, scores)
    for t in range(T):
        top_positions(scores[t, :S], start + t + 1, topk, selection[t])
    return topk

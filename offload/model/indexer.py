"""DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2, GLM-5): which cached positions each query's MLA
attention reads.

For a query t and a cached position s, with n indexer heads of width d:

    score[t, s] = sum_h w[t, h] * relu(q[t, h] . k[s] * d^-0.5),    w = weights_proj(x) * n^-0.5

where q = wq_b(q_latent) reads the MLA's normalised query latent, and k = LayerNorm(wk(x)) is one single-head key
per position, cached beside the MLA latent (LatentIndexCache). RoPE turns the first qk_rope_head_dim channels of q
and k (the two halves in DeepSeek-V3.2, adjacent pairs in GLM-5). Each query keeps the `topk` highest-scoring
causal positions; attention then reads only those (offload/model/mla.py). Scores are float32 and the weights
projection is applied in float32 whatever the model dtype, as the reference keeps `weights_proj` in fp32.

The reference (transformers' DeepseekV32Indexer) ranks with torch.topk over every cached position, later ones at
-inf; `select_positions` does the same per query so that ties break the same way. While the context is no longer
than `topk`, every causal position is selected and the scoring is skipped (`None`: attend to all).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..weights.source import WeightSource
from .kv_cache import LatentIndexCache
from .layers import LayerNorm, load_linear
from .positions import Positions, attended_length, token_positions
from .rope import RotaryTable

KEY_NORM_EPS = 1e-6  # the reference's LayerNorm(index_head_dim, eps=1e-6)
SCORE_BLOCK_ELEMENTS = 1 << 26  # fp32 [queries, heads, positions] scores held at once while ranking: 256 MiB


class Selection:
    """The positions an indexer layer's latest call selected [T, k] (None: every causal one), held apart from the
    modules so that GLM-5's "shared" layers can read the same object (mla.share_index_selections)."""

    positions: torch.Tensor | None = None


class LightningIndexer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, src: WeightSource):
        super().__init__()
        ix, p = cfg.indexer, f"model.layers.{layer}.self_attn.indexer"
        self.heads, self.head_dim, self.topk, self.interleaved = ix.n_heads, ix.head_dim, ix.topk, ix.rope_interleaved
        self.wq_b = load_linear(src, f"{p}.wq_b", ix.n_heads * ix.head_dim, cfg.mla.q_lora_rank)
        self.wk = load_linear(src, f"{p}.wk", ix.head_dim, cfg.hidden_size)
        self.k_norm = LayerNorm.load(src, f"{p}.k_norm", ix.head_dim, KEY_NORM_EPS)
        self.weights_proj = src.take(f"{p}.weights_proj.weight", (ix.n_heads, cfg.hidden_size), dtype=torch.float32)

    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, start: int | Positions, cache: LatentIndexCache,
                rope: RotaryTable) -> torch.Tensor | None:
        """x [T, H] (the attention's input) and q_latent [T, q_lora_rank] at positions start.. -> the positions
        each query attends to [T, min(topk, S)], or None when that is every causal position. Writes this step's
        indexer keys to the cache either way. With device positions S is the context bucket: the decision
        follows the bucket, and a bucket longer than topk over a shorter context selects every causal position
        and some later ones, which the attention masks, as it does for a short chunk's early queries."""
        T = x.shape[0]
        k = self.k_norm(self.wk(x))  # [T, d]
        k = rope.apply(k[:, None, :], start, self.interleaved)[:, 0]
        keys = cache.write_index_keys(start, k)  # [S, d]
        if attended_length(start, T) <= self.topk:
            return None
        q = self.wq_b(q_latent).view(T, self.heads, self.head_dim)
        q = rope.apply(q, start, self.interleaved)  # [T, n, d]
        weights = F.linear(x.float(), self.weights_proj) * self.heads**-0.5  # [T, n]
        return select_positions(q, keys, weights, start, self.topk)


def index_scores(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """q [T, n, d], keys [S, d], weights [T, n] -> score [T, S] = sum_h w[t, h] * relu(q[t, h] . k[s] / sqrt(d)),
    in float32 with the reference's order of operations."""
    scores = torch.matmul(q.float(), keys.float().T) * q.shape[-1] ** -0.5  # [T, n, S]
    return torch.matmul(weights[:, None, :], F.relu(scores))[:, 0]  # [T, S]


def select_positions(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, start: int | Positions, topk: int
                     ) -> torch.Tensor:
    """The top-`topk` scoring positions for each of the T queries at positions start.., ranked over all S cached
    positions with the later ones at -inf -> [T, min(topk, S)] (int64). A query with fewer than `topk` causal
    positions also gets some later ones: the attention masks those (selection_mask, or its own causal test).
    Queries are scored in blocks so that the [block, n, S] scores stay within SCORE_BLOCK_ELEMENTS."""
    T, n, _ = q.shape
    S = keys.shape[0]
    block = max(1, SCORE_BLOCK_ELEMENTS // (n * S))
    later = torch.arange(S, device=q.device)[None, :] > token_positions(start, T, q.device)[:, None]
    picked = []
    for i in range(0, T, block):
        scores = index_scores(q[i : i + block], keys, weights[i : i + block])  # [block, S]
        scores.masked_fill_(later[i : i + block], float("-inf"))
        picked.append(scores.topk(min(topk, S), dim=-1).indices)
    return torch.cat(picked)


def selection_mask(selection: torch.Tensor, start: int | Positions, S: int) -> torch.Tensor:
    """selection [T, k] at query positions start.. -> [T, S] boolean attention mask: selected and causal."""
    T, device = selection.shape[0], selection.device
    picked = torch.zeros(T, S, dtype=torch.bool, device=device).scatter_(-1, selection, True)
    causal = torch.arange(S, device=device)[None, :] <= token_positions(start, T, device)[:, None]
    return picked & causal

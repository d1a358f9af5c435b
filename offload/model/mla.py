"""DeepSeek multi-head latent attention (MLA) over a latent cache, in the naive and the absorbed form.

Both forms cache only c_kv [S, rank] (after kv_a_layernorm) and the rotated shared rope key [S, rope].
Naive (prefill): expand the cached latent through kv_b_proj into per-head keys and values, then attend.
Absorbed (decode): fold W_UK into the query and W_UV into the output, and attend in latent space as one-KV-head
attention, so no per-head K/V is ever built — the work per cached position is rank + rope instead of
heads * (nope + v) multiply-adds for the expansion.
DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5): a lightning indexer (offload/model/indexer.py) picks each
query's top-k cached positions. The naive form masks the others; the absorbed form gathers the picked latents,
so a decode step's attention costs k positions once the context is longer than k.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..weights.source import WeightSource
from .attention import grouped_attention
from .indexer import LightningIndexer, Selection, selection_mask
from .kv_cache import LatentCache, LatentIndexCache, causal_mask_args
from .layers import HeadsLinear, RMSNorm, group_linears, load_linear, make_linear
from .positions import Positions, token_positions
from .rope import RotaryTable, yarn_softmax_scale

ABSORBED_MAX_TOKENS = 8  # decode and short chunks: the absorbed form; longer prefills: the naive form


def use_absorbed(num_tokens: int) -> bool:
    return num_tokens <= ABSORBED_MAX_TOKENS


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, src: WeightSource):
        super().__init__()
        m, p, H, nh = cfg.mla, f"model.layers.{layer}.self_attn", cfg.hidden_size, cfg.num_attention_heads
        self.heads, self.nope, self.rope_dim, self.v_dim, self.rank = (
            nh, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank)
        self.interleaved = m.rope_interleaved
        bias = cfg.attention_bias
        kv_a_proj = load_linear(src, f"{p}.kv_a_proj_with_mqa", m.kv_lora_rank + m.qk_rope_head_dim, H, bias)
        if m.q_lora_rank is None:  # x -> (q, kv_a)
            self.q_a_norm = self.q_b_proj = None
            self.input_projs = group_linears([load_linear(src, f"{p}.q_proj", nh * m.qk_head_dim, H), kv_a_proj])
        else:  # x -> (q_a, kv_a); q = q_b_proj(q_a_norm(q_a))
            q_a_proj = load_linear(src, f"{p}.q_a_proj", m.q_lora_rank, H, bias)
            self.input_projs = group_linears([q_a_proj, kv_a_proj])
            self.q_a_norm = RMSNorm.load(src, f"{p}.q_a_layernorm", m.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = load_linear(src, f"{p}.q_b_proj", nh * m.qk_head_dim, m.q_lora_rank)
        self.kv_a_norm = RMSNorm.load(src, f"{p}.kv_a_layernorm", m.kv_lora_rank, cfg.rms_norm_eps)
        # Read in the model dtype: the absorbed form multiplies its two halves directly.
        kv_b_proj = load_linear(src, f"{p}.kv_b_proj", nh * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank,
                                quantize=False)
        self.o_proj = load_linear(src, f"{p}.o_proj", H, nh * m.v_head_dim, bias)
        self.scale = yarn_softmax_scale(cfg.rope, m.qk_head_dim)
        w_kv = kv_b_proj.weight.view(nh, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
        absorbed_format = src.absorbed_format
        if absorbed_format is not None and not src.dense_on_device:  # CPU-only: W_UK and W_UV packed per head
            self.k_b, self.v_b = pack_absorbed(w_kv, m.qk_nope_head_dim, absorbed_format)
            self.kv_b_proj = self.w_uk = self.w_uv = None
        else:
            if absorbed_format is not None:  # a store on the device tier: the values a CPU-only run packs
                w_kv = absorbed_values(w_kv, m.qk_nope_head_dim, absorbed_format)
                kv_b_proj = make_linear(w_kv.reshape(-1, m.kv_lora_rank), kv_b_proj.bias)
            self.k_b = self.v_b = None
            self.kv_b_proj = kv_b_proj
            self.w_uk = w_kv[:, : m.qk_nope_head_dim]  # [nh, nope, rank] (a view: no extra memory)
            self.w_uv = w_kv[:, m.qk_nope_head_dim :]  # [nh, v, rank]
        # DeepSeek Sparse Attention: this layer's own indexer, or (GLM-5's shared layers) the top-k of the last
        # layer that has one, linked by share_index_selections.
        ix = cfg.indexer
        self.indexer = LightningIndexer(cfg, layer, src) if ix is not None and ix.own_layers[layer] else None
        self.shares_selection = ix is not None and not ix.own_layers[layer]
        self.selection = Selection()  # this call's; a shared layer's is replaced by its source layer's

    def new_cache(self, max_context: int, dtype: torch.dtype, device: torch.device,
                  kv_dtype: torch.dtype | None = None) -> LatentCache:
        """The latent and rope keys in kv_dtype (None: the model dtype); the indexer's keys in the model dtype."""
        kv_dtype = kv_dtype or dtype
        if self.indexer is not None:
            return LatentIndexCache(max_context, self.rank, self.rope_dim, self.indexer.head_dim, kv_dtype, device,
                                    dtype)
        return LatentCache(max_context, self.rank, self.rope_dim, kv_dtype, device)

    def forward(self, x: torch.Tensor, start: int | Positions, cache: LatentCache, rope: RotaryTable,
                absorbed: bool | None = None) -> torch.Tensor:
        """x [T, H] at positions start.. -> [T, H]; start: a host int, or device Positions (model/positions.py)."""
        T = x.shape[0]
        q, kv_a = self.input_projs(x)
        q_latent = None
        if self.q_b_proj is not None:
            q_latent = self.q_a_norm(q)  # [T, q_lora_rank]
            q = self.q_b_proj(q_latent)
        q = q.reshape(T, self.heads, self.nope + self.rope_dim)
        q_nope, q_rope = q.split([self.nope, self.rope_dim], dim=-1)  # [T, nh, nope], [T, nh, rope]
        c_kv, k_rope = kv_a.split([self.rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_norm(c_kv)  # [T, rank]
        q_rope = rope.apply(q_rope, start, self.interleaved)
        k_rope = rope.apply(k_rope[:, None, :], start, self.interleaved)[:, 0]  # [T, rope]
        c_all, k_rope_all = cache.write(start, c_kv, k_rope)  # [S, rank], [S, rope]: views of the cache
        selection = self._select(x, q_latent, start, cache, rope)  # [T, k] positions, or None: every causal one
        absorbed = use_absorbed(T) if absorbed is None else absorbed
        if selection is None:
            mask = causal_mask_args(start, T, None, x.device)  # SDPA keyword arguments
            attend = self._absorbed if absorbed else self._naive
            out = attend(q_nope, q_rope, c_all, k_rope_all, mask)
        elif absorbed:
            out = self._absorbed_selected(q_nope, q_rope, c_all, k_rope_all, selection, start)
        else:
            mask = {"attn_mask": selection_mask(selection, start, c_all.shape[0])}
            out = self._naive(q_nope, q_rope, c_all, k_rope_all, mask)
        return self.o_proj(out.reshape(T, self.heads * self.v_dim))

    def _select(self, x, q_latent, start: int | Positions, cache: LatentCache, rope: RotaryTable
                ) -> torch.Tensor | None:
        """The positions each query attends to under DeepSeek Sparse Attention [T, k]; None for all causal ones
        (no indexer, or a context no longer than index_topk)."""
        if self.indexer is not None:
            self.selection.positions = self.indexer(x, q_latent, start, cache, rope)
        return self.selection.positions

    def _naive(self, q_nope, q_rope, c_all, k_rope_all, mask: dict) -> torch.Tensor:
        S = c_all.shape[0]
        kv = self._expand(c_all).view(S, self.heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # [S, nh, nope], [S, nh, v]
        keys = torch.cat((k_nope, k_rope_all[:, None, :].expand(S, self.heads, self.rope_dim)), dim=-1)
        query = torch.cat((q_nope, q_rope), dim=-1)  # [T, nh, nope+rope]
        out = F.scaled_dot_product_attention(
            query.transpose(0, 1), keys.transpose(0, 1), v.transpose(0, 1), scale=self.scale, **mask)
        return out.transpose(0, 1)  # [T, nh, v]

    def _expand(self, c_all: torch.Tensor) -> torch.Tensor:
        """The cached latents [S, rank] through kv_b_proj: every head's key (nope part) and value, [S, nh*(nope+v)].
        Packed per head, the weight is dequantized for the call: the same values the absorbed form multiplies."""
        if self.kv_b_proj is not None:
            return self.kv_b_proj(c_all)
        w_uk, w_uv = self.k_b.dequantized().transpose(1, 2), self.v_b.dequantized()  # [nh, nope | v, rank]
        w_kv = torch.cat((w_uk, w_uv), dim=1)
        return F.linear(c_all, w_kv.reshape(-1, self.rank).to(c_all.dtype))

    def _absorbed(self, q_nope, q_rope, c_all, k_rope_all, mask: dict) -> torch.Tensor:
        """One latent KV head: keys are (c_kv, k_rope) and values c_kv, read in place in the cache (the scores are
        q_latent . c_kv + q_rope . k_rope, two products instead of one over a concatenation of the context)."""
        q_latent = self._latent_query(q_nope)  # [nh, T, rank]
        rope = (q_rope.transpose(0, 1)[None], k_rope_all[None])  # [1, nh, T, rope], [1, S, rope]
        out_latent = grouped_attention(q_latent[None], c_all[None], c_all[None], self.scale, mask, rope)[0]
        return self._latent_values(out_latent)  # [T, nh, v]

    def _absorbed_selected(self, q_nope, q_rope, c_all, k_rope_all, selection: torch.Tensor,
                           start: int | Positions) -> torch.Tensor:
        """The absorbed form over each query's selected positions only: gathers k = index_topk latents per query,
        so a decode step's attention reads k positions whatever the context length."""
        T = selection.shape[0]
        q_latent = self._latent_query(q_nope).transpose(0, 1)  # [T, nh, rank]
        query = torch.cat((q_latent, q_rope), dim=-1)  # [T, nh, rank+rope]
        c_sel = c_all[selection]  # [T, k, rank]
        keys = torch.cat((c_sel, k_rope_all[selection]), dim=-1)  # [T, k, rank+rope]
        scores = torch.bmm(query, keys.transpose(1, 2)).mul_(self.scale)  # [T, nh, k]
        # A short chunk's early queries (fewer causal positions than k) were also given later positions.
        later = selection > token_positions(start, T, selection.device)[:, None]  # [T, k]
        scores.masked_fill_(later[:, None, :], float("-inf"))
        out_latent = torch.bmm(scores.float().softmax(-1).to(c_sel.dtype), c_sel)  # [T, nh, rank]
        return self._latent_values(out_latent.transpose(0, 1))  # [T, nh, v]

    def _latent_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope [T, nh, nope] through each head's W_UK into latent space: [nh, T, rank]."""
        if self.k_b is not None:
            return self.k_b(q_nope.transpose(0, 1))
        return torch.einsum("thd,hdr->htr", q_nope, self.w_uk)

    def _latent_values(self, out_latent: torch.Tensor) -> torch.Tensor:
        """Attention outputs in latent space [nh, T, rank] through each head's W_UV: [T, nh, v]."""
        if self.v_b is not None:
            return self.v_b(out_latent).transpose(0, 1)
        return torch.einsum("htr,hvr->thv", out_latent, self.w_uv)


def pack_absorbed(w_kv: torch.Tensor, nope: int, fmt: str) -> tuple[HeadsLinear, HeadsLinear]:
    """kv_b_proj's weight [nh, nope + v, rank] as the absorbed form's two per-head products in `fmt` (int8 / int4 /
    int4s), laid out as llama.cpp's attn_k_b and attn_v_b: k_b [nh, rank, nope] (W_UK transposed per head, quantized
    along nope) and v_b [nh, v, rank] (W_UV, quantized along rank), so that both are per-head GEMVs on the packed
    kernels."""
    from csrc_py.formats import pack

    return HeadsLinear(pack(w_kv[:, :nope].transpose(1, 2), fmt)), HeadsLinear(pack(w_kv[:, nope:], fmt))


def absorbed_values(w_kv: torch.Tensor, nope: int, fmt: str) -> torch.Tensor:
    """kv_b_proj's weight [nh, nope + v, rank] as pack_absorbed rounds it in `fmt`, dequantized: the same dtype and
    device, the same layout."""
    k_b, v_b = pack_absorbed(w_kv.detach().float().cpu(), nope, fmt)
    rounded = torch.cat([k_b.dequantized().transpose(1, 2), v_b.dequantized()], dim=1)
    return rounded.to(device=w_kv.device, dtype=w_kv.dtype).contiguous()


def share_index_selections(attentions: list[nn.Module]) -> None:
    """Give each MLA that reuses an earlier layer's top-k (GLM-5's "shared" indexer layers) the Selection of the
    last layer before it that runs its own indexer: the selection of the same call is then reused as it is."""
    source = None
    for attn in attentions:
        if isinstance(attn, MLA) and attn.indexer is not None:
            source = attn.selection
        elif isinstance(attn, MLA) and attn.shares_selection:
            attn.selection = source

"""Grouped-query attention with optional q/k/v (and o) bias, per-head or full-width q/k RMSNorm, clip_qkv, an
output gate (Qwen3-Next: q_proj also yields a per-channel gate, the output is scaled by its sigmoid), and Llama-4's
options: chunked attention, no-RoPE layers with a position-dependent query temperature, L2-normalised q/k."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import CheckpointNames
from ..config import ModelConfig
from ..weights.source import WeightSource
from .kv_cache import KVCache, causal_mask_args
from .layers import RMSNorm, group_linears, load_linear
from .positions import Positions, token_positions
from .rope import RotaryTable


# Decode and short chunks attend per KV head with that head's queries stacked (below); longer prefills use SDPA's
# enable_gqa, whose K/V expansion is then amortised over many queries.
GROUPED_MAX_TOKENS = 8


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, src: WeightSource, names: CheckpointNames = CheckpointNames()):
        super().__init__()
        p = f"model.layers.{layer}.self_attn"
        H, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = nh, nkv, hd
        self.output_gate = cfg.attention_output_gate
        q_width = nh * hd * (2 if self.output_gate else 1)  # per head: its query, then its gate
        self.qkv = group_linears([load_linear(src, f"{p}.{name}", width, H, cfg.attention_bias)
                                  for name, width in (("q_proj", q_width), ("k_proj", nkv * hd), ("v_proj", nkv * hd))])
        self.o_proj = load_linear(src, f"{p}.o_proj", H, nh * hd, cfg.attention_output_bias)
        self.qk_norm = cfg.qk_norm
        self.qk_norm_after_rope = cfg.qk_norm_after_rope
        self.rope_interleaved = cfg.rope_interleaved
        if cfg.qk_norm:
            q_dim, k_dim = (hd, hd) if cfg.qk_norm == "head" else (nh * hd, nkv * hd)
            q_name, k_name = names.qk_norm
            self.q_norm = RMSNorm.load(src, f"{p}.{q_name}", q_dim, cfg.rms_norm_eps, cfg.zero_centred_norm)
            self.k_norm = RMSNorm.load(src, f"{p}.{k_name}", k_dim, cfg.rms_norm_eps, cfg.zero_centred_norm)
        self.clip_qkv = cfg.clip_qkv
        self.window = cfg.sliding_windows[layer] if cfg.sliding_windows else None
        self.chunk = cfg.attention_chunks[layer] if cfg.attention_chunks else None
        self.rope_layer = cfg.uses_rope(layer)
        self.l2_eps = cfg.rms_norm_eps if cfg.qk_l2_norm and self.rope_layer else None
        self.temperature = cfg.attention_temperature if not self.rope_layer else None
        self.scale = hd**-0.5
        # gpt-oss: one learned logit per head that joins every softmax and takes its share of the mass, no value.
        self.sinks = src.take(f"{p}.sinks", (nh,), dtype=torch.float32) if cfg.attention_sinks else None

    def new_cache(self, max_context: int, dtype: torch.dtype, device: torch.device,
                  kv_dtype: torch.dtype | None = None) -> KVCache:
        """Keys and values in kv_dtype (None: the model dtype)."""
        return KVCache(self.kv_heads, max_context, self.head_dim, self.head_dim, kv_dtype or dtype, device)

    def forward(self, x: torch.Tensor, start: int | Positions, cache: KVCache, rope: RotaryTable) -> torch.Tensor:
        """x [T, H] at positions start.. -> [T, H]; start: a host int, or device Positions (model/positions.py)."""
        T = x.shape[0]
        q, k, v = self.qkv(x)  # [T, heads*hd (x2 with the gate)], [T, kv*hd] x2
        if self.output_gate:
            q, gate = q.reshape(T, self.heads, 2, self.head_dim).unbind(2)  # [T, heads, hd] each
            q, gate = q.reshape(T, self.heads * self.head_dim), gate.reshape(T, self.heads * self.head_dim)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(T, self.heads, self.head_dim)
        k = k.view(T, self.kv_heads, self.head_dim)
        v = v.view(T, self.kv_heads, self.head_dim)
        if self.qk_norm == "head" and not self.qk_norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_layer:
            q, k = rope.apply(q, start, self.rope_interleaved), rope.apply(k, start, self.rope_interleaved)
        if self.qk_norm == "head" and self.qk_norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.l2_eps is not None:
            q, k = l2_norm(q, self.l2_eps), l2_norm(k, self.l2_eps)
        if self.temperature is not None:
            q = (q * query_temperature(start, T, *self.temperature, x.device)[:, None, None]).to(q.dtype)
        keys, values = cache.write(start, k, v)  # [kv, S, hd]
        mask = causal_mask_args(start, T, self.window, x.device, self.chunk)
        if self.sinks is not None:
            out = attention_with_sinks(q.transpose(0, 1), keys, values, self.scale, mask, self.sinks)
        elif T <= GROUPED_MAX_TOKENS:
            group = self.heads // self.kv_heads
            queries = q.transpose(0, 1).reshape(self.kv_heads, group, T, self.head_dim)
            out = grouped_attention(queries, keys, values, self.scale, mask).reshape(self.heads, T, self.head_dim)
        else:
            out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, scale=self.scale, **mask,
                                                 enable_gqa=self.heads != self.kv_heads)  # [heads, T, hd]
        out = out.transpose(0, 1).reshape(T, self.heads * self.head_dim)
        if self.output_gate:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out)


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, no weight, in fp32 and cast back (Llama-4's q/k norm)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def query_temperature(start: int | Positions, T: int, floor_scale: float, attn_scale: float, device: torch.device
                      ) -> torch.Tensor:
    """Llama-4's per-position query scale on no-RoPE layers [T] (fp32): 1 + attn_scale * log1p(floor((p + 1) /
    floor_scale)) for positions p = start..start+T-1; it sharpens attention as the context grows."""
    positions = token_positions(start, T, device).to(torch.float32)
    return torch.log1p(torch.floor((positions + 1.0) / floor_scale)) * attn_scale + 1.0


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, mask: dict,
                      rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """q [kv, group, T, d] attends to keys [kv, S, d] and values [kv, S, dv] -> [kv, group, T, dv].

    The `group` query heads that share a KV head become one batch row of group*T queries, so K/V are read in
    place; SDPA's enable_gqa would first copy them `group` times (a fresh [heads, S, d] tensor per layer and
    step). `mask` is causal_mask_args for the T queries. `rope` = (q_rope [kv, group, T, r], k_rope [kv, S, r])
    adds q_rope . k_rope to the scores: MLA's absorbed form reads its latent cache (keys and values at once) and
    its rope keys where they lie instead of concatenating the two every step, a copy of the whole context."""
    kv, group, T, d = q.shape
    S = keys.shape[1]
    if mask.get("is_causal"):
        mask = {"attn_mask": torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)}
    if "attn_mask" in mask:  # [T, S] -> [group*T, S]: the same rows for every head of the group
        mask = {"attn_mask": mask["attn_mask"].expand(group, T, S).reshape(group * T, S)}
    q = q.reshape(kv, group * T, d)
    if q.device.type != "cpu" and rope is None:
        out = F.scaled_dot_product_attention(q, keys, values, scale=scale, **mask)
    else:  # SDPA's CPU dispatch costs 2-4x these three ops at decode sizes
        scores = torch.bmm(q, keys.transpose(1, 2))  # [kv, group*T, S]
        if rope is not None:
            q_rope, k_rope = rope
            scores.baddbmm_(q_rope.reshape(kv, group * T, -1), k_rope.transpose(1, 2))
        scores.mul_(scale)
        if "attn_mask" in mask:
            scores.masked_fill_(~mask["attn_mask"], float("-inf"))
        out = torch.bmm(scores.float().softmax(-1).to(values.dtype), values)
    return out.view(kv, group, T, values.shape[-1])


def attention_with_sinks(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, mask: dict,
                         sinks: torch.Tensor) -> torch.Tensor:
    """q [heads, T, d] attends to keys [kv, S, d] and values [kv, S, dv] -> [heads, T, dv], each head's softmax
    taken over its scores and its sink logit `sinks[h]` (gpt-oss), which then attends to nothing: the weights
    over the keys sum to less than one. `mask` is causal_mask_args for the T queries."""
    heads, T, d = q.shape
    kv, S, _ = keys.shape
    group = heads // kv
    scores = torch.matmul(q.reshape(kv, group * T, d), keys.transpose(1, 2)).view(heads, T, S) * scale
    if mask.get("is_causal"):
        mask = {"attn_mask": torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)}
    if "attn_mask" in mask:
        scores = scores.masked_fill(~mask["attn_mask"], float("-inf"))
    sink = sinks.to(scores.dtype)[:, None, None].expand(heads, T, 1)
    probs = torch.cat([scores, sink], dim=-1).float().softmax(-1)[..., :S].to(values.dtype)  # [heads, T, S]
    return torch.matmul(probs.view(kv, group * T, S), values).view(heads, T, values.shape[-1])

"""Grouped-query attention with optional q/k/v bias, per-head or full-width q/k RMSNorm and clip_qkv."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..weights.source import WeightSource
from .kv_cache import KVCache, causal_mask_args
from .layers import RMSNorm, load_linear
from .rope import RotaryTable


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, src: WeightSource):
        super().__init__()
        p = f"model.layers.{layer}.self_attn"
        H, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = nh, nkv, hd
        self.q_proj = load_linear(src, f"{p}.q_proj", nh * hd, H, cfg.attention_bias)
        self.k_proj = load_linear(src, f"{p}.k_proj", nkv * hd, H, cfg.attention_bias)
        self.v_proj = load_linear(src, f"{p}.v_proj", nkv * hd, H, cfg.attention_bias)
        self.o_proj = load_linear(src, f"{p}.o_proj", H, nh * hd)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            q_dim, k_dim = (hd, hd) if cfg.qk_norm == "head" else (nh * hd, nkv * hd)
            self.q_norm = RMSNorm.load(src, f"{p}.q_norm", q_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm.load(src, f"{p}.k_norm", k_dim, cfg.rms_norm_eps)
        self.clip_qkv = cfg.clip_qkv
        self.window = cfg.sliding_windows[layer] if cfg.sliding_windows else None
        self.scale = hd**-0.5

    def forward(self, x: torch.Tensor, start: int, cache: KVCache, rope: RotaryTable) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [T, heads*hd], [T, kv*hd] x2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(T, self.heads, self.head_dim)
        k = k.view(T, self.kv_heads, self.head_dim)
        v = v.view(T, self.kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope.apply(q, start), rope.apply(k, start)
        keys, values = cache.write(start, k, v)  # [kv, S, hd]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys, values, scale=self.scale, **causal_mask_args(start, T, self.window, x.device),
            enable_gqa=self.heads != self.kv_heads,
        )  # [heads, T, hd]
        return self.o_proj(out.transpose(0, 1).reshape(T, self.heads * self.head_dim))

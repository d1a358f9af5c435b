"""Per-layer sequence state for one sequence, preallocated: full K/V for GQA, the compressed latent for MLA (plus
the indexer's keys under DeepSeek Sparse Attention), a fixed-size recurrent state for Gated DeltaNet.

Every kind is a `LayerCache`: the transformer asks each layer's attention module for its own (`new_cache`), so a
stack may mix kinds. A cache that grows with the context holds every position; a fixed-size state (a recurrent
layer's) holds one point of the sequence, and `resume_point` is how the generation loop learns where a sequence
sharing a prefix with the cached one may continue.
"""
from __future__ import annotations

from typing import Protocol

import torch


class LayerCache(Protocol):
    @property
    def nbytes(self) -> int:
        """Bytes held, whatever has been written so far."""
        ...

    def resume_point(self, common: int) -> int:
        """The largest position p <= common from which this layer can continue a sequence whose first `common`
        tokens equal the ones it has processed (positions p.. are then recomputed and overwritten); 0 = afresh."""
        ...


class KVCache:
    """Keys and values of one attention layer: [kv_heads, max_context, head_dim] each, written in place."""

    def __init__(self, kv_heads: int, max_context: int, k_dim: int, v_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.k = torch.zeros(kv_heads, max_context, k_dim, dtype=dtype, device=device)
        self.v = torch.zeros(kv_heads, max_context, v_dim, dtype=dtype, device=device)

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [T, kv_heads, dim] at positions start..; return all keys/values so far [kv_heads, S, dim]."""
        end = start + k.shape[0]
        self.k[:, start:end] = k.transpose(0, 1)
        self.v[:, start:end] = v.transpose(0, 1)
        return self.k[:, :end], self.v[:, :end]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def resume_point(self, common: int) -> int:
        return common  # every position is kept: resume anywhere in the common prefix


class LatentCache:
    """MLA's cache: the normalised compressed kv [max_context, kv_lora_rank] and the rotated shared rope key
    [max_context, rope_dim] — not the expanded per-head K/V, which would be ~H*(nope+v)/(rank+rope) times larger."""

    def __init__(self, max_context: int, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype, device: torch.device):
        self.c_kv = torch.zeros(max_context, kv_lora_rank, dtype=dtype, device=device)
        self.k_rope = torch.zeros(max_context, rope_dim, dtype=dtype, device=device)

    def write(self, start: int, c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + c_kv.shape[0]
        self.c_kv[start:end] = c_kv
        self.k_rope[start:end] = k_rope
        return self.c_kv[:end], self.k_rope[:end]

    @property
    def nbytes(self) -> int:
        return self.c_kv.nbytes + self.k_rope.nbytes

    def resume_point(self, common: int) -> int:
        return common


class RecurrentState:
    """A linear-attention layer's state: the last kernel-1 inputs of its causal convolution [conv_dim, kernel-1]
    and the per-head matrix state [heads, d_k, d_v] (fp32, as the delta rule accumulates it). Its size does not
    depend on the context; it stands at one position (`position`: tokens folded in) and moves only forward."""

    def __init__(self, conv_dim: int, conv_kernel: int, heads: int, k_dim: int, v_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.conv = torch.zeros(conv_dim, conv_kernel - 1, dtype=dtype, device=device)
        self.state = torch.zeros(heads, k_dim, v_dim, dtype=torch.float32, device=device)
        self.position = 0

    def begin(self, start: int) -> None:
        """Before folding in tokens at positions start..: a prefill at 0 starts afresh; any other start must be
        where the state stands (it cannot be rewound)."""
        if start == 0:
            self.conv.zero_()
            self.state.zero_()
            self.position = 0
        elif start != self.position:
            raise ValueError(f"a recurrent layer state stands at position {self.position}, not {start}: continue "
                             f"from {self.position} or start again at 0")

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.state.nbytes

    def resume_point(self, common: int) -> int:
        return common if common == self.position else 0  # only the point it stands at was saved


class LatentIndexCache(LatentCache):
    """MLA's latent cache plus the lightning indexer's keys [max_context, index_head_dim] (DeepSeek Sparse
    Attention): one small single-head key per position, which the indexer scores every query against."""

    def __init__(self, max_context: int, kv_lora_rank: int, rope_dim: int, index_head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__(max_context, kv_lora_rank, rope_dim, dtype, device)
        self.index_k = torch.zeros(max_context, index_head_dim, dtype=dtype, device=device)

    def write_index_keys(self, start: int, k: torch.Tensor) -> torch.Tensor:
        """Store indexer keys k [T, index_head_dim] at positions start..; return all so far [S, index_head_dim]."""
        end = start + k.shape[0]
        self.index_k[start:end] = k
        return self.index_k[:end]

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.index_k.nbytes


def causal_mask_args(start: int, T: int, window: int | None, device: torch.device, chunk: int | None = None) -> dict:
    """SDPA keyword arguments that make T queries at positions start.. attend causally to the start+T cached keys,
    optionally only to the last `window` of them, or only to those in their own `chunk` of positions (Llama-4's
    chunked attention: positions 0..chunk-1, chunk..2*chunk-1, ...).

    A fresh prefill uses SDPA's built-in causal mode (fast kernels); one token without a window needs no mask;
    anything else gets a boolean [T, start+T] mask (True = attend).
    """
    limit = window if chunk is None else chunk
    if (window is None and chunk is None) or start + T <= limit:
        if T == 1:
            return {}
        if start == 0:
            return {"is_causal": True}
    q_pos = torch.arange(start, start + T, device=device)[:, None]
    k_pos = torch.arange(start + T, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    if chunk is not None:
        mask &= k_pos // chunk == q_pos // chunk
    return {"attn_mask": mask}

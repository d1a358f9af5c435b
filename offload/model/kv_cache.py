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

from .positions import Positions, attended_length, token_positions


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

    def write(self, start: int | Positions, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [T, kv_heads, dim] at positions start..; return the keys/values attention reads
        [kv_heads, S, dim] (S: up to the last written position, or the context bucket)."""
        keys = write_positions(self.k, start, k.transpose(0, 1), 1)
        return keys, write_positions(self.v, start, v.transpose(0, 1), 1)

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

    def write(self, start: int | Positions, c_kv: torch.Tensor, k_rope: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store c_kv [T, rank] and k_rope [T, rope] at positions start..; return the parts attention reads in
        place, [S, rank] and [S, rope]."""
        return write_positions(self.c_kv, start, c_kv, 0), write_positions(self.k_rope, start, k_rope, 0)

    @property
    def nbytes(self) -> int:
        return self.c_kv.nbytes + self.k_rope.nbytes

    def resume_point(self, common: int) -> int:
        return common


class RecurrentState:
    """A linear-attention layer's state: the last kernel-1 inputs of its causal convolution [conv_dim, kernel-1]
    and the per-head matrix state [heads, d_k, d_v] (fp32, as the delta rule accumulates it). Its size does not
    depend on the context; it stands at one position (`position`: tokens folded in, a host count the forward
    advances: a replayed CUDA graph runs no Python, so whatever replays a step advances it) and moves only forward."""

    def __init__(self, conv_dim: int, conv_kernel: int, heads: int, k_dim: int, v_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.conv = torch.zeros(conv_dim, conv_kernel - 1, dtype=dtype, device=device)
        self.state = torch.zeros(heads, k_dim, v_dim, dtype=torch.float32, device=device)
        self.position = 0

    def begin(self, start: int | Positions) -> None:
        """Before folding in tokens at positions start..: a prefill at 0 starts afresh; any other start must be
        where the state stands (it cannot be rewound). Device Positions continue from where it stands: the
        recurrence needs no position, and checking one would read it back."""
        if isinstance(start, Positions):
            return
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
                 device: torch.device, index_dtype: torch.dtype | None = None):
        super().__init__(max_context, kv_lora_rank, rope_dim, dtype, device)
        self.index_k = torch.zeros(max_context, index_head_dim, dtype=index_dtype or dtype, device=device)

    def write_index_keys(self, start: int | Positions, k: torch.Tensor) -> torch.Tensor:
        """Store indexer keys k [T, index_head_dim] at positions start..; return those the indexer scores
        [S, index_head_dim]."""
        return write_positions(self.index_k, start, k, 0)

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.index_k.nbytes


def write_positions(buffer: torch.Tensor, start: int | Positions, values: torch.Tensor, dim: int) -> torch.Tensor:
    """Store `values` at positions start.. along `dim` of a cache buffer; return the buffer's prefix that attention
    reads: up to the last written position, or (device positions) the whole context bucket, a view whose size
    does not change within the bucket. A buffer of another dtype than the values (a bf16 cache of a float32
    model: load's kv_cache) stores them rounded to its dtype and returns the prefix widened to theirs, a copy."""
    T = values.shape[dim]
    if isinstance(start, Positions):
        buffer.index_copy_(dim, start.tokens(T), values.to(buffer.dtype))
    else:
        buffer.narrow(dim, start, T).copy_(values)
    prefix = buffer.narrow(dim, 0, attended_length(start, T))
    return prefix if prefix.dtype == values.dtype else prefix.to(values.dtype)


def causal_mask_args(start: int | Positions, T: int, window: int | None, device: torch.device,
                     chunk: int | None = None) -> dict:
    """SDPA keyword arguments that make T queries at positions start.. attend causally to the cached keys they
    read (attended_length: start+T, or the context bucket), optionally only to the last `window` of them, or only
    to those in their own `chunk` of positions (Llama-4's chunked attention: positions 0..chunk-1, ...).

    A fresh prefill uses SDPA's built-in causal mode (fast kernels); one token without a window needs no mask;
    anything else, and every step with device positions (whose keys run past the query), gets a boolean
    [T, S] mask (True = attend), built on the device.
    """
    limit = window if chunk is None else chunk
    if not isinstance(start, Positions) and ((window is None and chunk is None) or start + T <= limit):
        if T == 1:
            return {}
        if start == 0:
            return {"is_causal": True}
    q_pos = token_positions(start, T, device)[:, None]
    k_pos = torch.arange(attended_length(start, T), device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    if chunk is not None:
        mask &= k_pos // chunk == q_pos // chunk
    return {"attn_mask": mask}

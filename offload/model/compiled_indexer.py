"""The lightning indexer's side of the compiled decode step (DeepSeek Sparse Attention): its arguments to
csrc_py.indexer_step.index_step, prepared once per layer (offload.model.compiled_step's MLA plan carries them)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .indexer import LightningIndexer
from .layers import QuantLinear


@dataclass
class IndexerPlan:
    """A LightningIndexer's weights as index_step takes them (packed projections without bias)."""

    wq_b: tuple  # packed (q, d, m)
    wk: tuple
    k_norm: tuple  # (weight [d], bias [d], eps)
    weights_proj: np.ndarray  # [n, H] float32
    dims: tuple[int, int, int, int]  # (heads, head_dim, topk, interleaved RoPE)
    widths: tuple[int, int]  # padded wk out, padded wq_b out

    @classmethod
    def build(cls, ix: LightningIndexer) -> IndexerPlan | None:
        """None where the compiled stage does not cover this indexer (torch weights)."""
        if not all(isinstance(m, QuantLinear) and m.bias is None for m in (ix.wq_b, ix.wk)) or \
                ix.weights_proj.dtype != torch.float32:
            return None
        norm = tuple(t.detach().to(torch.float32).contiguous().numpy() for t in (ix.k_norm.weight, ix.k_norm.bias))
        return cls(ix.wq_b.packed.kernel_tuple(), ix.wk.packed.kernel_tuple(), (*norm, float(ix.k_norm.eps)),
                   ix.weights_proj.detach().contiguous().numpy(), (ix.heads, ix.head_dim, ix.topk, int(ix.interleaved)),
                   (ix.wk.packed.padded_shape[1], ix.wq_b.packed.padded_shape[1]))

    def args(self, T: int, positions: int) -> tuple:
        """index_step's `indexer` argument with buffers for T queries over a cache of `positions`."""
        heads = self.dims[0]
        scratch = (np.zeros((T, self.widths[0]), np.float32), np.zeros((T, self.widths[1]), np.float32),
                   np.zeros((T, heads), np.float32), np.zeros((T, positions), np.float32))
        return self.wq_b, self.wk, self.k_norm, self.weights_proj, self.dims, scratch

"""The lightning indexer's compiled stage (csrc_py.indexer_step) against its torch form (offload/model/indexer.py):
each piece, then the whole stage on tiny DeepSeek-V3.2 / GLM-5 layers at contexts below and above the top-k, one
token and short chunks, and over a cache whose later positions hold a longer, abandoned sequence (a reused prefix).
The whole decode step through it is in tests/test_decode_step.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import offload
from offload.model.compiled_indexer import IndexerPlan
from offload.model.indexer import index_scores, select_positions
from offload.model.layers import LayerNorm
from tiny_models import rel_err

import csrc_py  # noqa: F401  (torch before numba)
from csrc_py import indexer_step as ixs

GEN = torch.Generator().manual_seed(11)
CPU = torch.device("cpu")


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


def causal_sets(selection: torch.Tensor, start: int) -> list[set[int]]:
    """Each query's selected causal positions (later ones, given to a query with fewer than k, are masked)."""
    return [{p for p in row.tolist() if p <= start + t} for t, row in enumerate(selection)]


def test_layer_norm_matches_the_module():
    x, w, b = randn(3, 16) * 3 + 1, randn(16), randn(16)
    out = np.empty((3, 16), np.float32)
    ixs.layer_norm(x.numpy(), w.numpy(), b.numpy(), 1e-6, out)
    assert rel_err(torch.from_numpy(out), LayerNorm(w, b, 1e-6)(x)) < 1e-6


@pytest.mark.parametrize("T, S", [(1, 7), (1, 300), (3, 130)])
def test_index_scores_match_the_torch_form(T, S):
    heads, d = 5, 16
    q, keys, weights = randn(T, heads, d), randn(S + 9, d), randn(T, heads)  # keys past S must not be read
    scores = np.full((T, S + 9), np.nan, np.float32)
    ixs.index_scores(q.reshape(T, heads * d).numpy(), heads, d, keys.numpy(), S, weights.numpy(), scores)
    assert rel_err(torch.from_numpy(scores[:, :S]), index_scores(q, keys[:S], weights)) < 1e-6
    assert np.isnan(scores[:, S:]).all()


@pytest.mark.parametrize("T, start, k", [(1, 40, 8), (1, 8, 8), (4, 9, 12), (2, 500, 64)])
def test_top_positions_match_select_positions(T, start, k):
    """One query, and chunks whose first queries have fewer than k causal positions (they also get later ones)."""
    heads, d, S = 4, 8, start + T
    q, keys, weights = randn(T, heads, d), randn(S, d), randn(T, heads)
    expected = select_positions(q, keys, weights, start, k)
    scores = index_scores(q, keys, weights).numpy()
    got = np.empty((T, k), np.int64)
    for t in range(T):
        ixs.top_positions(scores[t], start + t + 1, k, got[t])
    assert causal_sets(torch.from_numpy(got), start) == causal_sets(expected, start)
    assert all(len(set(row)) == k and np.all(np.diff(row) > 0) for row in got)  # k distinct positions, ascending


def test_a_tie_at_the_kth_score_keeps_the_lower_positions():
    scores = np.array([0.5, 0.0, 2.0, 0.0, 0.0, 1.0, -1.0], np.float32)  # three zeros for two places
    got = np.empty(4, np.int64)
    ixs.top_positions(scores, 7, 4, got)
    assert got.tolist() == [0, 1, 2, 5]


@pytest.fixture(scope="module")
def indexer_layer(checkpoint_dir):
    models = {}

    def get(name: str, dense: str):
        if (name, dense) not in models:
            folder, _ = checkpoint_dir(name)
            models[name, dense] = offload.load(folder, device="cpu", experts=dense, dense=dense, max_context=64)
        model = models[name, dense]
        return model.transformer.layers[0].attn, model.transformer.rope

    return get


def run_stage(attn, rope, plan: IndexerPlan, x: torch.Tensor, q_latent: torch.Tensor, start: int, cache
              ) -> torch.Tensor | None:
    """index_step over x [T, H] at positions start.. with cache's index keys -> the selection (None: all)."""
    T = x.shape[0]
    selection = np.full((T, plan.dims[2]), -1, np.int64)
    selected = ixs.index_step(x.numpy(), q_latent.numpy(), start, rope.cos.numpy(), rope.sin.numpy(),
                              plan.args(T, cache.index_k.shape[0]), cache.index_k.numpy(), selection)
    assert selected in (0, plan.dims[2])
    return torch.from_numpy(selection) if selected else None


# (family, dense format): DeepSeek-V3.2 rotates halves, GLM-5 interleaved pairs; int8, int4 and symmetric int4s
@pytest.mark.parametrize("name, dense", [("deepseek_v32", "int8"), ("glm_moe_dsa", "int4"), ("deepseek_v32", "int4s")])
def test_index_step_equals_the_torch_indexer(indexer_layer, name, dense):
    """Step by step through a context crossing top-k (a prefill, single tokens, a chunk of 3 across the boundary),
    then back to an earlier position over the same caches (a reused prefix: later keys are stale): the same keys
    written and the same positions selected."""
    attn, rope = indexer_layer(name, dense)
    ix = attn.indexer
    plan = IndexerPlan.build(ix)
    assert plan is not None
    topk, H = ix.topk, attn.input_projs.packed.shape[2]
    first, second = randn(40, H), randn(40, H)  # the second sequence shares the first's 20 positions
    second[:20] = first[:20]
    torch_cache, compiled_cache = (attn.new_cache(64, torch.float32, CPU) for _ in range(2))
    spans = [(first, 0, 3), *((first, i, i + 1) for i in range(3, topk - 1)), (first, topk - 1, topk + 2),
             *((first, i, i + 1) for i in range(topk + 2, 40)), (second, 20, 21), (second, 21, 24)]
    sparse_steps = 0
    for x, begin, end in spans:
        with torch.inference_mode():
            q_latent = attn.q_a_norm(attn.input_projs(x)[0])
        with torch.inference_mode():
            expected = ix(x[begin:end], q_latent[begin:end], begin, torch_cache, rope)
        got = run_stage(attn, rope, plan, x[begin:end], q_latent[begin:end], begin, compiled_cache)
        assert rel_err(compiled_cache.index_k[:end], torch_cache.index_k[:end]) < 1e-5
        assert (got is None) == (expected is None), (begin, end)
        if expected is not None:
            assert causal_sets(got, begin) == causal_sets(expected, begin), (begin, end)
            sparse_steps += 1
    assert sparse_steps == 40 - topk - 1 + 2  # the chunk across top-k, the single steps past it, the rewind

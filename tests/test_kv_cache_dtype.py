"""load's kv_cache: the caches that grow with the context kept as bf16 on a float32 model (the compiled step's
side: test_decode_step's bf16 cache tests)."""
from __future__ import annotations

import pytest
import torch

import offload
from offload.errors import OffloadError
from offload.model.kv_cache import LatentIndexCache
from tiny_models import rel_err

IDS = torch.arange(3, 23)


def stepped_logits(model) -> torch.Tensor:
    """A prefill of 8 tokens, then the rest one token per forward: each step reads what the cache holds."""
    with torch.inference_mode():
        rows = [model.transformer(IDS[:8], 0)]
        rows += [model.transformer(IDS[i: i + 1], i) for i in range(8, len(IDS))]
    return torch.cat(rows)


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v2", "deepseek_v32"])
def test_a_bf16_kv_cache_halves_the_cache_and_moves_the_logits_by_bf16_rounding(checkpoint_dir, name):
    """The torch path over a bf16 cache (read back widened to float32): half the cache bytes (the lightning
    indexer's keys stay float32), logits within bf16's rounding of the float32 cache's, and not equal to them: the
    values really are rounded."""
    folder, _ = checkpoint_dir(name)
    full = offload.load(folder, device="cpu", max_context=64)
    half = offload.load(folder, device="cpu", max_context=64, kv_cache="bf16")
    for f, h in zip(full.transformer.caches, half.transformer.caches):
        index_bytes = f.index_k.nbytes if isinstance(f, LatentIndexCache) else 0
        assert h.nbytes - index_bytes == (f.nbytes - index_bytes) // 2
        if index_bytes:
            assert h.index_k.dtype == torch.float32
    expected, got = stepped_logits(full), stepped_logits(half)
    assert 0 < rel_err(got, expected) < 2e-2


def test_an_unknown_kv_cache_dtype_is_refused_before_any_weight_is_read(checkpoint_dir, monkeypatch):
    folder, _ = checkpoint_dir("qwen3_moe")
    monkeypatch.setattr("offload.api.WeightSource", None)  # reading a weight would fail with a TypeError
    with pytest.raises(OffloadError, match="kv_cache must be one of float32, bf16, got 'fp8'"):
        offload.load(folder, device="cpu", kv_cache="fp8")

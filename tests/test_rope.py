"""The rotary table turns the channels transformers turns: a whole head, or only its first part (partial RoPE,
GLM-4.x), the rest passing through unchanged."""
from __future__ import annotations

import pytest
import torch
from transformers import Glm4MoeConfig
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeRotaryEmbedding, apply_rotary_pos_emb

from offload.config import RopeConfig
from offload.model.rope import RotaryTable

YARN = {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize("rope", [{"rope_type": "default", "rope_theta": 500.0}, YARN])
@pytest.mark.parametrize("head_dim, rope_dim", [(32, 32), (32, 16), (24, 6)])
def test_partial_rotation_matches_transformers(head_dim, rope_dim, rope):
    config = Glm4MoeConfig(hidden_size=64, num_attention_heads=2, head_dim=head_dim, max_position_embeddings=64,
                           rope_parameters={**rope, "partial_rotary_factor": rope_dim / head_dim})
    start, T = 29, 7
    gen = torch.Generator().manual_seed(head_dim + rope_dim)
    q, k = torch.randn(T, 3, head_dim, generator=gen), torch.randn(T, 1, head_dim, generator=gen)
    cos, sin = Glm4MoeRotaryEmbedding(config)(q, torch.arange(start, start + T)[None])  # [1, T, rope_dim]
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)  # [1, h, T, d]

    ours = RopeConfig(theta=500.0, type=rope["rope_type"], factor=rope.get("factor", 1.0),
                      original_max_position_embeddings=rope.get("original_max_position_embeddings"))
    table = RotaryTable(ours, rope_dim, 64, torch.device("cpu"), torch.float32)
    assert table.dim == rope_dim
    torch.testing.assert_close(table.apply(q, start), q_ref[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(table.apply(k, start), k_ref[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    assert torch.equal(table.apply(q, start)[..., rope_dim:], q[..., rope_dim:])


@pytest.mark.parametrize("low, high", [(1.0, 4.0), (1.0, 1.0), (2.0, 8.0)])
def test_llama3_frequencies_are_transformers(low, high):
    """Llama-3 rope scaling (Llama-3.1, Llama-4 Scout): long wavelengths stretched, short kept, a band blended."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from offload.model.rope import inverse_frequencies

    params = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": low,
              "high_freq_factor": high, "original_max_position_embeddings": 64}
    config = LlamaConfig(hidden_size=128, num_attention_heads=2, max_position_embeddings=512, rope_parameters=params)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = RopeConfig(theta=10000.0, type="llama3", factor=8.0, original_max_position_embeddings=64,
                      low_freq_factor=low, high_freq_factor=high)
    inv_freq, scale = inverse_frequencies(ours, 64)
    torch.testing.assert_close(inv_freq, expected, rtol=1e-6, atol=0)
    assert scale == 1.0 and not torch.equal(inv_freq, inverse_frequencies(RopeConfig(theta=10000.0), 64)[0])

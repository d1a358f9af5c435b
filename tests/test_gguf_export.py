"""tools/gguf_export.py: a tiny transformers Mixtral exported to GGUF and read back with gguf.GGUFReader."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import gguf_export  # noqa: E402

Q8_0, Q4_0, F16, F32 = (gguf.GGMLQuantizationType[n] for n in ("Q8_0", "Q4_0", "F16", "F32"))
SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def write_mixtral(folder: Path, **overrides) -> dict[str, torch.Tensor]:
    """A random transformers Mixtral saved as a checkpoint folder; returns its state dict (float32)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(**{**SHAPE, **overrides})
    model = transformers.MixtralForCausalLM(config).eval()
    model.save_pretrained(folder)
    from safetensors.torch import load_file
    return load_file(folder / "model.safetensors")


def read(path: Path) -> tuple[dict[str, object], dict[str, gguf.ReaderTensor]]:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def values(tensor) -> np.ndarray:
    """A GGUF tensor dequantized to float32 in PyTorch dimension order."""
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape.tolist())))


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixtral")
    weights = write_mixtral(folder)
    out = gguf_export.export(folder, folder / "q8_0.gguf", "q8_0", log=lambda _: None)
    return folder, weights, read(out)


def expected_shapes(hidden=64, inter=64, experts=4, vocab=96, kv=32) -> dict[str, tuple[int, ...]]:
    """GGUF shapes (ne order: the row length first) of the tiny model's tensors."""
    shapes = {"token_embd.weight": (hidden, vocab), "output_norm.weight": (hidden,), "output.weight": (hidden, vocab)}
    for i in range(2):
        shapes |= {f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
                   f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (hidden, kv),
                   f"blk.{i}.attn_v.weight": (hidden, kv), f"blk.{i}.attn_output.weight": (hidden, hidden),
                   f"blk.{i}.ffn_gate_inp.weight": (hidden, experts),
                   f"blk.{i}.ffn_gate_exps.weight": (hidden, inter, experts),
                   f"blk.{i}.ffn_up_exps.weight": (hidden, inter, experts),
                   f"blk.{i}.ffn_down_exps.weight": (inter, hidden, experts)}
    return shapes


def test_tensor_names_shapes_and_types(mixtral):
    _, _, (_, tensors) = mixtral
    expected = expected_shapes()
    assert set(tensors) == set(expected)
    for name, shape in expected.items():
        assert tuple(tensors[name].shape.tolist()) == shape, name
        kept_f32 = len(shape) == 1 or "ffn_gate_inp" in name  # norms and the router
        assert tensors[name].tensor_type == (F32 if kept_f32 else Q8_0), name


def test_metadata(mixtral):
    _, _, (fields, _) = mixtral
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    expected = {"context_length": 256, "embedding_length": 64, "block_count": 2, "feed_forward_length": 64,
                "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 16,
                "expert_count": 4, "expert_used_count": 2, "vocab_size": 96}
    for key, value in expected.items():
        assert fields[f"llama.{key}"] == value, key
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert fields["tokenizer.ggml.model"] == "llama"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == 96 and len(set(tokens)) == 96
    assert (tokens[1], tokens[2]) == ("<s>", "</s>")
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)


def test_q8_0_experts_dequantize_to_the_hf_weights(mixtral):
    _, weights, (_, tensors) = mixtral
    for proj, name in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
        hf = torch.stack([weights[f"model.layers.1.block_sparse_moe.experts.{e}.{proj}.weight"] for e in range(4)])
        got = values(tensors[f"blk.1.{name}.weight"])
        assert got.shape == hf.shape
        # Q8_0: one scale per 32 values, |error| <= scale / 2 = absmax / 254 (plus the f16 scale's rounding)
        assert np.abs(got - hf.numpy()).max() <= hf.abs().max().item() / 254 * 1.01
    router = values(tensors["blk.0.ffn_gate_inp.weight"])
    np.testing.assert_array_equal(router, weights["model.layers.0.block_sparse_moe.gate.weight"].numpy())


def test_q_and_k_rows_are_permuted_for_llama_cpp_rope(mixtral):
    _, weights, (_, tensors) = mixtral
    for proj, name, heads in (("q_proj", "attn_q", 4), ("k_proj", "attn_k", 2)):
        hf = weights[f"model.layers.0.self_attn.{proj}.weight"].numpy()
        got = values(tensors[f"blk.0.{name}.weight"])
        np.testing.assert_allclose(gguf_export.unpermute_for_rope(got, heads), hf, atol=np.abs(hf).max() / 250)
        assert not np.allclose(got, hf, atol=np.abs(hf).max() / 250)  # the layout did change


def rope_rotate_half(x: np.ndarray, pos: int, base: float) -> np.ndarray:
    """Hugging Face's rope on one head [d]: dimension i pairs with i + d/2."""
    d = x.shape[-1]
    angle = pos * base ** (-np.arange(0, d, 2) / d)
    cos, sin = np.tile(np.cos(angle), 2), np.tile(np.sin(angle), 2)
    return x * cos + np.concatenate([-x[d // 2:], x[: d // 2]]) * sin


def rope_interleaved(x: np.ndarray, pos: int, base: float) -> np.ndarray:
    """llama.cpp's normal rope (the 'llama' architecture) on one head [d]: dimension 2i pairs with 2i + 1."""
    d = x.shape[-1]
    angle = pos * base ** (-np.arange(0, d, 2) / d)
    even, odd = x[0::2], x[1::2]
    out = np.empty_like(x)
    out[0::2], out[1::2] = even * np.cos(angle) - odd * np.sin(angle), even * np.sin(angle) + odd * np.cos(angle)
    return out


def test_permuted_projections_give_the_same_attention_scores_under_llama_cpp_rope():
    rng = np.random.default_rng(0)
    heads, d, hidden = 2, 8, 16
    wq, wk, x, y = rng.normal(size=(heads * d, hidden)), rng.normal(size=(heads * d, hidden)), *rng.normal(size=(2, hidden))
    pq, pk = gguf_export.permute_for_rope(wq, heads), gguf_export.permute_for_rope(wk, heads)
    for h in range(heads):
        rows = slice(h * d, (h + 1) * d)
        hf = rope_rotate_half(wq[rows] @ x, 5, 1e4) @ rope_rotate_half(wk[rows] @ y, 2, 1e4)
        llama = rope_interleaved(pq[rows] @ x, 5, 1e4) @ rope_interleaved(pk[rows] @ y, 2, 1e4)
        assert llama == pytest.approx(hf)


def test_q4_0_experts_with_q8_0_dense_and_f16_fallback(tmp_path):
    write_mixtral(tmp_path, intermediate_size=48)  # down_proj rows of 48 values: not whole 32-value blocks
    notes: list[str] = []
    _, tensors = read(gguf_export.export(tmp_path, tmp_path / "q4.gguf", "q4_0", "q8_0", log=notes.append))
    assert tensors["blk.0.ffn_gate_exps.weight"].tensor_type == Q4_0
    assert tensors["blk.0.ffn_down_exps.weight"].tensor_type == F16
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q8_0
    assert tensors["output.weight"].tensor_type == Q8_0
    assert any("blk.0.ffn_down_exps.weight" in note and "F16" in note for note in notes)

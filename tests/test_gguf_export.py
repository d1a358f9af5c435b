"""tools/gguf_export.py: tiny transformers Mixtral, Qwen3-MoE and DeepSeek-V2 checkpoints exported to GGUF, read
back with gguf.GGUFReader, and run by llama.cpp (llama-cpp-python, where importable) against transformers."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import gguf_architectures  # noqa: E402
import gguf_export  # noqa: E402
from tiny_models import write_checkpoint  # noqa: E402

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
        np.testing.assert_allclose(gguf_architectures.unpermute_for_rope(got, heads), hf, atol=np.abs(hf).max() / 250)
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
    wq, wk = rng.normal(size=(2, heads * d, hidden))
    x, y = rng.normal(size=(2, hidden))
    pq, pk = gguf_architectures.permute_for_rope(wq, heads), gguf_architectures.permute_for_rope(wk, heads)
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


# ---------------------------------------------------------------- Qwen3-MoE and DeepSeek-V2 (MLA)

# The tiny variants llama.cpp runs as the same model: every Qwen3-MoE layer sparse (with and without YaRN);
# DeepSeek-V2 with a plain q_proj, a dense first layer and two shared experts, and with q_a/q_b and YaRN as
# DeepSeek-V2-Lite publishes it (mscale == mscale_all_dim).
LITE_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
             "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}
LLAMA_CPP_CASES = {
    "mixtral": ("mixtral", None),
    "qwen3_moe": ("qwen3_moe", dict(mlp_only_layers=[])),
    "qwen3_moe_yarn": ("qwen3_moe", dict(mlp_only_layers=[], rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64})),
    "deepseek_v2": ("deepseek_v2", None),
    "deepseek_v2_q_lora_yarn": ("deepseek_v2_group_yarn", dict(topk_method="greedy", n_group=1, topk_group=1,
                                                               rope_parameters=LITE_YARN)),
}
PROMPT = [5, 17, 33, 2, 71, 9, 60, 44, 28, 90, 13, 51]
STEPS = 5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (transformers model, F32 GGUF path, fields, tensors) for every LLAMA_CPP_CASES variant."""
    out = {}
    for name, (variant, overrides) in LLAMA_CPP_CASES.items():
        folder = tmp_path_factory.mktemp(name)
        ref = write_checkpoint(variant, folder, overrides=overrides)
        path = gguf_export.export(folder, folder / "f32.gguf", "f32", log=lambda _: None)
        out[name] = (ref, path, *read(path))
    return out


def test_qwen3_moe_tensors_and_keys(exported):
    ref, _, fields, tensors = exported["qwen3_moe"]
    assert fields["general.architecture"] == "qwen3moe"
    expected = {"block_count": 3, "embedding_length": 64, "attention.head_count": 4, "attention.head_count_kv": 2,
                "attention.key_length": 24, "attention.value_length": 24, "rope.dimension_count": 24,
                "expert_count": 8, "expert_used_count": 3, "expert_feed_forward_length": 32}
    for key, value in expected.items():
        assert fields[f"qwen3moe.{key}"] == value, key
    state = ref.state_dict()
    np.testing.assert_array_equal(values(tensors["blk.2.attn_q_norm.weight"]),
                                  state["model.layers.2.self_attn.q_norm.weight"].numpy())
    np.testing.assert_array_equal(values(tensors["blk.0.attn_k.weight"]),  # no rope permutation: NEOX rope
                                  state["model.layers.0.self_attn.k_proj.weight"].numpy())
    assert tuple(tensors["blk.1.ffn_down_exps.weight"].shape.tolist()) == (32, 64, 8)
    assert "output.weight" in tensors and "blk.0.ffn_gate.weight" not in tensors


def test_deepseek_v2_mla_tensors_and_keys(exported):
    ref, _, fields, tensors = exported["deepseek_v2"]
    assert fields["general.architecture"] == "deepseek2"
    expected = {"attention.head_count": 4, "attention.head_count_kv": 1, "attention.key_length": 16 + 8,
                "attention.value_length": 16, "attention.key_length_mla": 12 + 8, "attention.value_length_mla": 10,
                "attention.kv_lora_rank": 16, "attention.q_lora_rank": 0, "rope.dimension_count": 8,
                "leading_dense_block_count": 1, "expert_shared_count": 2, "expert_feed_forward_length": 24,
                "feed_forward_length": 80, "expert_count": 8, "expert_used_count": 2}
    for key, value in expected.items():
        assert fields[f"deepseek2.{key}"] == value, key
    assert fields["deepseek2.expert_weights_scale"] == pytest.approx(1.5)
    assert fields["deepseek2.expert_gating_func"] == gguf.ExpertGatingFuncType.SOFTMAX
    assert "blk.0.ffn_gate.weight" in tensors and "blk.0.ffn_gate_exps.weight" not in tensors  # the dense layer
    assert {"blk.1.ffn_up_shexp.weight", "blk.1.ffn_gate_exps.weight", "blk.1.attn_q.weight"} <= set(tensors)
    assert "blk.1.attn_kv_b.weight" not in tensors and "blk.1.attn_q_a.weight" not in tensors
    # kv_b_proj [heads * (nope + v), kv_lora] = per head: k_b transposed back, then v_b
    k_b, v_b = values(tensors["blk.1.attn_k_b.weight"]), values(tensors["blk.1.attn_v_b.weight"])
    assert k_b.shape == (4, 16, 12) and v_b.shape == (4, 10, 16)
    rebuilt = np.concatenate([k_b.swapaxes(1, 2), v_b], axis=1).reshape(4 * 22, 16)
    np.testing.assert_array_equal(rebuilt, ref.state_dict()["model.layers.1.self_attn.kv_b_proj.weight"].numpy())


def test_deepseek_v2_q_lora_and_yarn_keys(exported):
    _, _, fields, tensors = exported["deepseek_v2_q_lora_yarn"]
    assert fields["deepseek2.attention.q_lora_rank"] == 20
    assert {"blk.0.attn_q_a.weight", "blk.0.attn_q_a_norm.weight", "blk.0.attn_q_b.weight"} <= set(tensors)
    assert "blk.0.attn_q.weight" not in tensors
    assert fields["deepseek2.leading_dense_block_count"] == 0 and "blk.0.ffn_gate_exps.weight" in tensors
    assert fields["deepseek2.rope.scaling.type"] == "yarn"
    assert fields["deepseek2.rope.scaling.factor"] == pytest.approx(4.0)
    assert fields["deepseek2.rope.scaling.original_context_length"] == 64
    assert fields["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.0707)


def test_group_limited_routing_keys_with_a_note(tmp_path):
    write_checkpoint("deepseek_v2_group_yarn", tmp_path)  # 2 of 4 groups, mscale 0.707 != mscale_all_dim 1.0
    notes: list[str] = []
    fields, _ = read(gguf_export.export(tmp_path, tmp_path / "q8.gguf", "q8_0", log=notes.append))
    assert (fields["deepseek2.expert_group_count"], fields["deepseek2.expert_group_used_count"]) == (4, 2)
    assert any("top-2" in note for note in notes) and any("mscale" in note for note in notes)


@pytest.mark.parametrize("overrides, field", [(dict(norm_topk_prob=False), "norm_topk_prob"),
                                              (dict(mlp_only_layers=[1]), "mlp_only_layers"),
                                              (dict(mlp_only_layers=[], attention_bias=True), "attention_bias")])
def test_qwen3_moe_configs_llama_cpp_cannot_run_are_refused(tmp_path, overrides, field):
    write_checkpoint("qwen3_moe", tmp_path, overrides=overrides)
    with pytest.raises(gguf_architectures.ExportError, match=field):
        gguf_export.export(tmp_path, tmp_path / "x.gguf", "q8_0", log=lambda _: None)
    assert not (tmp_path / "x.gguf").exists()


def test_cli_refuses_an_unsupported_model_type_with_one_line_and_exit_2(tmp_path):
    import subprocess

    write_checkpoint("olmoe", tmp_path)
    proc = subprocess.run([sys.executable, str(Path(gguf_export.__file__)), str(tmp_path), str(tmp_path / "x.gguf")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: model_type 'olmoe' is not exported to GGUF; supported: mixtral, qwen3_moe, deepseek_v2"]


def llama_cpp_greedy(path: Path, prompt: list[int], steps: int) -> np.ndarray:
    """llama.cpp's last-position logits [steps, vocab] after the prompt and after each greedy token, with an F32
    KV cache (its default F16 cache would round K and V)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    f32 = int(gguf.GGMLQuantizationType.F32)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_ubatch=64, n_threads=1, type_k=f32,
                          type_v=f32, verbose=False)
    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy()

    llm.eval(prompt)
    logits = [last_logits()]
    for _ in range(steps - 1):
        llm.eval([int(logits[-1].argmax())])
        logits.append(last_logits())
    llm.close()
    return np.stack(logits)


def transformers_greedy(ref, prompt: list[int], steps: int) -> np.ndarray:
    """The transformers model's last-position logits [steps, vocab] along its own greedy generation."""
    ids, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits.append(ref(torch.tensor([ids])).logits[0, -1].numpy())
            ids.append(int(logits[-1].argmax()))
    return np.stack(logits)


@pytest.mark.parametrize("name", list(LLAMA_CPP_CASES))
def test_llama_cpp_runs_the_f32_export_as_transformers(exported, name):
    """The exported GGUF is the same model to llama.cpp: next-token logits within fp32 rounding of transformers'
    (measured max |error| / max |logit|: 4e-7 to 6e-7 on these variants; 7e-4 to 1e-3 from an F16 export), and
    the same greedy tokens."""
    ref, path, _, _ = exported[name]
    got, expected = llama_cpp_greedy(path, PROMPT, STEPS), transformers_greedy(ref, PROMPT, STEPS)
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-5


def test_a_missing_tensor_is_named_before_anything_is_written(tmp_path):
    from safetensors.torch import load_file, save_file

    write_checkpoint("deepseek_v2", tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.2.self_attn.kv_b_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(gguf_architectures.ExportError, match="model.layers.2.self_attn.kv_b_proj.weight"):
        gguf_export.export(tmp_path, tmp_path / "x.gguf", "q8_0", log=lambda _: None)
    assert not list(tmp_path.glob("x.gguf*"))


# ---------------------------------------------------------------- --synthetic: make_checkpoint's values, no folder

SYNTHETIC_CASES = {"qwen3_moe": ("qwen3_moe", dict(mlp_only_layers=[])), "deepseek_v2": ("deepseek_v2", {}),
                   "mixtral": ("mixtral", {})}
SYNTHETIC_OPTIONS = dict(seed=3, std=0.05, skew=1.0, embed_std=1.0, out_std=0.01)  # every option off its default


def synthetic_config(name: str) -> dict:
    import transformers
    from tiny_models import COMMON, VARIANTS

    model_type, variant = VARIANTS[SYNTHETIC_CASES[name][0]]
    return transformers.CONFIG_MAPPING[model_type](**{**COMMON, **variant, **SYNTHETIC_CASES[name][1]}).to_dict()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """name -> (make_checkpoint --hf folder, its F32 export, the --synthetic F32 export of the same values)."""
    import make_checkpoint

    out = {}
    for name in SYNTHETIC_CASES:
        folder = tmp_path_factory.mktemp(f"synthetic-{name}")
        config = synthetic_config(name)
        make_checkpoint.write_hf(folder / "hf", config, **SYNTHETIC_OPTIONS, log=None)
        from_folder = gguf_export.export(folder / "hf", folder / "folder.gguf", "f32", log=lambda _: None)
        out_file = folder / "not-yet-made" / "synthetic.gguf"  # the export makes the folder
        from_values = gguf_export.export_synthetic(config, out_file, "f32", **SYNTHETIC_OPTIONS, log=lambda _: None)
        out[name] = (folder / "hf", from_folder, from_values)
    return out


@pytest.mark.parametrize("name", list(SYNTHETIC_CASES))
def test_synthetic_export_equals_the_export_of_make_checkpoints_folder(synthetic, name):
    _, from_folder, from_values = synthetic[name]
    (folder_fields, folder_tensors), (fields, tensors) = read(from_folder), read(from_values)
    assert fields == folder_fields
    assert list(tensors) == list(folder_tensors)
    for tensor_name, tensor in tensors.items():
        expected = folder_tensors[tensor_name]
        assert tensor.tensor_type == expected.tensor_type == F32, tensor_name
        assert tensor.shape.tolist() == expected.shape.tolist(), tensor_name
        np.testing.assert_array_equal(tensor.data, expected.data, err_msg=tensor_name)
    assert from_values.read_bytes() == from_folder.read_bytes()


@pytest.mark.parametrize("name", list(SYNTHETIC_CASES))
def test_llama_cpp_runs_the_synthetic_export_as_transformers_runs_the_folder(synthetic, name):
    import transformers

    folder, _, from_values = synthetic[name]
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    got, expected = llama_cpp_greedy(from_values, PROMPT, STEPS), transformers_greedy(ref, PROMPT, STEPS)
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-5


def test_experts_and_dense_matrices_are_encoded_in_bands_as_in_one_piece(monkeypatch, tmp_path):
    """Stacked experts come one expert at a time and every tensor is encoded in bands of rows: the file is the
    same as encoding each whole tensor at once."""
    config = synthetic_config("qwen3_moe")
    whole = gguf_export.export_synthetic(config, tmp_path / "whole.gguf", "q4_0", "q8_0", **SYNTHETIC_OPTIONS,
                                         log=lambda _: None)
    monkeypatch.setattr(gguf_export, "BAND_VALUES", 64 * 3)  # 3 rows of 64 values per band: many partial bands
    banded = gguf_export.export_synthetic(config, tmp_path / "banded.gguf", "q4_0", "q8_0", **SYNTHETIC_OPTIONS,
                                          log=lambda _: None)
    assert banded.read_bytes() == whole.read_bytes()
    _, tensors = read(banded)
    weights = make_checkpoint_values(config)
    expert = weights.read("model.layers.1.mlp.experts.5.up_proj.weight")
    got = values(tensors["blk.1.ffn_up_exps.weight"])[5]
    assert np.abs(got - expert).max() <= np.abs(expert).max() / 14  # Q4_0: |error| <= absmax / 16 per block
    assert not (tmp_path / "banded.gguf.tmp").exists()


def make_checkpoint_values(config: dict) -> gguf_export.SyntheticWeights:
    import make_checkpoint

    return gguf_export.SyntheticWeights(config, make_checkpoint.Values(config, **SYNTHETIC_OPTIONS))


@pytest.mark.parametrize("args, message", [
    (["--synthetic", "qwen3-30b-a3b", "a", "b.gguf"], "with --synthetic SHAPE give only OUT.gguf"),
    (["only.gguf"], "give SRC OUT.gguf"),
    (["src", "out.gguf", "--skew", "1", "--layers", "2"], "--skew, --layers only apply with --synthetic"),
    (["--synthetic", "deepseek-v3", "x.gguf", "--layers", "1"], "model_type 'deepseek_v3' is not exported"),
])
def test_cli_argument_errors_are_one_line_and_exit_2(capsys, tmp_path, args, message):
    with pytest.raises(SystemExit) as exit_info:
        gguf_export.main([str(tmp_path / a) if a.endswith(".gguf") else a for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not list(tmp_path.iterdir())


def test_a_cpu_int4s_run_multiplies_the_attn_k_b_and_attn_v_b_of_a_q4_0_export(tmp_path):
    """offload with dense="int4s" packs MLA's W_UK / W_UV per head as the very numbers a Q4_0 GGUF of the same
    checkpoint holds in attn_k_b (W_UK transposed per head) and attn_v_b: the absorbed attention runs the same
    weights in both engines. Head dims and rank of 32, so every row is whole Q4_0 blocks."""
    import offload

    write_checkpoint("deepseek_v2", tmp_path, overrides=dict(qk_nope_head_dim=32, v_head_dim=32, kv_lora_rank=32))
    _, tensors = read(gguf_export.export(tmp_path, tmp_path / "q4.gguf", "q4_0", log=lambda _: None))
    model = offload.load(tmp_path, device="cpu", experts="int4s", dense="int4s", max_context=16)
    for i, layer in enumerate(model.transformer.layers):
        for name, per_head in (("attn_k_b", layer.attn.k_b), ("attn_v_b", layer.attn.v_b)):
            tensor = tensors[f"blk.{i}.{name}.weight"]
            assert tensor.tensor_type == Q4_0
            np.testing.assert_array_equal(values(tensor), per_head.dequantized().numpy())

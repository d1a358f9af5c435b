"""MiniMax-M2 / M2.1 / M2.5 (minimax_m2) beyond the shared reference runner: the config.json spelling published
checkpoints use (`rotary_dim`, top-level `rope_theta`, keys transformers does not read), the multi-token-prediction
modules they declare, the published size, their FP8 block weights, and inspect / plan / convert."""
from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import offload
from offload.arch import config_from_hf
from offload.cli import app
from offload.errors import CheckpointError
from offload.inspect import param_counts

from test_quantized_checkpoints import IDS as FP8_IDS
from test_quantized_checkpoints import fp8_config, fp8_parts, hf_logits, quantize_folder, relative_error
from tiny_models import clone_with_config, reference_logits, rel_err, share_within, write_checkpoint

IDS = torch.arange(3, 19)

# MiniMax-M2's config.json as published (M2.1 and M2.5 keep the shape): rotary_dim rather than
# partial_rotary_factor, rope_theta top-level, FP8 block weights, and keys of MiniMax's own modeling code.
MINIMAX_M2 = {"architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2", "vocab_size": 200064,
              "hidden_size": 3072, "intermediate_size": 1536, "num_hidden_layers": 62, "num_attention_heads": 48,
              "num_key_value_heads": 8, "head_dim": 128, "rotary_dim": 64, "rope_theta": 5000000,
              "num_local_experts": 256, "num_experts_per_tok": 8, "scoring_func": "sigmoid", "use_routing_bias": True,
              "use_qk_norm": True, "qk_norm_type": "per_layer", "shared_intermediate_size": 0,
              "attn_type_list": [1] * 62, "use_mtp": True, "num_mtp_modules": 3, "mtp_transformer_layers": 1,
              "max_position_embeddings": 196608, "rms_norm_eps": 1e-06, "sliding_window": None,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 200034,
              "eos_token_id": 200020,
              "quantization_config": {"quant_method": "fp8", "fmt": "float8_e4m3fn", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128],
                                      "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]}}
PUBLISHED_ONLY = {key: MINIMAX_M2[key] for key in ("scoring_func", "use_routing_bias", "qk_norm_type",
                                                   "shared_intermediate_size", "use_mtp", "mtp_transformer_layers")}


def published_spelling(config: dict) -> dict:
    """config.json as MiniMax-M2 ships it: no rope_parameters (rope_theta top-level, rotary_dim alone says how much
    of each head turns), torch_dtype, and the keys only MiniMax's own modeling code reads."""
    old = {k: v for k, v in config.items() if k not in ("rope_parameters", "dtype")}
    layers = config["num_hidden_layers"]
    return {**old, **PUBLISHED_ONLY, "rope_theta": config["rope_parameters"]["rope_theta"],
            "torch_dtype": config["dtype"], "attn_type_list": [1] * layers, "num_mtp_modules": 0}


def test_published_spelling_loads_and_agrees(checkpoint_dir, tmp_path):
    folder, ref = checkpoint_dir("minimax_m2")  # rotary_dim 8 of head_dim 32
    model = offload.load(clone_with_config(folder, tmp_path / "published", published_spelling), device="cpu")
    assert model.config.rotary_dim == 8 and model.config.rope.theta == 5e6
    assert rel_err(model.logits(IDS), reference_logits(ref, IDS)) <= 1e-4


@pytest.mark.parametrize("spelling", [
    {"rotary_dim": 64},  # the published files
    {},  # neither: the whole head
    {"rotary_dim": 64, "partial_rotary_factor": 0.25},  # a top-level factor wins over rotary_dim
    {"rotary_dim": 64, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.75}},
])
def test_rotary_channels_and_theta_as_transformers_reads_them(spelling):
    hf = {key: value for key, value in MINIMAX_M2.items() if key not in ("rotary_dim", "rope_theta")} | spelling
    expected = transformers.MiniMaxM2Config(**{k: v for k, v in hf.items() if k != "quantization_config"})
    cfg = config_from_hf(hf)
    assert cfg.rope_dim == int(cfg.head_dim * expected.rope_parameters.get("partial_rotary_factor", 1.0))
    assert cfg.rope.theta == expected.rope_parameters["rope_theta"]  # 5e6 when the config gives none


@pytest.mark.parametrize("edit, message", [
    ({"attn_type_list": [1, 0] * 31}, "attn_type_list marks layers [1, 3, 5"),
    ({"scoring_func": "softmax"}, "scoring_func 'softmax'; minimax_m2 supports only 'sigmoid'"),
    ({"qk_norm_type": "per_head"}, "qk_norm_type 'per_head'; minimax_m2 supports only 'per_layer'"),
    ({"shared_intermediate_size": 1536}, "shared_intermediate_size 1536; minimax_m2 supports only 0"),
    ({"rotary_dim": 63}, "gives 63 rotary channels; it must give an even number from 2 to head_dim"),
])
def test_config_errors(edit, message):
    with pytest.raises(CheckpointError, match=re.escape(message)):
        config_from_hf({**MINIMAX_M2, **edit})


def test_parameter_counts_of_published_model():
    """MiniMax-M2 (and M2.1, M2.5): 230B total, 10B active; the active count leaves out embedding and LM head."""
    counts = param_counts(config_from_hf(MINIMAX_M2))
    embeddings = 2 * MINIMAX_M2["vocab_size"] * MINIMAX_M2["hidden_size"]
    assert counts.total == pytest.approx(230e9, rel=0.02)
    assert counts.active - embeddings == pytest.approx(10e9, rel=0.05)


def test_multi_token_prediction_modules_are_skipped(checkpoint_dir, tmp_path):
    """num_mtp_modules decoder layers after the last one (`model.layers.{num_hidden_layers + i}`) are not run."""
    folder, ref = checkpoint_dir("minimax_m2")
    layers = ref.config.num_hidden_layers
    dest = clone_with_config(folder, tmp_path / "mtp", lambda config: {**config, "num_mtp_modules": 1})
    with safe_open(folder / "model.safetensors", "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    mtp = {name.replace(f"model.layers.{layers - 1}.", f"model.layers.{layers}."): tensor.clone()
           for name, tensor in tensors.items() if name.startswith(f"model.layers.{layers - 1}.")}
    save_file({**tensors, **mtp}, dest / "model.safetensors", metadata={"format": "pt"})
    model = offload.load(dest, device="cpu")
    assert model.load_info.skipped_tensors == len(mtp)
    assert rel_err(model.logits(IDS), reference_logits(ref, IDS)) <= 1e-4

    # Without num_mtp_modules the extra layer is not the model's: an error, not a silent skip.
    (dest / "config.json").write_text(json.dumps({**json.loads((dest / "config.json").read_text()),
                                                  "num_mtp_modules": 0}))
    with pytest.raises(CheckpointError, match=f"model.layers.{layers}."):
        offload.load(dest, device="cpu")


# What MiniMax-M2 stores in FP8: attention and expert matrices (routers, norms, embeddings and head stay plain).
FP8_TENSORS = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|block_sparse_moe\.experts\.\d+\.w[123])"
                         r"\.weight$")


def test_fp8_checkpoint_matches_transformers_fp8_loader(tmp_path):
    """The tiny model rewritten in the published FP8 block layout; transformers dequantizes it itself. Bounds as
    test_quantized_checkpoints' FP8 test (max |logit error| / max |logit|)."""
    folder = tmp_path / "fp8"
    write_checkpoint("minimax_m2", folder)
    quantize_folder(folder, FP8_TENSORS, fp8_parts, {**fp8_config(), **MINIMAX_M2["quantization_config"]})
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.block_sparse_moe.experts.0.w1.weight").get_dtype() == "F8_E4M3"
    reference = hf_logits(folder)  # of FP8_IDS
    default = offload.load(folder, device="cpu")
    assert default.load_info.expert_format == "int8"
    assert share_within(default.logits(FP8_IDS), reference, 0.03) >= 0.9  # int8 experts: a near tie may flip
    assert relative_error(offload.load(folder, device="cpu", experts="bf16").logits(FP8_IDS), reference) < 0.01


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_inspect_plan_and_convert_commands(checkpoint_dir, tmp_path):
    folder, _ = checkpoint_dir("minimax_m2")
    result = invoke("inspect", folder)
    assert result.exit_code == 0, result.output
    text = re.sub(r"\s+", " ", result.stdout)
    assert "minimax_m2 (MiniMaxM2ForCausalLM)" in text
    assert "GQA, 4 query heads, 2 KV heads, head dim 32 (rope on the first 8), q/k norm (full)" in text
    assert "8 routed, top-3, sigmoid scores" in text

    result = invoke("plan", folder, "--gpu-memory", "2MiB", "--max-context", "64", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["layers"]) == 3

    result = invoke("convert", folder, tmp_path / "store", "--experts", "int4", "--dense", "int8")
    assert result.exit_code == 0, result.output
    from_store = offload.load(tmp_path / "store", device="cpu")
    at_load = offload.load(folder, device="cpu", experts="int4", dense="int8")
    assert torch.equal(from_store.logits(IDS), at_load.logits(IDS))

"""GLM-4.5 / 4.6 / 4.7 (glm4_moe) and GLM-4.7-Flash (glm4_moe_lite) beyond the shared reference runner: the
config.json spellings published checkpoints use, the multi-token-prediction layer they ship, the published sizes,
and inspect / plan / convert."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import offload
from offload.arch import config_from_hf
from offload.cli import app
from offload.errors import CheckpointError
from offload.inspect import param_counts
from tiny_models import clone_with_config, reference_logits, rel_err

IDS = torch.arange(3, 19)

# GLM-4.5's config.json as published (transformers 4.54 spelling: partial_rotary_factor and rope_theta at the top).
GLM_4_5 = {"architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "vocab_size": 151552,
           "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": 92,
           "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128, "n_routed_experts": 160,
           "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "n_group": 1, "topk_group": 1,
           "norm_topk_prob": True, "routed_scaling_factor": 2.5, "attention_bias": True, "use_qk_norm": True,
           "partial_rotary_factor": 0.5, "rope_theta": 1000000, "rope_scaling": None,
           "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "num_nextn_predict_layers": 1,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16", "eos_token_id": [151329, 151336, 151338]}
GLM_4_5_AIR = {**GLM_4_5, "hidden_size": 4096, "intermediate_size": 10944, "moe_intermediate_size": 1408,
               "num_hidden_layers": 46, "n_routed_experts": 128, "first_k_dense_replace": 1, "use_qk_norm": False,
               "routed_scaling_factor": 1.0}

# GLM-4.7-Flash's config.json (glm4_moe_lite): DeepSeek-V3 fields, dense layers as first_k_dense_replace.
GLM_4_7_FLASH = {"architectures": ["Glm4MoeLiteForCausalLM"], "model_type": "glm4_moe_lite", "vocab_size": 154880,
                 "hidden_size": 2048, "intermediate_size": 10240, "moe_intermediate_size": 1536,
                 "num_hidden_layers": 47, "num_attention_heads": 20, "num_key_value_heads": 20, "q_lora_rank": 768,
                 "kv_lora_rank": 512, "qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "v_head_dim": 256,
                 "n_routed_experts": 64, "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 1,
                 "topk_group": 1, "topk_method": "noaux_tc", "norm_topk_prob": True, "routed_scaling_factor": 1.8,
                 "first_k_dense_replace": 1, "attention_bias": False, "partial_rotary_factor": 1.0,
                 "rope_theta": 1000000.0, "rope_scaling": None, "max_position_embeddings": 202752,
                 "rms_norm_eps": 1e-05, "num_nextn_predict_layers": 1, "torch_dtype": "bfloat16"}


def published_spelling(config: dict) -> dict:
    """config.json as GLM-4.5 / 4.6 ship it: rope_theta and partial_rotary_factor top-level, rope_scaling null."""
    old = dict(config)
    rope = old.pop("rope_parameters")
    old.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"], rope_scaling=None,
               torch_dtype=old.pop("dtype"))
    return old


@pytest.mark.parametrize("name, rotary_dim", [("glm4_moe", 16), ("glm4_moe_air", 4)])
def test_published_spelling_loads_and_agrees(checkpoint_dir, tmp_path, name, rotary_dim):
    folder, ref = checkpoint_dir(name)
    model = offload.load(clone_with_config(folder, tmp_path / "old", published_spelling), device="cpu")
    assert model.config.rotary_dim == rotary_dim
    assert rel_err(model.logits(IDS), reference_logits(ref, IDS)) <= 1e-4


def test_missing_partial_rotary_factor_means_half_as_in_transformers(checkpoint_dir, tmp_path):
    folder, ref = checkpoint_dir("glm4_moe")  # written with 0.5

    def drop(config):
        config["rope_parameters"].pop("partial_rotary_factor")
        return config

    model = offload.load(clone_with_config(folder, tmp_path / "default", drop), device="cpu")
    assert model.config.rotary_dim == model.config.head_dim // 2
    assert rel_err(model.logits(IDS), reference_logits(ref, IDS)) <= 1e-4


@pytest.mark.parametrize("factor", [0.4, 0.0, 1.5])  # 0.4 of 128: 51 channels
def test_unusable_partial_rotary_factor_is_one_clear_error(factor):
    with pytest.raises(CheckpointError, match="partial_rotary_factor .* must give an even number from 2 to head_dim"):
        config_from_hf({**GLM_4_5, "partial_rotary_factor": factor})


def with_mtp_layer(folder: Path, dest: Path, layers: int) -> Path:
    """A copy with the multi-token-prediction layer GLM-4.x checkpoints ship as `model.layers.{num_hidden_layers}`:
    a full MoE decoder layer plus its eh_proj, enorm, hnorm and shared_head, in a shard of its own."""
    shutil.copytree(folder, dest)
    with safe_open(folder / "model.safetensors", "pt") as f:
        mtp = {name.replace(f"model.layers.{layers - 1}.", f"model.layers.{layers}."): f.get_tensor(name)
               for name in f.keys() if name.startswith(f"model.layers.{layers - 1}.")}
    H = 64
    mtp |= {f"model.layers.{layers}.eh_proj.weight": torch.zeros(H, 2 * H),
            f"model.layers.{layers}.enorm.weight": torch.ones(H), f"model.layers.{layers}.hnorm.weight": torch.ones(H),
            f"model.layers.{layers}.shared_head.norm.weight": torch.ones(H)}
    save_file(mtp, dest / "mtp.safetensors")
    index = {"metadata": {}, "weight_map": {}}
    for file in ("model.safetensors", "mtp.safetensors"):
        with safe_open(dest / file, "pt") as f:
            index["weight_map"].update({k: file for k in f.keys()})
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    return dest


def test_multi_token_prediction_layer_is_skipped_by_load_and_convert(checkpoint_dir, tmp_path):
    from offload.weights.store import convert

    folder, ref = checkpoint_dir("glm4_moe")
    layers = ref.config.num_hidden_layers
    mtp_folder = with_mtp_layer(folder, tmp_path / "mtp", layers)
    with safe_open(mtp_folder / "mtp.safetensors", "pt") as f:
        extra = len(list(f.keys()))
    model = offload.load(mtp_folder, device="cpu")
    assert model.load_info.skipped_tensors == extra
    assert rel_err(model.logits(IDS), reference_logits(ref, IDS)) <= 1e-4

    store = convert(mtp_folder, tmp_path / "store", "int8", "bf16")
    assert torch.equal(offload.load(store, device="cpu").logits(IDS),
                       offload.load(folder, device="cpu", experts="int8").logits(IDS))

    # Without num_nextn_predict_layers the extra layer is not the model's: an error, not a silent skip.
    def no_mtp(config):
        config["num_nextn_predict_layers"] = 0
        return config

    with pytest.raises(CheckpointError, match=f"model.layers.{layers}."):
        offload.load(clone_with_config(mtp_folder, tmp_path / "no_mtp", no_mtp), device="cpu")


@pytest.mark.parametrize("hf, total, active, rel", [(GLM_4_5, 355e9, 32e9, 0.02), (GLM_4_5_AIR, 106e9, 12e9, 0.02),
                                                     (GLM_4_7_FLASH, 30e9, 3e9, 0.1)])
def test_parameter_counts_of_published_models(hf, total, active, rel):
    """Published sizes: GLM-4.5 355B total / 32B active, GLM-4.5-Air 106B / 12B, GLM-4.7-Flash "30B-A3B" (hence
    the looser bound on its active count); active counts leave out the embedding and LM-head matrices, totals
    the multi-token-prediction layer."""
    counts = param_counts(config_from_hf(hf))
    embeddings = 2 * hf["vocab_size"] * hf["hidden_size"]
    assert counts.total == pytest.approx(total, rel=0.02)
    assert counts.active - embeddings == pytest.approx(active, rel=rel)


def test_lite_published_spelling_loads_and_agrees(checkpoint_dir, tmp_path):
    """GLM-4.7-Flash's config.json names its dense layers by first_k_dense_replace, not mlp_layer_types."""
    folder, ref = checkpoint_dir("glm4_moe_lite")  # mlp_layer_types: dense, dense, sparse

    def published(config):
        config = published_spelling({**config, "rope_parameters": {**config["rope_parameters"],
                                                                   "partial_rotary_factor": 1.0}})
        del config["mlp_layer_types"]
        return {**config, "first_k_dense_replace": 2, "num_nextn_predict_layers": 1}

    model = offload.load(clone_with_config(folder, tmp_path / "old", published), device="cpu")
    assert model.config.moe_layers == (False, False, True) and model.config.mla is not None
    assert rel_err(model.logits(IDS), reference_logits(ref, IDS)) <= 1e-4


@pytest.mark.parametrize("edit, message", [
    ({"mlp_layer_types": ["dense", "sparse"]}, "mlp_layer_types must give 'dense' or 'sparse' for each of the 47"),
    ({"mlp_layer_types": ["moe"] * 47}, "mlp_layer_types must give 'dense' or 'sparse'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor below 1 is not supported")])
def test_lite_config_errors(edit, message):
    with pytest.raises(CheckpointError, match=re.escape(message)):
        config_from_hf({**GLM_4_7_FLASH, **edit})


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_inspect_plan_and_convert_commands(checkpoint_dir, tmp_path):
    folder, _ = checkpoint_dir("glm4_moe")
    result = invoke("inspect", folder)
    assert result.exit_code == 0, result.output
    text = re.sub(r"\s+", " ", result.stdout)
    assert "glm4_moe (Glm4MoeForCausalLM)" in text
    assert "layers 3 (2 MoE, dense: [0])" in text
    assert "GQA, 4 query heads, 2 KV heads, head dim 32 (rope on the first 16), q/k/v bias, q/k norm (head)" in text
    assert "8 routed, top-2, sigmoid scores, noaux_tc (2 of 4 groups), selection bias, weights x 2.5" in text
    assert "shared experts 1 x intermediate 24" in text

    result = invoke("plan", folder, "--gpu-memory", "2MiB", "--max-context", "64", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert len(plan["layers"]) == 2  # the MoE layers

    result = invoke("convert", folder, tmp_path / "store", "--experts", "int4", "--dense", "int8")
    assert result.exit_code == 0, result.output
    from_store = offload.load(tmp_path / "store", device="cpu")
    at_load = offload.load(folder, device="cpu", experts="int4", dense="int8")
    assert torch.equal(from_store.logits(IDS), at_load.logits(IDS))

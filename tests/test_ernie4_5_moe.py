"""ERNIE-4.5 MoE (ernie4_5_moe) beyond the shared reference runner: the config.json spelling the published
checkpoints use, which layers are MoE, the multi-token-prediction tensors they ship, the published sizes, and
inspect / plan / convert."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

import offload
from offload.arch import config_from_hf
from offload.arch.ernie4_5_moe import moe_layers
from offload.errors import CheckpointError
from offload.inspect import param_counts
from tiny_models import check_plan_and_convert, clone_with_config, cli_text, reference_logits, rel_err

IDS = torch.arange(3, 27)

# ERNIE-4.5-21B-A3B-PT's config.json as published: rope_theta top-level, moe_* names, keys of Baidu's own code
# (moe_capacity, moe_gate, moe_use_aux_free) and one multi-token-prediction layer.
ERNIE_21B = {"architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe", "vocab_size": 103424,
             "hidden_size": 2560, "intermediate_size": 12288, "num_hidden_layers": 28, "num_attention_heads": 20,
             "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 131072,
             "rms_norm_eps": 1e-05, "rope_theta": 500000, "tie_word_embeddings": True, "use_bias": False,
             "moe_num_experts": 64, "moe_num_shared_experts": 2, "moe_layer_start_index": 1,
             "moe_layer_end_index": 27, "moe_intermediate_size": 1536, "moe_capacity": [64, 64, 64],
             "moe_gate": "topk", "moe_k": 6, "moe_layer_interval": 1, "moe_use_aux_free": True,
             "num_nextn_predict_layers": 1, "multi_token_pred_lambda": 0.3, "torch_dtype": "bfloat16",
             "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
# ERNIE-4.5-300B-A47B: three dense layers, eight of 64 experts, no shared experts, untied LM head.
ERNIE_300B = {**ERNIE_21B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 54,
              "num_attention_heads": 64, "num_key_value_heads": 8, "moe_num_shared_experts": 0,
              "moe_layer_start_index": 3, "moe_layer_end_index": 53, "moe_intermediate_size": 3584, "moe_k": 8,
              "tie_word_embeddings": False}
PUBLISHED_ONLY = {key: ERNIE_21B[key] for key in ("moe_capacity", "moe_gate", "moe_use_aux_free",
                                                  "num_nextn_predict_layers", "multi_token_pred_lambda")}


def published_spelling(config: dict) -> dict:
    """config.json as ERNIE-4.5 ships it: rope_theta top-level, torch_dtype, Baidu's extra keys."""
    old = {k: v for k, v in config.items() if k not in ("rope_parameters", "dtype")}
    return {**old, **PUBLISHED_ONLY, "rope_theta": config["rope_parameters"]["rope_theta"],
            "torch_dtype": config["dtype"]}


@pytest.mark.parametrize("name", ["ernie4_5_moe", "ernie4_5_moe_interval"])
def test_published_spelling_loads_and_agrees(checkpoint_dir, tmp_path, name):
    folder, ref = checkpoint_dir(name)
    model = offload.load(clone_with_config(folder, tmp_path / "published", published_spelling), device="cpu")
    assert model.config.rope_interleaved and model.config.router.has_correction_bias
    assert rel_err(model.logits(IDS), reference_logits(ref, IDS)) <= 1e-4


def test_selection_bias_matters_in_the_tiny_model(checkpoint_dir, tmp_path):
    """Guard for the reference runner: dropping the statistics bias changes the choices, hence the logits."""
    folder, ref = checkpoint_dir("ernie4_5_moe")
    model = offload.load(folder, device="cpu")
    for moe in model.transformer.moe_blocks():
        moe.correction_bias = None
    assert rel_err(model.logits(IDS), reference_logits(ref, IDS)) > 1e-3


@pytest.mark.parametrize("fields", [
    {},  # transformers' defaults: MoE from layer 1 to the last
    {"moe_layer_start_index": 0, "moe_layer_interval": 2},
    {"moe_layer_start_index": 2, "moe_layer_end_index": 4, "moe_layer_interval": 1},
    {"moe_layer_start_index": 1, "moe_layer_end_index": 5, "moe_layer_interval": 3},
])
def test_moe_layers_are_the_ones_transformers_builds(fields):
    config = transformers.Ernie4_5_MoeConfig(num_hidden_layers=6, hidden_size=16, intermediate_size=8,
                                             moe_intermediate_size=8, num_attention_heads=2, moe_num_experts=2,
                                             moe_k=1, vocab_size=8, **fields)
    with torch.device("meta"):
        model = transformers.Ernie4_5_MoeForCausalLM(config)
    built = tuple(hasattr(layer.mlp, "experts") for layer in model.model.layers)
    assert moe_layers({"num_hidden_layers": 6, **fields}, 6) == built


def test_two_expert_sets_are_one_clear_error():
    with pytest.raises(CheckpointError, match="moe_layer_start_index / moe_layer_end_index lists"):
        config_from_hf({**ERNIE_21B, "moe_layer_start_index": [1, 1], "moe_layer_end_index": [27, 27]})


def with_mtp_tensors(folder: Path, dest: Path) -> tuple[Path, int]:
    """A copy with the multi-token-prediction tensors ERNIE-4.5 checkpoints ship beside the model (`model.mtp_*`)."""
    shutil.copytree(folder, dest)
    H = 64
    mtp = {"model.mtp_block.0.input_layernorm.weight": torch.ones(H), "model.mtp_emb_norm.0.weight": torch.ones(H),
           "model.mtp_hidden_norm.0.weight": torch.ones(H), "model.mtp_linear_proj.0.weight": torch.zeros(H, 2 * H)}
    save_file(mtp, dest / "mtp.safetensors")
    index = {"metadata": {}, "weight_map": {}}
    for file in ("model.safetensors", "mtp.safetensors"):
        with safe_open(dest / file, "pt") as f:
            index["weight_map"].update({k: file for k in f.keys()})
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    return dest, len(mtp)


def test_multi_token_prediction_tensors_are_skipped(checkpoint_dir, tmp_path):
    folder, ref = checkpoint_dir("ernie4_5_moe")
    mtp_folder, extra = with_mtp_tensors(folder, tmp_path / "mtp")
    model = offload.load(mtp_folder, device="cpu")
    assert model.load_info.skipped_tensors == extra
    assert rel_err(model.logits(IDS), reference_logits(ref, IDS)) <= 1e-4


@pytest.mark.parametrize("hf, total, active", [(ERNIE_21B, 21e9, 3e9), (ERNIE_300B, 300e9, 47e9)])
def test_parameter_counts_of_published_models(hf, total, active):
    """Published sizes: 21B total / 3B active, 300B / 47B (both counts include the embedding matrices)."""
    cfg = config_from_hf(hf)
    counts = param_counts(cfg)
    assert counts.total == pytest.approx(total, rel=0.05)
    assert counts.active == pytest.approx(active, rel=0.12)  # "A3B" is 3.3B
    assert cfg.num_moe_layers == hf["num_hidden_layers"] - hf["moe_layer_start_index"]


def test_inspect_plan_and_convert_commands(checkpoint_dir, tmp_path):
    folder, _ = checkpoint_dir("ernie4_5_moe")
    text = cli_text("inspect", folder)
    assert "ernie4_5_moe (Ernie4_5_MoeForCausalLM)" in text
    assert "layers 3 (2 MoE, dense: [0])" in text
    assert "GQA, 4 query heads, 2 KV heads, head dim 16, rope on adjacent pairs, q/k/v/o bias" in text
    assert "8 routed, top-3, softmax scores, greedy, selection bias" in text
    assert "shared experts 2 x intermediate 48" in text
    check_plan_and_convert(folder, tmp_path / "store", 2, IDS)

"""dots.llm1 (dots1) beyond the shared reference runner: the config.json spelling the published checkpoints use,
which layers slide when `layer_types` is absent, config errors, the published size, and inspect / plan / convert."""
from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

import offload
from offload.arch import config_from_hf
from offload.arch.dots1 import layer_types
from offload.cli import app
from offload.errors import CheckpointError
from offload.inspect import param_counts
from tiny_models import clone_with_config, reference_logits, rel_err

IDS = torch.arange(3, 27)  # 24 tokens: past the window of 7 in dots1_window_bias

# dots.llm1.inst's config.json as published (transformers 4.x spelling: rope_theta top-level, rope_scaling null, no
# layer_types, keys transformers ignores such as scoring_func and moe_layer_freq).
DOTS_LLM1 = {"architectures": ["Dots1ForCausalLM"], "model_type": "dots1", "vocab_size": 152064,
             "hidden_size": 4096, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 62,
             "num_attention_heads": 32, "num_key_value_heads": 32, "n_routed_experts": 128, "n_shared_experts": 2,
             "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 1,
             "topk_group": 1, "scoring_func": "noaux_tc", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
             "attention_bias": False, "rope_theta": 10000000, "rope_scaling": None, "max_position_embeddings": 32768,
             "rms_norm_eps": 1e-05, "sliding_window": None, "max_window_layers": 62, "use_sliding_window": False,
             "tie_word_embeddings": False, "torch_dtype": "bfloat16", "eos_token_id": 151649, "bos_token_id": None}


def published_spelling(config: dict) -> dict:
    """config.json as dots.llm1 ships it: rope_theta top-level, rope_scaling null, torch_dtype, no layer_types."""
    old = dict(config)
    old.update(rope_theta=old.pop("rope_parameters")["rope_theta"], rope_scaling=None, torch_dtype=old.pop("dtype"),
               scoring_func="noaux_tc", moe_layer_freq=1)
    del old["layer_types"]
    return old


@pytest.mark.parametrize("name, windows", [("dots1", (None, None, None)), ("dots1_window_bias", (None, 7, 7))])
def test_published_spelling_loads_and_agrees(checkpoint_dir, tmp_path, name, windows):
    """Without layer_types the sliding layers come from max_window_layers, as Dots1Config derives them."""
    folder, ref = checkpoint_dir(name)
    model = offload.load(clone_with_config(folder, tmp_path / "old", published_spelling), device="cpu")
    assert model.config.sliding_windows == windows
    assert rel_err(model.logits(IDS), reference_logits(ref, IDS)) <= 1e-4


@pytest.mark.parametrize("hf, expected", [
    ({}, ["full_attention"] * 4),  # transformers' defaults: window 4096 from layer 62 on
    ({"sliding_window": 16, "max_window_layers": 2}, ["full_attention"] * 2 + ["sliding_attention"] * 2),
    ({"sliding_window": None, "max_window_layers": 0}, ["full_attention"] * 4),
    ({"layer_types": ["sliding_attention", "full_attention"] * 2, "max_window_layers": 0},
     ["sliding_attention", "full_attention"] * 2)])
def test_layer_types_follow_dots1_config(hf, expected):
    assert layer_types(hf, 4) == expected


def test_missing_shared_experts_is_one_clear_error():
    """Dots1Config has no default for n_shared_experts (transformers cannot build the model without it)."""
    hf = {k: v for k, v in DOTS_LLM1.items() if k != "n_shared_experts"}
    with pytest.raises(CheckpointError, match=re.escape("config.json has no 'n_shared_experts' (model_type 'dots1')")):
        config_from_hf(hf)


def test_published_config_translation_and_size():
    """dots.llm1: 142B parameters, 14B active (the published active count includes the embedding matrices)."""
    cfg = config_from_hf(DOTS_LLM1)
    assert cfg.rope.theta == 1e7 and cfg.head_dim == 128 and cfg.qk_norm == "head" and cfg.sliding_windows == (None,) * 62
    assert cfg.moe_layers == (False,) + (True,) * 61 and cfg.shared_intermediate_size == 2 * 1408
    assert (cfg.router.scoring, cfg.router.topk_method, cfg.router.norm_topk_prob) == ("sigmoid", "noaux_tc", True)
    counts = param_counts(cfg)
    assert counts.total == pytest.approx(142e9, rel=0.02)
    assert counts.active == pytest.approx(14e9, rel=0.02)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_inspect_plan_and_convert_commands(checkpoint_dir, tmp_path):
    folder, _ = checkpoint_dir("dots1_window_bias")
    result = invoke("inspect", folder)
    assert result.exit_code == 0, result.output
    text = re.sub(r"\s+", " ", result.stdout)
    assert "dots1 (Dots1ForCausalLM)" in text
    assert "GQA, 4 query heads, 2 KV heads, head dim 16, q/k/v/o bias, q/k norm (head), sliding window 7" in text
    assert "8 routed, top-2, sigmoid scores, noaux_tc (2 of 4 groups)" in text

    result = invoke("plan", folder, "--gpu-memory", "2MiB", "--max-context", "64", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["layers"]) == 3  # every layer is MoE

    result = invoke("convert", folder, tmp_path / "store", "--experts", "int4", "--dense", "int8")
    assert result.exit_code == 0, result.output
    from_store = offload.load(tmp_path / "store", device="cpu")
    at_load = offload.load(folder, device="cpu", experts="int4", dense="int8")
    assert torch.equal(from_store.logits(IDS), at_load.logits(IDS))

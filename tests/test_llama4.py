"""Llama-4 (llama4, llama4_text) beyond the shared reference runner: guards that each of its options changes the
tiny models' numbers (so the runner would catch a dropped one), int8 experts, the published configs' translation
and sizes, inspect / plan, and convert."""
from __future__ import annotations

import json

import pytest
import torch

import offload
from offload.arch import config_from_hf
from offload.inspect import param_counts
from offload.model.rope import inverse_frequencies
from tiny_models import check_misread_fused_rows, check_plan_and_convert, cli_text, reference_logits, rel_err

IDS = torch.arange(3, 27)  # 24 tokens: three attention chunks of 8 on the RoPE layers
LAYERS = 48

# Llama-4-Scout-17B-16E-Instruct's config.json as published (vision tower abridged): the text model under
# text_config, rope_scaling llama3 x16, every layer MoE, every fourth layer without RoPE.
SCOUT_TEXT = {"attention_bias": False, "attention_chunk_size": 8192, "attn_scale": 0.1, "attn_temperature_tuning": 4,
              "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008], "floor_scale": 8192,
              "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120, "interleave_moe_layer_step": 1,
              "intermediate_size": 8192, "intermediate_size_mlp": 16384, "max_position_embeddings": 10485760,
              "model_type": "llama4_text", "moe_layers": list(range(LAYERS)),
              "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(LAYERS)], "num_attention_heads": 40,
              "num_experts_per_tok": 1, "num_hidden_layers": LAYERS, "num_key_value_heads": 8,
              "num_local_experts": 16, "pad_token_id": 200018, "rms_norm_eps": 1e-05,
              "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"},
              "rope_theta": 500000.0, "torch_dtype": "bfloat16", "use_qk_norm": True, "vocab_size": 202048}
SCOUT = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "boi_token_index": 200080,
         "eoi_token_index": 200081, "image_token_index": 200092, "tie_word_embeddings": False,
         "torch_dtype": "bfloat16", "text_config": SCOUT_TEXT,
         "vision_config": {"model_type": "llama4_vision_model", "hidden_size": 1408, "num_hidden_layers": 34,
                           "image_size": 336, "patch_size": 14, "vision_output_dim": 4096}}
# Maverick: 128 experts on every second layer, dense MLPs between, no q/k norm, no rope scaling.
MAVERICK = {**SCOUT, "text_config": {**SCOUT_TEXT, "num_local_experts": 128, "interleave_moe_layer_step": 2,
                                     "moe_layers": list(range(1, LAYERS, 2)), "use_qk_norm": False,
                                     "rope_scaling": None}}


@pytest.mark.parametrize("hf, total, active", [(SCOUT, 109e9, 17e9), (MAVERICK, 400e9, 17e9)])
def test_published_config_translation_and_size(hf, total, active):
    """Published sizes: Scout 109B total / 17B active, Maverick 400B / 17B (the text model; its vision tower is
    under 1B)."""
    cfg = config_from_hf(hf)
    assert cfg.rope_layers[:4] == (True, True, True, False) and cfg.attention_chunks[:4] == (8192,) * 3 + (None,)
    assert cfg.attention_temperature == (8192.0, 0.1) and cfg.router_scales_input and cfg.rope_interleaved
    assert cfg.eos_token_ids == (200001, 200007, 200008)
    counts = param_counts(cfg)
    assert counts.total == pytest.approx(total, rel=0.02)
    assert counts.active == pytest.approx(active, rel=0.03)


def test_scout_rope_is_llama3_scaled():
    cfg = config_from_hf(SCOUT)
    assert (cfg.rope.type, cfg.rope.factor, cfg.rope.original_max_position_embeddings) == ("llama3", 16.0, 8192)
    assert cfg.qk_l2_norm and not config_from_hf(MAVERICK).qk_l2_norm


def test_defaults_are_llama4_text_config():
    """Without the per-layer lists: every fourth layer without RoPE, MoE on every `interleave_moe_layer_step`-th."""
    bare = {k: v for k, v in SCOUT_TEXT.items() if k not in ("no_rope_layers", "moe_layers")}
    cfg = config_from_hf({**bare, "interleave_moe_layer_step": 2})
    assert cfg.rope_layers == (True, True, True, False) * (LAYERS // 4)
    assert cfg.moe_layers == (False, True) * (LAYERS // 2)


@pytest.mark.parametrize("name, option, off", [
    ("llama4", "chunk", None),  # full attention on the RoPE layers
    ("llama4", "temperature", None),  # no query temperature on the no-RoPE layer
    ("llama4", "l2_eps", None),  # no q/k norm
    ("llama4", "rope_layer", True),  # RoPE on the no-RoPE layer too
    ("llama4_text", "chunk", None),
])
def test_attention_options_matter_in_the_tiny_models(checkpoint_dir, name, option, off):
    """Guard for the reference runner: each Llama-4 attention option, turned off, gives other logits."""
    folder, ref = checkpoint_dir(name)
    model = offload.load(folder, device="cpu")
    for layer in model.transformer.layers:
        setattr(layer.attn, option, off)
    assert rel_err(model.logits(IDS), reference_logits(ref, IDS)) > 1e-3


@pytest.mark.parametrize("name", ["llama4", "llama4_text"])
def test_input_scaled_routing_matters_in_the_tiny_models(checkpoint_dir, name):
    """Guard: the routing weight scaling the experts' output instead of their input gives other logits."""
    folder, ref = checkpoint_dir(name)
    model = offload.load(folder, device="cpu")
    for moe in model.transformer.moe_blocks():
        moe.scales_input = False
    assert rel_err(model.logits(IDS), reference_logits(ref, IDS)) > 1e-3


def test_rope_frequencies_are_transformers(checkpoint_dir):
    """Llama-3 scaling of the tiny model's rope (one frequency in the blended band): transformers' inv_freq."""
    folder, ref = checkpoint_dir("llama4")
    cfg = offload.load(folder, device="cpu").config
    inv_freq, scale = inverse_frequencies(cfg.rope, cfg.rope_dim)
    torch.testing.assert_close(inv_freq, ref.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    assert scale == 1.0


@pytest.mark.parametrize("name", ["llama4", "llama4_text"])
def test_int8_experts_stay_close(checkpoint_dir, name):
    folder, ref = checkpoint_dir(name)
    model = offload.load(folder, device="cpu", experts="int8")
    assert model.load_info.expert_format == "int8"
    assert rel_err(model.logits(IDS), reference_logits(ref, IDS)) <= 2e-2


def test_inspect_and_plan_commands(checkpoint_dir):
    folder, _ = checkpoint_dir("llama4_text")
    text = cli_text("inspect", folder)
    assert "llama4_text (Llama4ForCausalLM)" in text
    assert ("MQA, 4 query heads, 1 KV heads, head dim 32, rope on adjacent pairs, chunked attention (8 positions), "
            "no rope on 1 layers (full attention, query temperature)") in text
    assert "6 routed, top-2, sigmoid scores, greedy, weight scales the expert's input" in text
    plan = json.loads(cli_text("plan", folder, "--gpu-memory", "2MiB", "--max-context", "64", "--json"))
    assert len(plan["layers"]) == 1  # MoE on the second of three layers only


@pytest.mark.parametrize("name", ["llama4", "llama4_text"])
def test_convert_writes_a_store_that_loads_as_the_source(checkpoint_dir, tmp_path, name):
    """The fused experts (gate, up halves) convert: the store (the text model alone, for the multimodal
    checkpoint) gives the logits of loading the source in the same formats."""
    folder, ref = checkpoint_dir(name)
    check_plan_and_convert(folder, tmp_path / "store", 3 if name == "llama4" else 1, IDS, experts="int8", dense="bf16")
    from_store = offload.load(tmp_path / "store", device="cpu")
    assert from_store.config.model_type == "llama4_text"
    assert rel_err(from_store.logits(IDS), reference_logits(ref, IDS)) <= 2e-2


@pytest.mark.parametrize("misread", ["swapped", "as_interleaved"])
def test_misread_fused_rows_leave_the_int8_bound(checkpoint_dir, tmp_path, monkeypatch, misread):
    """Guard for the convert tests: gate and up swapped, or the halves read as interleaved rows, move a store's
    logits far further from transformers' than int8 experts do."""
    check_misread_fused_rows(*checkpoint_dir("llama4"), tmp_path / "store", monkeypatch, misread, IDS)

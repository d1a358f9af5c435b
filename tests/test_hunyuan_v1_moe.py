"""Hunyuan-A13B (hunyuan_v1_moe) beyond the shared reference runner: the config.json spelling the published
checkpoint uses (NTK-alpha `rope_scaling`, per-layer lists), config errors, the published size, and inspect / plan /
convert."""
from __future__ import annotations

import re

import pytest
import torch

import offload
from offload.arch import config_from_hf
from offload.errors import CheckpointError
from offload.inspect import param_counts
from offload.model.rope import inverse_frequencies
from tiny_models import check_plan_and_convert, clone_with_config, cli_text, reference_logits, rel_err, write_checkpoint

IDS = torch.arange(3, 27)
LAYERS = 32

# Hunyuan-A13B-Instruct's config.json as published: rope_scaling with a fixed NTK alpha, rope_theta top-level,
# per-layer lists, and keys of Tencent's own code (use_cla, use_mixed_mlp_moe, moe_layer_num_skipped, ...).
HUNYUAN_A13B = {"architectures": ["HunYuanMoEV1ForCausalLM"], "model_type": "hunyuan_v1_moe", "vocab_size": 128167,
                "hidden_size": 4096, "intermediate_size": 3072, "num_hidden_layers": LAYERS,
                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "attention_head_dim": 128,
                "attention_bias": False, "mlp_bias": False, "num_experts": 64, "moe_topk": [8] * LAYERS,
                "moe_intermediate_size": [3072] * LAYERS, "num_shared_expert": [1] * LAYERS,
                "use_mixed_mlp_moe": True, "use_qk_norm": True, "use_cla": False, "cla_share_factor": 2,
                "moe_layer_num_skipped": 0, "moe_drop_tokens": False, "use_rotary_pos_emb": True,
                "rope_theta": 10000.0,
                "rope_scaling": {"alpha": 1000.0, "beta_fast": 32, "beta_slow": 1, "factor": 1.0, "mscale": 1.0,
                                 "mscale_all_dim": 1.0, "type": "dynamic"},
                "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "tie_word_embeddings": True,
                "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 127960, "pad_token_id": 127961}


def published_spelling(config: dict) -> dict:
    """config.json as Hunyuan-A13B ships it: rope_scaling with `type` and rope_theta beside it, torch_dtype, lists."""
    old = {k: v for k, v in config.items() if k not in ("rope_parameters", "dtype")}
    rope = config["rope_parameters"]
    layers = config["num_hidden_layers"]
    return {**old, "rope_theta": rope["rope_theta"], "rope_scaling": {**HUNYUAN_A13B["rope_scaling"],
                                                                      "alpha": rope["alpha"]},
            "torch_dtype": config["dtype"], "moe_intermediate_size": [config["intermediate_size"]] * layers,
            "num_shared_expert": [1] * layers, "moe_layer_num_skipped": 0}


def test_published_spelling_loads_and_agrees(checkpoint_dir, tmp_path):
    folder, ref = checkpoint_dir("hunyuan_v1_moe")
    model = offload.load(clone_with_config(folder, tmp_path / "published", published_spelling), device="cpu")
    assert model.config.router.top_k == 2 and model.config.qk_norm_after_rope
    assert rel_err(model.logits(IDS), reference_logits(ref, IDS)) <= 1e-4


@pytest.mark.parametrize("name", ["hunyuan_v1_moe", "hunyuan_v1_moe_bias"])
def test_rope_frequencies_are_transformers(checkpoint_dir, name):
    """NTK alpha stretches the base: the same inverse frequencies as transformers' ntk_alpha rope."""
    folder, ref = checkpoint_dir(name)
    cfg = offload.load(folder, device="cpu").config
    inv_freq, scale = inverse_frequencies(cfg.rope, cfg.rope_dim)
    torch.testing.assert_close(inv_freq, ref.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    assert scale == 1.0


def test_norms_after_rope_matter_in_the_tiny_model(checkpoint_dir):
    """Guard for the reference runner: q/k norms applied before RoPE give other logits."""
    folder, ref = checkpoint_dir("hunyuan_v1_moe")
    model = offload.load(folder, device="cpu")
    for layer in model.transformer.layers:
        layer.attn.qk_norm_after_rope = False
    assert rel_err(model.logits(IDS), reference_logits(ref, IDS)) > 1e-3


@pytest.mark.parametrize("edit, message", [
    ({"moe_topk": [8] * 16}, "moe_topk lists 16 values for 32 layers"),
    ({"num_experts": [64] * 31 + [32]}, "num_experts differs between layers ([32, 64])"),
    ({"use_cla": True}, "config.json sets use_cla (cross-layer KV sharing)"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not supported"),
])
def test_config_errors(edit, message):
    with pytest.raises(CheckpointError, match=re.escape(message)):
        config_from_hf({**HUNYUAN_A13B, **edit})


def test_published_config_translation_and_size():
    """Hunyuan-A13B: 80B parameters, 13B active (both counts include the tied embedding matrix)."""
    cfg = config_from_hf(HUNYUAN_A13B)
    assert cfg.rope.type == "default" and cfg.rope.theta == pytest.approx(1e4 * 1000 ** (128 / 126))
    assert cfg.router.top_k == 8 and cfg.moe_layers == (True,) * LAYERS and cfg.shared_intermediate_size == 3072
    counts = param_counts(cfg)
    assert counts.total == pytest.approx(80e9, rel=0.02)
    assert counts.active == pytest.approx(13e9, rel=0.05)


def test_top_k_per_layer_is_transformers(tmp_path):
    """A moe_topk list with a top-k of its own per layer (HunYuanMoEV1Gate reads moe_topk[layer_idx]): the
    reference logits and greedy tokens, on the reference backend and on the CPU workers; inspect shows the range."""
    folder = tmp_path / "topk"
    ref = write_checkpoint("hunyuan_v1_moe", folder, overrides={"moe_topk": [1, 3, 2]})
    expected = reference_logits(ref, IDS)
    model = offload.load(folder, device="cpu")
    assert [moe.router_cfg.top_k for moe in model.transformer.moe_blocks()] == [1, 3, 2]
    assert rel_err(model.logits(IDS), expected) <= 1e-4
    with torch.no_grad():
        out = ref.generate(IDS[:6][None], max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0,
                           attention_mask=torch.ones(1, 6, dtype=torch.long))
    assert model.generate(IDS[:6].tolist(), max_new_tokens=24, ignore_eos=True).token_ids == out[0, 6:].tolist()
    on_workers = offload.load(folder, device="cpu", experts="int8").logits(IDS)
    assert rel_err(on_workers, expected) <= 2e-2
    uniform = config_from_hf({**HUNYUAN_A13B, "moe_topk": [3] * LAYERS})
    assert param_counts(config_from_hf({**HUNYUAN_A13B, "moe_topk": [3, 1] * (LAYERS // 2)})).active < \
        param_counts(uniform).active
    assert "8 routed, top-1..3 by layer, softmax scores" in cli_text("inspect", folder)


def test_inspect_plan_and_convert_commands(checkpoint_dir, tmp_path):
    folder, _ = checkpoint_dir("hunyuan_v1_moe_bias")
    text = cli_text("inspect", folder)
    assert "hunyuan_v1_moe (HunYuanMoEV1ForCausalLM)" in text
    assert "MHA, 4 query heads, 4 KV heads, head dim 32, q/k/v/o bias, q/k norm (head, after rope)" in text
    assert "6 routed, top-2, softmax scores, greedy" in text
    assert "shared experts 1 x intermediate 24" in text
    check_plan_and_convert(folder, tmp_path / "store", 3, IDS)

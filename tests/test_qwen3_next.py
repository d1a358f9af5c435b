"""Qwen3-Next (qwen3_next) and Qwen3.5 / Qwen3.6 MoE (qwen3_5_moe): Gated DeltaNet layers with a fixed-size
recurrent state beside gated full attention. Beyond the shared reference runner: prompts longer than a DeltaNet
chunk, the chunked form against the token-by-token recurrence, prefill in two calls, the state's resume rules and
size, quantized experts and a hybrid plan, the published configs and sizes, and inspect / plan / convert."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import offload
from offload.arch import config_from_hf
from offload.errors import CheckpointError
from offload.inspect import param_counts
from offload.model.gated_deltanet import chunked_gated_delta_rule, l2norm, recurrent_gated_delta_rule
from offload.model.kv_cache import RecurrentState
from offload.placement import inventory, kv_cache_bytes
from test_cpu_model import BOUNDS
from tiny_models import (check_plan_and_convert, cli_text, clone_with_config, landing_bytes, reference_logits,
                         rel_err)

FAMILIES = ["qwen3_next", "qwen3_5_moe"]
LONG = torch.randint(0, 96, (80,), generator=torch.Generator().manual_seed(7))  # past one 64-position chunk

# Qwen3-Next-80B-A3B-Instruct's config.json as published (transformers 4.57 spelling).
QWEN3_NEXT_80B = {
    "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "vocab_size": 151936, "hidden_size": 2048,
    "intermediate_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 2,
    "head_dim": 256, "full_attention_interval": 4, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
    "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_value_head_dim": 128,
    "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "num_experts": 512,
    "num_experts_per_tok": 10, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "partial_rotary_factor": 0.25, "rope_theta": 10000000, "rope_scaling": None, "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-06, "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645, "use_sliding_window": False}
# Qwen3.5-35B-A3B's: the text model under text_config, a vision tower beside it.
QWEN3_5_35B = {
    "architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
    "text_config": {
        "model_type": "qwen3_5_moe_text", "vocab_size": 248320, "hidden_size": 2048, "num_hidden_layers": 40,
        "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
        "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 10,
        "full_attention_interval": 4, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
        "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_value_head_dim": 128,
        "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "num_experts": 256,
        "num_experts_per_tok": 8, "attn_output_gate": True, "mtp_num_hidden_layers": 1,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                            "mrope_section": [11, 11, 10], "mrope_interleaved": True},
        "max_position_embeddings": 262144, "rms_norm_eps": 1e-06, "hidden_act": "silu", "dtype": "bfloat16",
        "eos_token_id": 248044},
    "vision_config": {"model_type": "qwen3_5_moe", "depth": 27, "hidden_size": 1152, "out_hidden_size": 2048},
    "tie_word_embeddings": False}


def random_rule_inputs(T: int, H: int = 3, dk: int = 8, dv: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = l2norm(torch.randn(H, T, dk, generator=gen)) * dk**-0.5
    k = l2norm(torch.randn(H, T, dk, generator=gen))
    v = torch.randn(H, T, dv, generator=gen)
    g = -torch.rand(H, T, generator=gen) * 0.3  # log decays
    beta = torch.rand(H, T, generator=gen)
    state = torch.randn(H, dk, dv, generator=gen)
    return q, k, v, g, beta, state


@pytest.mark.parametrize("T", [1, 50, 64, 150])
def test_chunked_form_equals_the_token_by_token_recurrence(T):
    q, k, v, g, beta, state = random_rule_inputs(T)
    out, final = recurrent_gated_delta_rule(q, k, v, g, beta, state.clone())
    chunked_out, chunked_final = chunked_gated_delta_rule(q, k, v, g, beta, state)
    assert rel_err(chunked_out, out) <= 1e-5
    assert rel_err(chunked_final, final) <= 1e-5
    # The state really carries: a fresh start gives other outputs.
    assert rel_err(chunked_gated_delta_rule(q, k, v, g, beta, torch.zeros_like(state))[0], out) > 1e-2


@pytest.mark.parametrize("name", FAMILIES)
def test_long_prompt_logits_and_greedy_tokens_match_transformers(checkpoint_dir, name):
    folder, ref = checkpoint_dir(name)
    model = offload.load(folder, device="cpu", max_context=128)
    assert rel_err(model.logits(LONG), reference_logits(ref, LONG)) <= 1e-4
    with torch.no_grad():
        expected = ref.generate(LONG[None], max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0,
                                attention_mask=torch.ones(1, len(LONG), dtype=torch.long))[0, len(LONG):].tolist()
    assert model.generate(LONG.tolist(), max_new_tokens=24, ignore_eos=True).token_ids == expected


@pytest.mark.parametrize("name", FAMILIES)
def test_prefill_in_two_calls_equals_one_call(checkpoint_dir, name):
    folder, _ = checkpoint_dir(name)
    model = offload.load(folder, device="cpu", max_context=128)
    t = model.transformer
    with torch.inference_mode():
        whole = t(LONG, 0)
        states = [c.state.clone() for c in t.caches if isinstance(c, RecurrentState)]
        split = torch.cat([t(LONG[:70], 0), t(LONG[70:], 70)])  # the second call starts mid-chunk
        assert all(torch.allclose(c.state, s, atol=1e-5)
                   for c, s in zip((c for c in t.caches if isinstance(c, RecurrentState)), states))
        tail = torch.cat([t(LONG[:60], 0)] + [t(LONG[i:i + 1], i) for i in range(60, 80)])  # then token by token
    assert rel_err(split, whole) <= 1e-5
    assert rel_err(tail, whole) <= 1e-5


def test_recurrent_state_resumes_only_where_it_stands_and_restarts_at_zero(checkpoint_dir):
    folder, _ = checkpoint_dir("qwen3_next")
    model = offload.load(folder, device="cpu", max_context=64)
    t = model.transformer
    kinds = [type(c).__name__ for c in t.caches]
    assert kinds == ["RecurrentState", "KVCache", "RecurrentState"]
    with torch.inference_mode():
        first = t(LONG[:30], 0)
        assert t.resume_point(30) == 30  # the recurrent layers stand at 30
        assert t.resume_point(20) == 0  # they cannot rewind to 20: start afresh
        with pytest.raises(ValueError, match="stands at position 30, not 20"):
            t(LONG[20:21], 20)
        again = t(LONG[:30], 0)  # a prefill at 0 resets the state
    assert torch.equal(first, again)


def test_prompt_cache_reuses_the_state_only_where_it_stands(checkpoint_dir):
    """A prompt extending everything processed continues from the recurrent state; one that diverges earlier (or
    repeats it: its last token must be recomputed) starts afresh. Tokens are those of a cold run either way."""
    folder, _ = checkpoint_dir("qwen3_5_moe")
    model = offload.load(folder, device="cpu", max_context=128)
    kwargs = dict(max_new_tokens=6, ignore_eos=True)
    model.generate(LONG[:30].tolist(), **kwargs)
    held = list(model.transformer.cached_ids)  # the prompt and the replies fed back: 35 positions
    for make_prompt, reused in ((lambda: held + [5, 6, 7], len(held)), (lambda: held[:20] + [9, 9], 0),
                                (lambda: list(model.transformer.cached_ids), 0)):
        prompt = make_prompt()
        warm = model.generate(prompt, **kwargs)
        assert warm.stats.cached_prompt_tokens == reused
        assert warm.token_ids == model.generate(prompt, reuse_cache=False, **kwargs).token_ids


def test_cache_bytes_follow_the_layer_kinds(checkpoint_dir):
    """Attention layers' caches grow with max_context, the recurrent states do not; the planner's count is what
    the model allocates."""
    folder, _ = checkpoint_dir("qwen3_next")
    small = offload.load(folder, device="cpu", max_context=32)
    large = offload.load(folder, device="cpu", max_context=256)
    cfg = small.config
    for model, context in ((small, 32), (large, 256)):
        assert model.transformer.cache_nbytes == kv_cache_bytes(cfg, context, 4)
    recurrent = [(a.nbytes, b.nbytes) for a, b in zip(small.transformer.caches, large.transformer.caches)
                 if isinstance(a, RecurrentState)]
    assert recurrent and all(a == b for a, b in recurrent)
    la = cfg.linear_attention
    assert kv_cache_bytes(cfg, 0, 4) == 2 * ((la.conv_kernel - 1) * la.conv_dim * 4
                                             + la.num_value_heads * la.key_head_dim * la.value_head_dim * 4)


@pytest.mark.parametrize("name, fmt", [("qwen3_next", "int8"), ("qwen3_5_moe", "int4")])
def test_quantized_experts_stay_within_their_bounds(checkpoint_dir, name, fmt):
    """The whole-model bounds of test_cpu_model (docs/formats.md) over its 24 positions; only routed experts are
    quantized, the DeltaNet layers stay exact."""
    folder, ref = checkpoint_dir(name)
    ids = LONG[:24]
    expected = reference_logits(ref, ids)
    model = offload.load(folder, device="cpu", max_context=128, experts=fmt)
    max_err, min_top1 = BOUNDS[fmt]
    got = model.logits(ids)
    assert rel_err(got, expected) <= max_err
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() >= min_top1


@pytest.mark.parametrize("name", FAMILIES)
def test_a_simulated_device_budget_places_experts_without_changing_the_numbers(checkpoint_dir, name):
    folder, _ = checkpoint_dir(name)
    reference = offload.load(folder, device="cpu", max_context=128)
    cfg = reference.config
    from offload.arch import architecture

    inv = inventory(cfg, architecture(cfg.model_type).names)
    budget = (sum(inv.device_bytes(4).values()) + kv_cache_bytes(cfg, 128, 4) + landing_bytes(cfg)
              + 6 * inv.expert_params * 4)
    model = offload.load(folder, device="cpu", max_context=128, gpu_memory=budget, slots="bf16")
    assert any(layer.host_experts for layer in model.plan.layers)
    assert rel_err(model.logits(LONG), reference.logits(LONG)) <= 1e-6


def test_published_configs_translate_and_have_their_sizes():
    """Qwen3-Next-80B-A3B: 80B total, ~3B active; Qwen3.5-35B-A3B: 35B total (text model), ~3B active. Active
    counts leave out the embedding and LM-head matrices."""
    for hf, total, linear_layers in ((QWEN3_NEXT_80B, 80e9, 36), (QWEN3_5_35B, 35e9, 30)):
        cfg = config_from_hf(hf)
        text = hf.get("text_config", hf)
        assert cfg.num_linear_attention_layers == linear_layers and cfg.is_linear_attention(0)
        assert not cfg.is_linear_attention(3) and cfg.rotary_dim == 64 and cfg.rope.theta == 1e7
        counts = param_counts(cfg)
        embeddings = 2 * text["vocab_size"] * text["hidden_size"]
        assert counts.total == pytest.approx(total, rel=0.02)
        assert counts.active - embeddings == pytest.approx(3e9, rel=0.2)


@pytest.mark.parametrize("edit, message", [
    ({"layer_types": ["linear_attention", "sliding_attention"] * 24}, "layer_types must give 'linear_attention' or "
                                                                       "'full_attention' for each of the 48 layers"),
    ({"linear_num_value_heads": 24}, "linear_num_value_heads 24 is not a multiple of linear_num_key_heads 16"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'; qwen3_next supports only 'silu'"),
])
def test_config_errors(edit, message):
    with pytest.raises(CheckpointError, match=re.escape(message)):
        config_from_hf({**QWEN3_NEXT_80B, **edit})


def test_multi_token_prediction_module_is_skipped(checkpoint_dir, tmp_path):
    """Published Qwen3-Next and Qwen3.5 checkpoints ship an `mtp.` module beside the model: skipped, as
    transformers skips it."""
    folder, ref = checkpoint_dir("qwen3_next")
    dest = clone_with_config(folder, tmp_path / "mtp", lambda config: config)
    with safe_open(folder / "model.safetensors", "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    mtp = {"mtp.fc.weight": torch.zeros(64, 128), "mtp.norm.weight": torch.zeros(64)}
    save_file({**tensors, **mtp}, dest / "model.safetensors", metadata={"format": "pt"})
    model = offload.load(dest, device="cpu", max_context=128)
    assert model.load_info.skipped_tensors == len(mtp)
    assert rel_err(model.logits(LONG), reference_logits(ref, LONG)) <= 1e-4


def test_inspect_plan_and_convert_commands(checkpoint_dir, tmp_path):
    folder, _ = checkpoint_dir("qwen3_5_moe")
    text = cli_text("inspect", folder)
    assert "qwen3_5_moe (Qwen3_5MoeForConditionalGeneration)" in text
    assert ("MQA, 4 query heads, 1 KV heads, head dim 32 (rope on the first 8), q/k norm (head), sigmoid output "
            "gate") in text
    assert ("Gated DeltaNet on 2 of 3 layers (the rest attention): 2 key heads x 16, 2 value heads x 8, conv 4; a "
            "fixed-size state per layer") in text
    assert re.search(r"skipped 21 tensors \(.*\) under model\.visual\., mtp\.: not loaded", text)
    assert "per token (bf16), plus" in text and "of recurrent state at any context" in text
    check_plan_and_convert(folder, tmp_path / "store", moe_layers=3, ids=LONG)
    # A Qwen3.5 store holds the text model alone.
    assert json.loads((tmp_path / "store" / "config.json").read_text())["model_type"] == "qwen3_5_moe_text"

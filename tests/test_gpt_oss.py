"""gpt-oss (gpt_oss) beyond the shared reference runner: the config.json the published checkpoints use, their MXFP4
experts in the out-major block layout, the published sizes, the harmony chat format, inspect / plan, and convert of
the fused experts (bf16 and MXFP4) without a layer ever in float."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

import offload
from csrc_py.formats import unpack
from offload.arch import config_from_hf
from offload.inspect import param_counts
from offload.tokenizer import Tokenizer
from offload.weights.checkpoint import Checkpoint
from offload.weights.encoders import encode_mxfp4
from offload.weights.store import convert
from test_tokenizer import _train_byte_level, _write_config
from tiny_models import (FloatAllocations, check_misread_fused_rows, check_plan_and_convert, cli_text,
                         reference_logits, rel_err, write_checkpoint)

IDS = torch.arange(3, 27)  # 24 tokens: past the window of 7 on the sliding layers
LAYERS_20B = 24

# gpt-oss-20b's config.json as published: rope_scaling with rope_type, rope_theta top-level, MXFP4 experts.
GPT_OSS_20B = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": 201088,
               "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": LAYERS_20B,
               "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 32,
               "num_experts_per_tok": 4, "experts_per_token": 4, "attention_bias": True, "sliding_window": 128,
               "layer_types": ["sliding_attention", "full_attention"] * (LAYERS_20B // 2), "swiglu_limit": 7.0,
               "rope_theta": 150000, "initial_context_length": 4096,
               "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
               "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "tie_word_embeddings": False,
               "eos_token_id": 200002, "pad_token_id": 199999, "router_aux_loss_coef": 0.9,
               "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
                   "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}
GPT_OSS_120B = {**GPT_OSS_20B, "num_hidden_layers": 36, "num_local_experts": 128,
                "layer_types": ["sliding_attention", "full_attention"] * 18}


@pytest.mark.parametrize("hf, total, active", [(GPT_OSS_20B, 21e9, 3.6e9), (GPT_OSS_120B, 117e9, 5.1e9)])
def test_published_config_translation_and_size(hf, total, active):
    """Published sizes: gpt-oss-20b 21B total / 3.6B active, gpt-oss-120b 117B / 5.1B (active counts leave out the
    input embedding, not the unembedding)."""
    cfg = config_from_hf(hf)
    assert cfg.sliding_windows[:2] == (128, None) and cfg.attention_sinks and cfg.router_bias and cfg.expert_bias
    assert cfg.rope.type == "yarn" and cfg.rope.factor == 32 and not cfg.rope.truncate
    assert (cfg.expert_activation.kind, cfg.expert_activation.limit) == ("clamped_swiglu", 7.0)
    counts = param_counts(cfg)
    assert counts.total == pytest.approx(total, rel=0.02)
    assert counts.active - hf["vocab_size"] * hf["hidden_size"] == pytest.approx(active, rel=0.02)


def test_defaults_are_gpt_oss_config():
    """A config.json without layer_types, rope or window: GptOssConfig's alternate layers, YaRN x32 and 128."""
    bare = {k: v for k, v in GPT_OSS_20B.items() if k not in ("layer_types", "rope_scaling", "sliding_window")}
    cfg = config_from_hf(bare)
    assert cfg.sliding_windows == (128, None) * (LAYERS_20B // 2)
    assert (cfg.rope.type, cfg.rope.factor, cfg.rope.original_max_position_embeddings) == ("yarn", 32.0, 4096)


def mxfp4_folder(folder, dest):
    """gpt-oss's MXFP4 layout: each expert stack's `_blocks` / `_scales` out-major ([E, 2I, H/32, 16] for
    gate_up_proj, whose bf16 form is [E, H, 2I]); everything else as it was."""
    dest.mkdir()
    tensors = load_file(folder / "model.safetensors")
    out = {}
    for name, tensor in tensors.items():
        if re.search(r"experts\.(gate_up|down)_proj$", name):
            parts = [encode_mxfp4(expert.T) for expert in tensor]  # [out, in] per expert
            out[f"{name}_blocks"] = torch.stack([blocks for blocks, _ in parts])
            out[f"{name}_scales"] = torch.stack([scales for _, scales in parts])
        else:
            out[name] = tensor
    save_file(out, dest / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = GPT_OSS_20B["quantization_config"]
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def decoded_folder(folder, quantized, dest):
    """The bf16 checkpoint `folder` holding the MXFP4 checkpoint `quantized`'s decoded expert values (float32, in
    the transposed layout)."""
    shutil.copytree(folder, dest)
    tensors = load_file(folder / "model.safetensors")
    stored = Checkpoint(quantized)
    for name in tensors:
        if name.endswith(("gate_up_proj", "down_proj")):
            tensors[name] = stored.read_logical(name).float().transpose(1, 2).contiguous()
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def mxfp4_checkpoints(tmp_path_factory):
    """(bf16 source, its MXFP4 checkpoint, the bf16 checkpoint of the MXFP4 values), MXFP4 needing in-widths of 32."""
    tmp = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    folder = tmp / "bf16"
    write_checkpoint("gpt_oss", folder, overrides={"intermediate_size": 32})
    quantized = mxfp4_folder(folder, tmp / "mxfp4")
    return folder, quantized, decoded_folder(folder, quantized, tmp / "decoded")


def test_mxfp4_experts_load_in_their_block_layout(mxfp4_checkpoints):
    """The MXFP4 checkpoint equals a bf16 one holding its decoded values in the transposed layout: its experts
    become int8 on their own grid (unpacking gives the MXFP4 values exactly), gate and up rows taken alternately."""
    folder, quantized, decoded = mxfp4_checkpoints
    model = offload.load(quantized, device="cpu")
    # An MXFP4 checkpoint's experts run on the CPU workers as int8 unless asked otherwise.
    assert model.load_info.expert_format == "int8"
    stacks = load_file(decoded / "model.safetensors")
    for layer, moe in enumerate(model.transformer.moe_blocks()):
        gate_up = stacks[f"model.layers.{layer}.mlp.experts.gate_up_proj"].transpose(1, 2)  # [E, 2I, H]
        down = stacks[f"model.layers.{layer}.mlp.experts.down_proj"].transpose(1, 2)  # [E, H, I]
        for packed, values in zip((moe.experts.gate, moe.experts.up, moe.experts.down),
                                  (gate_up[:, 0::2], gate_up[:, 1::2], down)):
            assert torch.equal(torch.from_numpy(unpack(packed)), values)
    expected = offload.load(decoded, device="cpu").logits(IDS)
    assert rel_err(model.logits(IDS), expected) <= 4e-2
    assert rel_err(expected, offload.load(folder, device="cpu").logits(IDS)) > 1e-4  # MXFP4 did change the values


@pytest.mark.parametrize("experts", [None, "int4"])
def test_convert_of_the_mxfp4_checkpoint(mxfp4_checkpoints, tmp_path, experts):
    """The published MXFP4 layout converts (int8 by default: its own grid; int4 requantized), and the store gives
    the logits of loading the MXFP4 checkpoint itself in that format."""
    _, quantized, _ = mxfp4_checkpoints
    store = tmp_path / "store"
    cli_text("convert", quantized, store, *(("--experts", experts) if experts else ()))
    from_store = offload.load(store, device="cpu")
    assert from_store.load_info.expert_format == (experts or "int8")
    assert torch.equal(from_store.logits(IDS), offload.load(quantized, device="cpu", experts=experts).logits(IDS))
    described = cli_text("inspect", store)
    assert f"routed experts packed as {experts or 'int8'}" in described and "converted from mxfp4" in described


@pytest.mark.parametrize("experts, dense", [("int8", "bf16"), ("int4", "int8")])
def test_convert_carries_biases_and_activation(checkpoint_dir, tmp_path, experts, dense):
    """A converted gpt-oss store keeps the experts' biases and clamped SwiGLU: it gives the logits of loading the
    source in the same formats (int8 experts alone: within int8's bound of transformers')."""
    folder, ref = checkpoint_dir("gpt_oss")
    check_plan_and_convert(folder, tmp_path / "store", 3, IDS, experts=experts, dense=dense)
    model = offload.load(tmp_path / "store", device="cpu")
    for moe in model.transformer.moe_blocks():
        assert moe.experts.biases is not None and moe.experts.activation.kind == "clamped_swiglu"
    if dense == "bf16":
        assert rel_err(model.logits(IDS), reference_logits(ref, IDS)) <= 2e-2


@pytest.mark.parametrize("misread", ["swapped", "as_halves"])
def test_misread_fused_rows_leave_the_int8_bound(checkpoint_dir, tmp_path, monkeypatch, misread):
    """Guard for the convert tests: gate and up swapped, or the interleaved rows read as halves, move a store's
    logits far further from transformers' than int8 experts do."""
    check_misread_fused_rows(*checkpoint_dir("gpt_oss"), tmp_path / "store", monkeypatch, misread, IDS)


WHOLE_LAYER = re.compile(r"experts\.(gate_up|down)_proj(_blocks|_scales)?$")  # a fused layer's weight tensors


def test_fused_layers_are_read_one_expert_at_a_time(checkpoint_dir, mxfp4_checkpoints, tmp_path, monkeypatch):
    """Loading (packed experts, and the float reference) and converting never read a whole-layer expert tensor at
    once, and with packed experts no float tensor as large as one layer's gate stack [E, I, H] is ever allocated;
    the float reference load, which keeps such stacks (filled one expert at a time), shows that the probe sees
    them."""
    for method in ("read", "read_logical"):
        def refuse(checkpoint, name, whole=getattr(Checkpoint, method)):
            assert not WHOLE_LAYER.search(name), f"{name} read whole"
            return whole(checkpoint, name)

        monkeypatch.setattr(Checkpoint, method, refuse)
    for folder in (checkpoint_dir("gpt_oss")[0], mxfp4_checkpoints[1]):
        cfg = Checkpoint(folder).config_json
        layer_stack = cfg["num_local_experts"] * cfg["intermediate_size"] * cfg["hidden_size"]
        for action in (lambda: offload.load(folder, device="cpu", experts="int4", max_context=64),
                       lambda: convert(folder, tmp_path / folder.name, "int4")):
            with FloatAllocations() as probe:
                action()
            assert max(probe.sizes) < layer_stack
    folder = checkpoint_dir("gpt_oss")[0]
    with FloatAllocations() as probe:  # the float reference load
        offload.load(folder, device="cpu", max_context=64)
    cfg = Checkpoint(folder).config_json
    assert max(probe.sizes) >= cfg["num_local_experts"] * cfg["intermediate_size"] * cfg["hidden_size"]


def test_sinks_matter_in_the_tiny_model(checkpoint_dir):
    """Guard for the reference runner: without its sinks the model gives other logits."""
    folder, ref = checkpoint_dir("gpt_oss")
    model = offload.load(folder, device="cpu")
    for layer in model.transformer.layers:
        layer.attn.sinks = torch.full_like(layer.attn.sinks, float("-inf"))
    assert rel_err(model.logits(IDS), reference_logits(ref, IDS)) > 1e-3


# The harmony format as gpt-oss's chat_template.jinja renders it (abridged: no tools): a system header with the
# reasoning effort and the date, the first system/developer message as developer instructions, the assistant's
# thinking on the analysis channel and its answer on the final one.
HARMONY = """{#- harmony -#}
{%- macro system_header(effort) -%}
<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06
Current date: {{ strftime_now("%Y-%m-%d") }}

Reasoning: {{ effort }}

# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>
{%- endmacro -%}
{{- system_header(reasoning_effort | default("medium")) -}}
{%- if messages and messages[0].role in ("system", "developer") -%}
<|start|>developer<|message|># Instructions

{{ messages[0].content | trim }}<|end|>
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if message.role == "user" -%}
<|start|>user<|message|>{{ message.content }}<|end|>
{%- elif message.role == "assistant" -%}
{%- if message.thinking is defined and loop.last and not add_generation_prompt -%}
<|start|>assistant<|channel|>analysis<|message|>{{ message.thinking }}<|end|>
{%- endif -%}
<|start|>assistant<|channel|>final<|message|>{{ message.content }}
{{- "<|return|>" if loop.last and not add_generation_prompt else "<|end|>" }}
{%- else -%}
{{- raise_exception("harmony has no role " ~ message.role) -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"""


def test_harmony_chat_template_renders_as_transformers(tmp_path):
    folder = tmp_path / "harmony"
    _train_byte_level(folder)
    _write_config(folder, eos_token="<|return|>", pad_token="<|endoftext|>")
    (folder / "chat_template.jinja").write_text(HARMONY, encoding="utf-8")
    ours, ref = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(str(folder))
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Answer briefly. "}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4", "thinking": "Simple sum."}],
        [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "More, café 日本?"}],
    ]
    for messages in conversations:
        for gen in (True, False):
            for effort in ({}, {"reasoning_effort": "high"}):
                expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **effort)
                assert ours.apply_chat_template(messages, add_generation_prompt=gen, **effort) == expected
    text = ours.apply_chat_template(conversations[1], add_generation_prompt=False)
    assert "<|channel|>analysis<|message|>Simple sum.<|end|>" in text and text.endswith("4<|return|>")
    assert "Reasoning: medium" in text and "# Instructions\n\nAnswer briefly.<|end|>" in text


def test_inspect_and_plan_commands(checkpoint_dir):
    folder, _ = checkpoint_dir("gpt_oss")
    text = cli_text("inspect", folder)
    assert "gpt_oss (GptOssForCausalLM)" in text
    assert "GQA, 4 query heads, 2 KV heads, head dim 16, q/k/v/o bias, attention sinks, sliding window 7" in text
    assert "8 routed, top-2, softmax scores, greedy, router bias, clamped_swiglu experts with biases" in text
    plan = json.loads(cli_text("plan", folder, "--gpu-memory", "2MiB", "--max-context", "64", "--json"))
    assert len(plan["layers"]) == 3

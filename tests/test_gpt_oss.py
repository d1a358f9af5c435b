"""gpt-oss (gpt_oss) beyond the shared reference runner: the config.json the published checkpoints use, their MXFP4
experts in the out-major block layout, the published sizes, the harmony chat format, and inspect / plan."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer
from typer.testing import CliRunner

import offload
from offload.arch import config_from_hf
from offload.cli import app
from offload.inspect import param_counts
from offload.tokenizer import Tokenizer
from offload.weights.checkpoint import Checkpoint
from offload.weights.encoders import encode_mxfp4
from test_tokenizer import _train_byte_level, _write_config
from tiny_models import cli_text, reference_logits, rel_err, write_checkpoint

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


def test_mxfp4_experts_load_in_their_block_layout(tmp_path):
    """The MXFP4 checkpoint equals a bf16 one holding its decoded values in the transposed layout."""
    folder = tmp_path / "bf16"
    write_checkpoint("gpt_oss", folder, overrides={"intermediate_size": 32})  # MXFP4 needs in-widths of 32
    quantized = mxfp4_folder(folder, tmp_path / "mxfp4")
    model = offload.load(quantized, device="cpu")
    decoded = tmp_path / "decoded"
    shutil.copytree(folder, decoded)
    tensors = load_file(folder / "model.safetensors")
    stored = Checkpoint(quantized)
    for name in tensors:
        if name.endswith(("gate_up_proj", "down_proj")):
            tensors[name] = stored.read_logical(name).float().transpose(1, 2).contiguous()
    save_file(tensors, decoded / "model.safetensors", metadata={"format": "pt"})
    # An MXFP4 checkpoint's experts run on the CPU workers as int8 unless asked otherwise.
    assert model.load_info.expert_format == "int8"
    assert torch.equal(model.logits(IDS), offload.load(decoded, device="cpu", experts="int8").logits(IDS))
    expected = offload.load(decoded, device="cpu").logits(IDS)
    assert rel_err(model.logits(IDS), expected) <= 4e-2
    assert rel_err(expected, offload.load(folder, device="cpu").logits(IDS)) > 1e-4  # MXFP4 did change the values


def test_convert_of_fused_experts_is_one_clear_error(checkpoint_dir, tmp_path):
    folder, _ = checkpoint_dir("gpt_oss")
    result = CliRunner().invoke(app, ["convert", str(folder), str(tmp_path / "store"), "--experts", "int8"])
    assert result.exit_code == 2
    assert "convert does not yet write experts stored as whole-layer tensors" in result.output


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

"""Tiny random checkpoints for every supported architecture and variant, written by transformers itself."""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from offload.weights.fused import FusedExperts

COMMON = dict(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, initializer_range=0.08,
              max_position_embeddings=256, tie_word_embeddings=False)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}

# name -> (model_type, config overrides)
VARIANTS: dict[str, tuple[str, dict]] = {
    "mixtral": ("mixtral", dict(num_key_value_heads=2, intermediate_size=48, num_local_experts=6,
                                num_experts_per_tok=2)),
    "mixtral_window_linear_rope": ("mixtral", dict(
        num_key_value_heads=2, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, sliding_window=7,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "qwen2_moe": ("qwen2_moe", dict(num_key_value_heads=2, intermediate_size=80, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=40, num_experts=8, num_experts_per_tok=2,
                                    norm_topk_prob=False, decoder_sparse_step=1)),
    "qwen2_moe_sparse_step": ("qwen2_moe", dict(num_key_value_heads=4, intermediate_size=80, moe_intermediate_size=32,
                                                shared_expert_intermediate_size=40, num_experts=4,
                                                num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=2)),
    "qwen3_moe": ("qwen3_moe", dict(num_key_value_heads=2, head_dim=24, intermediate_size=80,
                                    moe_intermediate_size=32, num_experts=8, num_experts_per_tok=3,
                                    norm_topk_prob=True, mlp_only_layers=[1])),
    "qwen3_moe_bias": ("qwen3_moe", dict(num_key_value_heads=2, head_dim=16, intermediate_size=80,
                                         moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                         norm_topk_prob=False, attention_bias=True)),
    "olmoe": ("olmoe", dict(num_key_value_heads=4, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                            clip_qkv=None, eos_token_id=95, pad_token_id=1)),
    "olmoe_clip": ("olmoe", dict(num_key_value_heads=2, intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                 clip_qkv=0.5, norm_topk_prob=True, eos_token_id=95, pad_token_id=1)),
    "deepseek_v2": ("deepseek_v2", dict(
        num_key_value_heads=4, intermediate_size=80, moe_intermediate_size=24, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16,
        qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, topk_method="greedy", routed_scaling_factor=1.5)),
    "deepseek_v2_group_yarn": ("deepseek_v2", dict(
        num_key_value_heads=4, intermediate_size=80, moe_intermediate_size=24, n_routed_experts=8,
        num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=0, q_lora_rank=20, kv_lora_rank=16,
        qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=12, topk_method="group_limited_greedy", n_group=4,
        topk_group=2, rope_parameters=YARN)),
    "deepseek_v3": ("deepseek_v3", dict(
        num_key_value_heads=4, intermediate_size=80, moe_intermediate_size=24, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=20, kv_lora_rank=16,
        qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, n_group=4, topk_group=2, rope_parameters=YARN,
        routed_scaling_factor=2.5)),
    "deepseek_v3_no_interleave": ("deepseek_v3", dict(
        num_key_value_heads=4, intermediate_size=80, moe_intermediate_size=24, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16,
        qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, n_group=2, topk_group=1, rope_interleave=False,
        norm_topk_prob=False)),
    # GLM-4.5 / 4.6: partial RoPE (half of each head), q/k/v bias, per-head q/k norm, a dense first layer, group
    # routing with correction bias, a shared expert.
    "glm4_moe": ("glm4_moe", dict(
        num_key_value_heads=2, head_dim=32, partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=True,
        intermediate_size=80, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        num_nextn_predict_layers=1, eos_token_id=[94, 95])),
    # GLM-4.5-Air's shape: no q/k norm, one group, two shared experts, a quarter of each head rotated.
    "glm4_moe_air": ("glm4_moe", dict(
        num_key_value_heads=1, head_dim=16, partial_rotary_factor=0.25, attention_bias=True, use_qk_norm=False,
        intermediate_size=80, moe_intermediate_size=24, n_routed_experts=6, num_experts_per_tok=3, n_shared_experts=2,
        first_k_dense_replace=2, routed_scaling_factor=1.0, norm_topk_prob=False, rope_theta=1e6)),
    # GLM-4.7-Flash: DeepSeek-V3's MLA and routing, dense layers listed in mlp_layer_types.
    "glm4_moe_lite": ("glm4_moe_lite", dict(
        num_key_value_heads=4, intermediate_size=80, moe_intermediate_size=24, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, q_lora_rank=20, kv_lora_rank=16, qk_nope_head_dim=12,
        qk_rope_head_dim=8, v_head_dim=10, n_group=2, topk_group=1, routed_scaling_factor=1.8,
        mlp_layer_types=["dense", "dense", "sparse"])),
    # DeepSeek-V3.2: DeepSeek-V3 with a lightning indexer per layer; index_topk 8 is far below the tests' contexts,
    # so attention really reads a subset of the positions.
    "deepseek_v32": ("deepseek_v32", dict(
        num_key_value_heads=4, intermediate_size=80, moe_intermediate_size=24, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=20, kv_lora_rank=16,
        qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, n_group=4, topk_group=2, rope_parameters=YARN,
        routed_scaling_factor=2.5, index_topk=8, index_head_dim=16, index_n_heads=8)),
    # GLM-5: the indexer rotates interleaved pairs, and the middle layer reuses the first layer's top-k.
    "glm_moe_dsa": ("glm_moe_dsa", dict(
        num_key_value_heads=4, intermediate_size=80, moe_intermediate_size=24, n_routed_experts=6,
        num_experts_per_tok=2, n_shared_experts=1, q_lora_rank=20, kv_lora_rank=16, qk_nope_head_dim=12,
        qk_rope_head_dim=8, v_head_dim=10, n_group=1, topk_group=1, routed_scaling_factor=1.8,
        mlp_layer_types=["dense", "sparse", "sparse"], index_topk=12, index_head_dim=16, index_n_heads=6,
        indexer_types=["full", "shared", "full"])),
    # MiniMax-M2: full-width q/k norm, a quarter of each head rotated (the published rotary_dim), sigmoid routing with
    # the correction bias beside the gate, w1/w3/w2 experts under block_sparse_moe.
    "minimax_m2": ("minimax_m2", dict(
        num_key_value_heads=2, head_dim=32, rotary_dim=8, intermediate_size=24, num_local_experts=8,
        num_experts_per_tok=3, use_qk_norm=True, bos_token_id=1, eos_token_id=95)),
    # dots.llm1: Qwen3 attention (per-head q/k norm) with DeepSeek-V3 routing, two shared experts, a dense first layer.
    "dots1": ("dots1", dict(
        num_key_value_heads=4, intermediate_size=80, moe_intermediate_size=24, n_routed_experts=8,
        num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1, norm_topk_prob=True,
        routed_scaling_factor=2.5, sliding_window=None, rope_theta=1e7)),
    # dots1 as transformers allows it beyond the published shape: bias on q/k/v/o, sliding window 7 from layer 1 on
    # (max_window_layers), group-limited routing, unnormalised weights.
    "dots1_window_bias": ("dots1", dict(
        num_key_value_heads=2, intermediate_size=80, moe_intermediate_size=24, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0, norm_topk_prob=False, n_group=4,
        topk_group=2, attention_bias=True, sliding_window=7, max_window_layers=1)),
    # Qwen3-Next: Gated DeltaNet layers 0 and 2 around a gated full-attention layer (a quarter of each head rotated),
    # two value heads per key head, a dense last layer.
    "qwen3_next": ("qwen3_next", dict(
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=12, linear_conv_kernel_dim=4, intermediate_size=48, moe_intermediate_size=24,
        shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2, full_attention_interval=2,
        mlp_only_layers=[2], eos_token_id=95)),
    # Qwen3.5-35B-A3B's layout (a vision tower around the text model), four projections per DeltaNet layer.
    "qwen3_5_moe": ("qwen3_5_moe", dict(
        num_key_value_heads=1, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=8, linear_conv_kernel_dim=4, moe_intermediate_size=24, shared_expert_intermediate_size=40,
        num_experts=8, num_experts_per_tok=3, layer_types=["linear_attention", "linear_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25,
                         "mrope_section": [1, 1, 2], "mrope_interleaved": True})),
    # ERNIE-4.5-21B-A3B: RoPE over adjacent pairs, use_bias on attention and dense/shared MLPs, a dense first layer,
    # softmax routing with the statistics bias, two shared experts, tied embeddings.
    "ernie4_5_moe": ("ernie4_5_moe", dict(
        num_key_value_heads=2, intermediate_size=80, moe_intermediate_size=24, moe_num_experts=8, moe_k=3,
        moe_num_shared_experts=2, moe_layer_start_index=1, use_bias=True, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    # ERNIE-4.5-300B-A47B's shape: no shared experts, no biases; here also MoE on every second layer only.
    "ernie4_5_moe_interval": ("ernie4_5_moe", dict(
        num_key_value_heads=1, head_dim=32, intermediate_size=80, moe_intermediate_size=24, moe_num_experts=6,
        moe_k=2, moe_num_shared_experts=0, moe_layer_start_index=0, moe_layer_end_index=2, moe_layer_interval=2,
        use_bias=False)),
    # Hunyuan-A13B: per-head q/k norm after RoPE, RoPE stretched by NTK alpha, per-layer moe_topk lists, a shared MLP
    # as wide as each expert, tied embeddings.
    "hunyuan_v1_moe": ("hunyuan_v1_moe", dict(
        num_key_value_heads=2, head_dim=16, intermediate_size=24, num_experts=8, moe_topk=[2, 2, 2],
        use_qk_norm=True, use_mixed_mlp_moe=True, use_cla=False, tie_word_embeddings=True,
        rope_parameters={"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0})),
    # Hunyuan as transformers allows it beyond the published shape: bias on q/k/v/o, plain RoPE, one top-k.
    "hunyuan_v1_moe_bias": ("hunyuan_v1_moe", dict(
        num_key_value_heads=4, head_dim=32, intermediate_size=24, num_experts=6, moe_topk=2, attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # gpt-oss: attention sinks, sliding window on alternate layers (7 here), biases everywhere, router bias,
    # interleaved fused experts with biases, the clamped SwiGLU (a small limit, so the clamps bite at this scale).
    "gpt_oss": ("gpt_oss", dict(
        num_key_value_heads=2, head_dim=16, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
        sliding_window=7, swiglu_limit=0.5, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 64, "rope_theta": 150000.0})),
    # Llama-4 Scout's layout (a vision tower around the text model): every layer MoE with top-1 routing that scales
    # the expert's input, a shared expert; RoPE layers with chunked attention (chunks of 8, so a 24-token prompt
    # crosses two boundaries), L2 q/k norm and Llama-3 rope scaling; a no-RoPE layer (the third) with full attention
    # and the query temperature (floor_scale 4, so it changes every 4 positions here).
    "llama4": ("llama4", dict(
        num_key_value_heads=2, head_dim=16, intermediate_size=24, intermediate_size_mlp=40, num_local_experts=8,
        num_experts_per_tok=1, interleave_moe_layer_step=1, no_rope_layer_interval=3, attention_chunk_size=8,
        use_qk_norm=True, attn_temperature_tuning=True, floor_scale=4, attn_scale=0.5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    # Llama-4 Maverick's shape as a text-only Llama4ForCausalLM: MoE on every second layer (dense MLPs of
    # intermediate_size_mlp between), no q/k norm; here also top-2, so each routed slot scales its own input.
    "llama4_text": ("llama4_text", dict(
        num_key_value_heads=1, head_dim=32, intermediate_size=24, intermediate_size_mlp=40, num_local_experts=6,
        num_experts_per_tok=2, interleave_moe_layer_step=2, no_rope_layers=[1, 0, 1], attention_chunk_size=8,
        use_qk_norm=False, floor_scale=4, attn_scale=0.3,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
}
# Multimodal checkpoints: the variant's fields are the text model's; this is the (tiny) vision tower around it.
VISION_TOWERS = {"qwen3_5_moe": dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64),
                 "llama4": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                image_size=56, patch_size=14, vision_output_dim=32, projector_input_dim=32,
                                projector_output_dim=32)}

# Selection biases' scale: sigmoid scores spread over (0, 1); softmax scores of E experts sit near 1/E.
CORRECTION_BIAS_STD = {"ernie4_5_moe": 0.02}
# Families that normalise q/k after RoPE: their norm weights get random values, since unit ones commute with it.
QK_NORMS_AFTER_ROPE = {"hunyuan_v1_moe"}


def build_reference(name: str, seed: int = 0, overrides: dict | None = None):
    """The transformers model for a variant (config fields changed by `overrides`), in fp32 eval mode, with
    non-trivial router correction biases, projection biases and norm weights (transformers initialises them to zero
    or one, which would leave a dropped bias, a misread norm or a q/k norm on the wrong side of RoPE unnoticed), and
    Gated DeltaNet decays slow enough that the recurrent state carries far (A in [0.01, 0.5])."""
    import transformers

    model_type, variant = VARIANTS[name]
    fields = {**COMMON, **variant, **(overrides or {})}
    if model_type in VISION_TOWERS:
        config = transformers.CONFIG_MAPPING[model_type](text_config=fields, vision_config=VISION_TOWERS[model_type],
                                                         tie_word_embeddings=False)
    else:
        config = transformers.CONFIG_MAPPING[model_type](**fields)
    torch.manual_seed(seed)
    multimodal = model_type in VISION_TOWERS
    auto = transformers.AutoModelForImageTextToText if multimodal else transformers.AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32).eval()
    bias_std = CORRECTION_BIAS_STD.get(model_type, 0.3)
    with torch.no_grad():
        for tensor_name, tensor in [*model.named_buffers(), *model.named_parameters()]:
            if tensor_name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn_like(tensor) * bias_std)
            elif tensor_name.endswith(("_proj.bias", "lm_head.bias", "_proj_bias")):
                tensor.copy_(torch.randn_like(tensor) * 0.1)
            elif model_type in ("qwen3_next", "qwen3_5_moe") and tensor_name.endswith("norm.weight"):
                tensor.add_(torch.randn_like(tensor) * 0.1)  # zero-centred: the scale is 1 + weight
            elif model_type in QK_NORMS_AFTER_ROPE and re.search(r"\.self_attn\..*norm\.weight$", tensor_name):
                tensor.copy_(1 + torch.randn_like(tensor) * 0.2)  # unit q/k norms commute with RoPE
            if tensor_name.endswith("linear_attn.A_log"):
                tensor.copy_(torch.empty_like(tensor).uniform_(0.01, 0.5).log())
    return model


# Multimodal wrappers whose own forward cannot run a text-only prompt in the installed transformers (Llama-4's reads
# image outputs from its text model's result): their text model, the same weights, is the reference.
TEXT_REFERENCES = {"llama4": "language_model"}


def write_checkpoint(name: str, folder: Path, seed: int = 0, overrides: dict | None = None, **save_kwargs):
    """Save a variant as a Hugging Face folder; returns the reference model."""
    model = build_reference(name, seed, overrides)
    model.save_pretrained(folder, **save_kwargs)
    text_model = TEXT_REFERENCES.get(VARIANTS[name][0])
    return getattr(model, text_model) if text_model else model


def landing_bytes(cfg, fmt: str = "float32") -> int:
    """The staging ring's device landing buffers (one expert's host bytes in `fmt` per entry) that a plan reserves in
    the device budget where experts stay on the host."""
    from offload.experts.device import STAGING_RING_ENTRIES
    from offload.placement import expert_host_bytes

    return STAGING_RING_ENTRIES * expert_host_bytes(cfg, fmt)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the logits error the tests bound."""
    return ((a - b).abs().max() / b.abs().max()).item()


def share_within(got: torch.Tensor, expected: torch.Tensor, bound: float) -> float:
    """Share of positions (rows of [T, vocab] logits) whose max |error| / max |expected| is within `bound`.

    A quantized expert format bounds most positions; at a near tie its rounding may flip one router choice, which
    moves that position's logits by far more than the format's error (and a well-placed bound on the max would only
    measure the seed). Tests therefore bound the share of positions within the format's error, next to top-1."""
    per_position = (got - expected).abs().amax(-1) / expected.abs().max()
    return (per_position <= bound).float().mean().item()


def reference_logits(ref, ids: torch.Tensor) -> torch.Tensor:
    """The transformers model's logits [T, vocab] for one sequence of ids."""
    with torch.no_grad():
        return ref(ids[None]).logits[0]


def clone_with_config(folder: Path, dest: Path, edit: Callable[[dict], dict]) -> Path:
    """A copy of a checkpoint folder whose config.json is `edit(config)`: published spellings, broken configs."""
    shutil.copytree(folder, dest)
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps(edit(config)))
    return dest


def cli_text(*args) -> str:
    """`offload ARGS`' stdout with whitespace runs as one space (rich wraps table cells); it must succeed."""
    from typer.testing import CliRunner

    from offload.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return re.sub(r"\s+", " ", result.stdout)


def check_plan_and_convert(folder: Path, store: Path, moe_layers: int, ids: torch.Tensor, experts: str = "int4",
                           dense: str = "int8") -> None:
    """`offload plan` places every MoE layer; `offload convert` writes a store that gives the logits of converting
    at load (int4 experts, int8 dense by default), and that `inspect` and `plan` describe."""
    import offload

    plan = json.loads(cli_text("plan", folder, "--gpu-memory", "2MiB", "--max-context", "64", "--json"))
    assert len(plan["layers"]) == moe_layers
    cli_text("convert", folder, store, "--experts", experts, "--dense", dense)
    from_store = offload.load(store, device="cpu")
    at_load = offload.load(folder, device="cpu", experts=experts, dense=dense)
    assert torch.equal(from_store.logits(ids), at_load.logits(ids))
    described = json.loads(cli_text("inspect", store, "--json"))
    assert described["layers"]["moe"] == moe_layers and described["parameters"] == json.loads(
        cli_text("inspect", folder, "--json"))["parameters"]
    assert described["store"] == {"experts": experts, "dense": dense}
    assert f"routed experts packed as {experts}, dense matrices as {dense}" in cli_text("inspect", store)
    store_plan = json.loads(cli_text("plan", store, "--gpu-memory", "2MiB", "--max-context", "64", "--json"))
    assert len(store_plan["layers"]) == moe_layers


# Misreadings of a fused gate_up_proj (weights.fused.FusedExperts.rows): gate and up swapped, or the rows of the
# other layout.
_ROWS = FusedExperts.rows
MISREAD_ROWS = {"swapped": lambda fused, part: _ROWS(fused, 1 - part if part < 2 else part),
                "as_halves": lambda fused, part: _ROWS(replace(fused, layout="halves"), part),
                "as_interleaved": lambda fused, part: _ROWS(replace(fused, layout="interleaved"), part)}


def check_misread_fused_rows(folder: Path, ref, store: Path, monkeypatch, misread: str, ids: torch.Tensor) -> None:
    """A store converted with MISREAD_ROWS[misread] gives logits more than 5x further from transformers' than
    int8 experts read right do: a store checked against the reference within int8's bound catches the misreading."""
    import offload
    from offload.weights.store import convert

    expected = reference_logits(ref, ids)
    right = rel_err(offload.load(folder, device="cpu", experts="int8").logits(ids), expected)
    monkeypatch.setattr(FusedExperts, "rows", MISREAD_ROWS[misread])
    convert(folder, store, "int8")
    wrong = rel_err(offload.load(store, device="cpu").logits(ids), expected)
    assert wrong > 5 * max(right, 1e-3), (wrong, right)


class FloatAllocations(TorchDispatchMode):
    """Records the element count of every floating-point tensor an op allocates (meta tensors, and views of the
    op's inputs, such as a slice of a memory-mapped file, aside): what a load or a convert materialises in torch."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = [0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta" \
                    and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append(t.untyped_storage().nbytes() // t.element_size())
        return out

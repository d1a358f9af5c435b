"""Synthetic checkpoints with the shapes of real MoE models and random weights, written one layer at a time.

    python tools/make_checkpoint.py qwen3-30b-a3b /data/qwen3-int4 --experts-format int4 --dense bf16
    python tools/make_checkpoint.py mixtral-8x7b /data/mixtral-hf --hf
    python tools/make_checkpoint.py deepseek-v3 /data/dsv3-fp8 --layers 4 --fp8
    python tools/make_checkpoint.py deepseek-v3 /tmp/dsv3-4 --layers 4 --embed-std 1 --out-std 0.002 --skew 1

SHAPE is one of SHAPES: the model's own config.json (architecture values as published on the Hugging Face hub,
without quantization_config / auto_map: the weights here are bf16; `--fp8` adds DeepSeek-V3's); for a multimodal
model (Qwen3.5) its text model's config. `--layers N` keeps the first N decoder layers.

Three outputs, all streamed one shard (one decoder layer) at a time, each shard written to a temporary name and
renamed when complete:

- `--hf`: a Hugging Face bf16 folder (config.json, generation_config.json, model-0000k-of-0000n.safetensors,
  model.safetensors.index.json). Each shard's safetensors header is written from the shapes first and then every
  tensor in chunks, so memory stays at one chunk (8 MB), not one layer.
- `--fp8` (implies `--hf`): the same folder in DeepSeek-V3's published FP8 layout, as `offload convert` and
  `offload.load` read it: every Linear weight of the decoder layers (attention, dense MLPs, shared and routed
  experts) an F8_E4M3 `weight` plus a float32 `weight_scale_inv` [ceil(O/128), ceil(K/128)], quantized by
  offload.weights.encoders.encode_fp8_block from the bf16 values `--hf` writes; embeddings, norms, routers and
  LM head stay bf16; config.json gets DeepSeek-V3's quantization_config. The header is written from the encoded
  dtypes and shapes (each scale directly after its weight), and each matrix is encoded one band of 128-row tile
  rows at a time, so memory stays at about one chunk here too.
- default: offload's pre-quantized store (offload.weights.store.write_store) in `--experts-format` /
  `--dense`: no bf16 copy of the model is ever written. Memory: one packed matrix, plus the shard's tensors
  written as made (for the last shard, the bf16 embedding and LM head).

All modes resume an interrupted run from its finished shards when run again with the same arguments.
`tools/gguf_export.py --synthetic SHAPE` writes llama.cpp's GGUF of the same values (same options), so a store
and a GGUF of one model need no bf16 folder on disk.

All modes take the tensor names, shapes and shard grouping from offload's own loader (store.tensor_roles and
store.shard_roles), and every value from `Values`: deterministic per tensor NAME (a generator seeded with
the CRC-32 of "SEED:NAME"), so the order of writing does not matter, `--hf` and the store hold identical bf16
values (a store equals `offload.load(hf_folder, experts=F, dense=D)` bit for bit; `--fp8` holds their block-FP8
rounding) and two runs write identical files (store shards: identical up to the order of the keys in the
safetensors header's __metadata__, which the safetensors library writes in hash-map order).
Rules as offload/synthetic.py: ones for norm weights, zeros for biases and e_score_correction_bias, N(0, std)
(torch's normal_ straight into bfloat16) for everything else; except that the embedding may have its own
`--embed-std` and the matrices that write into the residual stream (o_proj, down_proj / w2) their own `--out-std`
(both default to `--std`).

Why those two: with every weight N(0, 0.02), a random model of real width is degenerate. Each Linear has a gain
of about std * sqrt(fan_in) ~ 1, while the embedding rows are 0.02 * sqrt(H) long, so from the first layer on the
residual stream is made of layer outputs, and attention (close to a running mean over positions) makes those
nearly the same for every token: the routers then send almost every token to the same experts. Measured on
Qwen3-30B-A3B shapes (offload, 512 random token ids, max/mean expert load per MoE layer, 16 = every token to the
same 8 of 128): 6 at layer 0, 15 from layer 1 on, with no skew. A large embedding and small residual writes keep
each token's identity in the stream at every depth: `--embed-std 1 --out-std 0.002` gives 1.3-1.6 at each of 10
layers.

`--skew S` makes routing skewed, computed from the seed alone: the router of MoE layer L is
c * router(L-1) + sqrt(1 - c^2) * plain(L) (c = 0.8; plain(L) is the plain random router of that name), and then
each expert's row is scaled by 1 + S * (1 - rank/E)^2 by its hotness rank: the hottest expert's scores spread
1 + S times wider than the coldest's, so it wins a top-k place more often. The ranks of layer L are those of
layer L-1 with each expert's rank released with probability 1 - c and the released ranks shuffled among
themselves (seeded per layer). So neighbouring MoE layers share most of their router and hotness order (the next
layer's router applied to the current hidden state predicts its choice, as in trained models); layer L's router
depends only on the seed and layers <= L (`--layers N` keeps the first N routers of the full model); only the
router tensors change.

Measured (offload, 512 random token ids, `--embed-std 1 --out-std 0.002`, max/mean expert load per MoE layer):
Qwen3-30B-A3B (10 layers) 1.3-1.6 at skew 0, 2.4-2.8 at skew 1; DeepSeek-V2-Lite (6 layers) 1.3-1.5 / 2.1-2.4 /
2.6-2.8 at skew 0 / 1 / 2; Mixtral-4.7B (6 layers, 8 experts) 1.1 / 1.3 / 1.4-1.5.

This differs from offload/synthetic.skew_routing, which adds a shared direction u to every embedding row
(2 * std * sqrt(H) * u) and a hotness component along u to each router row: at real widths every token is then
~80% the same vector, and through attention and the experts routing becomes nearly the same for every token at
any skew > 0 (Qwen3-30B-A3B shapes, even with --embed-std 1 and skew 0.25: max/mean 10-13 of 16).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offload.arch import architecture  # noqa: E402
from offload.weights.codecs import FP8_BLOCK  # noqa: E402
from offload.weights.encoders import encode_fp8_block  # noqa: E402
from offload.weights.store import (  # noqa: E402
    DENSE_FORMATS, EXPERT_FORMATS, TensorRole, shard_file, shard_roles, tensor_roles, write_store)

CHUNK = 1 << 22  # values generated (and written) per step: 8 MB of bf16
INDEX_FILE = "model.safetensors.index.json"
PROGRESS_FILE = ".make_checkpoint.json"  # in an unfinished --hf folder: the options it was started with
LAYER_CORRELATION = 0.8  # --skew: share of the router and of the hotness ranks neighbouring MoE layers keep
EMBEDDING = "model.embed_tokens.weight"
RECOMMENDATION = ("For realistic routing (see the module docstring): --embed-std 1 --out-std 0.002, plus e.g. "
                  "--skew 1 for hot experts.")
OUTPUTS = (".o_proj.weight", ".down_proj.weight", ".w2.weight")  # the matrices that write into the residual stream
FP8_CONFIG: dict[str, Any] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(FP8_BLOCK),
                              "activation_scheme": "dynamic"}  # DeepSeek-V3's quantization_config
SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv
DTYPE_BYTES = {"BF16": 2, "F8_E4M3": 1, "F32": 4}  # the safetensors dtypes written here

# --- shapes: the published config.json of each model ----------------------------------------------------------

MIXTRAL_8X7B: dict[str, Any] = {  # mistralai/Mixtral-8x7B-v0.1
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 32000,
}

# The Mixtral-shaped 4.7 B model of /work/shared/notes/baselines.md (not a published model).
MIXTRAL_4_7B: dict[str, Any] = {**MIXTRAL_8X7B, "hidden_size": 2048, "num_hidden_layers": 16,
                                "intermediate_size": 5632}

QWEN3_30B_A3B: dict[str, Any] = {  # Qwen/Qwen3-30B-A3B
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

DEEPSEEK_V2_LITE: dict[str, Any] = {  # deepseek-ai/DeepSeek-V2-Lite
    "architectures": ["DeepseekV2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 102400,
}

DEEPSEEK_V3: dict[str, Any] = {  # deepseek-ai/DeepSeek-V3 (its fp8 quantization_config dropped: weights are bf16)
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,  # the MTP layer: offload skips it, and it is not written here
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}

DEEPSEEK_V32: dict[str, Any] = {  # deepseek-ai/DeepSeek-V3.2: DeepSeek-V3 plus the lightning indexer's fields
    **{key: value for key, value in DEEPSEEK_V3.items() if key not in ("architectures", "model_type")},
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v32",
    "index_head_dim": 128,
    "index_n_heads": 64,
    "index_topk": 2048,
}

GLM_5: dict[str, Any] = {  # zai-org/GLM-5 (its MTP layer is not written)
    "architectures": ["GlmMoeDsaForCausalLM"],
    "attention_bias": False,
    "eos_token_id": [154820, 154827, 154829],
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 6144,
    "index_head_dim": 128,
    "index_n_heads": 32,
    "index_topk": 2048,
    "intermediate_size": 12288,
    "kv_lora_rank": 512,
    "max_position_embeddings": 202752,
    "model_type": "glm_moe_dsa",
    "moe_intermediate_size": 2048,
    "n_group": 1,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 78,
    "num_key_value_heads": 64,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 2048,
    "qk_nope_head_dim": 192,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000,
    "routed_scaling_factor": 2.5,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "torch_dtype": "bfloat16",
    "v_head_dim": 256,
    "vocab_size": 154880,
}

QWEN3_5_35B_A3B: dict[str, Any] = {  # Qwen/Qwen3.5-35B-A3B's text_config: its text model, as a store names it
    "architectures": ["Qwen3_5MoeForCausalLM"],
    "attention_bias": False,
    "attn_output_gate": True,
    "dtype": "bfloat16",
    "eos_token_id": 248044,
    "full_attention_interval": 4,
    "head_dim": 256,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 10,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_value_head_dim": 128,
    "max_position_embeddings": 262144,
    "model_type": "qwen3_5_moe_text",
    "moe_intermediate_size": 512,
    "mtp_num_hidden_layers": 1,  # the MTP module: offload skips it, and it is not written here
    "num_attention_heads": 16,
    "num_experts": 256,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 40,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10], "rope_type": "default",
                        "rope_theta": 10000000, "partial_rotary_factor": 0.25},
    "shared_expert_intermediate_size": 512,
    "tie_word_embeddings": False,
    "vocab_size": 248320,
}

SHAPES: dict[str, dict[str, Any]] = {
    "mixtral-8x7b": MIXTRAL_8X7B,
    "mixtral-4.7b": MIXTRAL_4_7B,
    "qwen3-30b-a3b": QWEN3_30B_A3B,
    "deepseek-v2-lite": DEEPSEEK_V2_LITE,
    "deepseek-v3": DEEPSEEK_V3,
    "deepseek-v3.2": DEEPSEEK_V32,
    "glm-5": GLM_5,
    "qwen3.5-35b-a3b": QWEN3_5_35B_A3B,
}


def shape_config(shape: str, layers: int | None = None) -> dict[str, Any]:
    """The config.json of SHAPE, keeping the first `layers` decoder layers when given."""
    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    cfg = copy.deepcopy(SHAPES[shape])
    return cfg if layers is None else truncate_layers(cfg, layers)


def truncate_layers(cfg: dict[str, Any], n: int) -> dict[str, Any]:
    """cfg with its first n decoder layers. DeepSeek's leading dense layers shrink to at most n - 1, so a
    truncated model still has an MoE layer (n = 1: the one layer is MoE)."""
    if n < 1:
        raise SystemExit(f"--layers must be at least 1, got {n}")
    full = cfg["num_hidden_layers"]
    if n >= full:
        return cfg
    cfg = dict(cfg, num_hidden_layers=n)
    if "first_k_dense_replace" in cfg:
        cfg["first_k_dense_replace"] = min(cfg["first_k_dense_replace"], n - 1)
    if "max_window_layers" in cfg:
        cfg["max_window_layers"] = min(cfg["max_window_layers"], n)
    if cfg.get("mlp_only_layers"):
        cfg["mlp_only_layers"] = [i for i in cfg["mlp_only_layers"] if i < n]
    if cfg.get("layer_types"):
        cfg["layer_types"] = cfg["layer_types"][:n]
    return cfg


# --- values ----------------------------------------------------------------------------------------------------

def name_seed(seed: int, name: str) -> int:
    """A generator seed from the run's seed and a stable hash of the tensor name. 32 bits, because torch's CPU
    generator (mt19937) only uses the low 32 bits of its seed: among DeepSeek-V3's ~47k tensors two may share
    a seed (p ~ 0.25), i.e. hold identical values — harmless for a synthetic model."""
    return zlib.crc32(f"{seed}:{name}".encode())


class Values:
    """Every tensor of a synthetic checkpoint, deterministic per name: `chunks(name, shape)` yields its values as
    bfloat16 blocks of whole leading-dimension rows (flattened), `tensor(name, shape)` the whole tensor."""

    def __init__(self, hf_config: dict[str, Any], seed: int = 0, std: float = 0.02, skew: float = 0.0,
                 embed_std: float | None = None, out_std: float | None = None,
                 correlation: float = LAYER_CORRELATION):
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        arch = architecture(hf_config.get("model_type"))
        cfg = arch.config_from_hf(hf_config)
        self.seed, self.std, self.skew, self.correlation = seed, std, skew, correlation
        self.embed_std = std if embed_std is None else embed_std
        self.out_std = std if out_std is None else out_std
        self.moe_layers = [i for i, sparse in enumerate(cfg.moe_layers) if sparse]
        self.routers = {f"model.layers.{i}.{arch.names.moe}.{arch.names.router}.weight": i for i in self.moe_layers}
        self._chain: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (layer, router before hotness, ranks)

    # plain random values
    def _generator(self, name: str) -> torch.Generator:
        return torch.Generator().manual_seed(name_seed(self.seed, name))

    def _plain_chunks(self, name: str, shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
        numel = math.prod(shape)
        row = numel // shape[0] if len(shape) > 1 and shape[0] else numel
        step = max(1, CHUNK // max(row, 1)) * row
        if name.endswith(("norm.weight", ".bias", "e_score_correction_bias")):
            fill = 1.0 if name.endswith("norm.weight") else 0.0
            for start in range(0, numel, step):
                yield torch.full((min(step, numel - start),), fill, dtype=torch.bfloat16)
            return
        generator = self._generator(name)
        scale = self.embed_std if name == EMBEDDING else self.out_std if name.endswith(OUTPUTS) else self.std
        for start in range(0, numel, step):
            yield torch.empty(min(step, numel - start), dtype=torch.bfloat16).normal_(0.0, scale,
                                                                                         generator=generator)

    def chunks(self, name: str, shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
        shape = tuple(shape)
        if self.skew > 0 and name in self.routers:
            yield self._router(self.routers[name], shape).to(torch.bfloat16).flatten()
        else:
            yield from self._plain_chunks(name, shape)

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        blocks = self.chunks(name, shape)
        first = next(blocks)
        if first.numel() == math.prod(shape):
            return first.view(shape)
        out = torch.empty(math.prod(shape), dtype=torch.bfloat16)
        out[: first.numel()] = first
        start = first.numel()
        for block in blocks:
            out[start : start + block.numel()] = block
            start += block.numel()
        return out.view(shape)

    # skewed routing
    def _plain(self, layer: int, shape: tuple[int, ...]) -> torch.Tensor:
        name = next(n for n, i in self.routers.items() if i == layer)
        return torch.cat(list(self._plain_chunks(name, shape))).view(shape).float()

    def _router(self, layer: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The skewed router of MoE layer `layer` (float32 [E, H]), walking the chain of MoE layers from the
        first one (or from the last layer computed, which is the previous one when writing in order)."""
        E = shape[0]
        c = self.correlation
        if self._chain is None or self._chain[0] > layer:
            self._chain = None
        for i in self.moe_layers:
            if i > layer:
                break
            if self._chain is not None and i <= self._chain[0]:
                continue
            generator = self._generator(f"skew.order.{i}")
            plain = self._plain(i, shape)
            if self._chain is None:
                router, ranks = plain, torch.randperm(E, generator=generator)
            else:
                _, previous, ranks = self._chain
                router = c * previous + (1 - c**2) ** 0.5 * plain
                released = (torch.rand(E, generator=generator) >= c).nonzero().flatten()
                ranks = ranks.clone()
                ranks[released] = ranks[released][torch.randperm(len(released), generator=generator)]
            self._chain = (i, router, ranks)
        _, router, ranks = self._chain
        scale = 1 + self.skew * (1 - ranks.float() / E) ** 2  # per expert: 1 + skew for rank 0 .. ~1 for the coldest
        return router * scale[:, None]


# --- writing ---------------------------------------------------------------------------------------------------

def hf_tensors(roles: list[TensorRole]) -> list[tuple[str, tuple[int, ...]]]:
    """The (name, shape) a Hugging Face checkpoint stores for these roles: per-expert matrices, no tied head."""
    out: list[tuple[str, tuple[int, ...]]] = []
    for role in roles:
        if role.kind == "plain":
            out.append((role.name, role.shape))
        elif role.kind == "linear":
            if role.sources == (role.name,):
                out.append((role.name, role.shape))
        else:
            out.extend((source, role.shape[1:]) for source in role.sources)
    return out


def parameter_count(roles: list[TensorRole]) -> int:
    return sum(math.prod(shape) for _, shape in hf_tensors(roles))


def fp8_weights(roles: list[TensorRole]) -> set[str]:
    """The tensors the FP8 layout stores as float8: every Linear weight of the decoder layers (attention, dense
    MLPs, shared and routed experts), as DeepSeek-V3 is published; routers, norms, embeddings and LM head stay
    bf16."""
    return {source for role in roles if role.kind != "plain" and role.name.startswith("model.layers.")
            for source in role.sources}


def stored_tensors(tensors: list[tuple[str, tuple[int, ...]]], fp8: set[str] = frozenset(),
                   block: tuple[int, int] = FP8_BLOCK) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, safetensors dtype) of each tensor as a file stores it: bf16, or for a name in `fp8` its
    F8_E4M3 weight directly followed by its F32 weight_scale_inv [ceil(O/bo), ceil(K/bk)] (Fp8Chunks writes
    the scales from the weight's own pass)."""
    out: list[tuple[str, tuple[int, ...], str]] = []
    for name, shape in tensors:
        if name not in fp8:
            out.append((name, shape, "BF16"))
            continue
        O, K = shape
        out += [(name, shape, "F8_E4M3"), (name + SCALE_SUFFIX, (-(-O // block[0]), -(-K // block[1])), "F32")]
    return out


def fp8_bands(blocks: Iterator[torch.Tensor], shape: tuple[int, int],
              block: tuple[int, int] = FP8_BLOCK) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """encode_fp8_block of a matrix given as blocks of whole rows (Values.chunks), one band of whole tile rows
    at a time: (weight float8 [rows, K], scale_inv [ceil(rows/bo), ceil(K/bk)]) per band. No tile straddles
    two bands, so the bands are exactly the rows of encode_fp8_block(whole matrix); memory stays at one band
    (about CHUNK values), not one matrix."""
    O, K = shape
    band = max(1, CHUNK // (block[0] * K)) * block[0]
    rows = torch.empty(0, K, dtype=torch.bfloat16)
    for chunk in blocks:
        rows = torch.cat([rows, chunk.view(-1, K)])
        while len(rows) >= band:
            yield encode_fp8_block(rows[:band], block)
            rows = rows[band:]
    if len(rows):
        yield encode_fp8_block(rows, block)


class Fp8Chunks:
    """write_streaming_safetensors' chunks for the FP8 layout: a name in `fp8` yields its float8 weight band by
    band and keeps the scales, which the next call (its weight_scale_inv, the next tensor of the file) yields;
    every other name its bf16 values."""

    def __init__(self, values: Values, fp8: set[str], block: tuple[int, int] = FP8_BLOCK):
        self.values, self.fp8, self.block = values, fp8, block
        self.scales: tuple[str, torch.Tensor] | None = None  # (scale name, scale_inv) of the last weight

    def __call__(self, name: str, shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
        if name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) in self.fp8:
            if self.scales is None or self.scales[0] != name:
                raise RuntimeError(f"{name} must directly follow its weight in the file")
            yield self.scales[1].flatten()
            self.scales = None
            return
        if name not in self.fp8:
            yield from self.values.chunks(name, shape)
            return
        scales = []
        for weight, scale_inv in fp8_bands(self.values.chunks(name, shape), shape, self.block):
            yield weight.flatten()
            scales.append(scale_inv)
        self.scales = (name + SCALE_SUFFIX, torch.cat(scales))


def safetensors_header(tensors: list[tuple[str, tuple[int, ...], str]]) -> tuple[bytes, int]:
    """The header (length prefix included) of a safetensors file holding `tensors` (name, shape, dtype) in
    order, and the bytes of data that follow it."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in tensors:
        size = DTYPE_BYTES[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, offset


def write_streaming_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...], str]],
                                chunks: Callable[[str, tuple[int, ...]], Iterator[torch.Tensor]]) -> int:
    """A safetensors file written header first (from the shapes and dtypes), then each tensor chunk by chunk
    (to PATH.tmp, renamed when complete). Returns the bytes of tensor data."""
    header, size = safetensors_header(tensors)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        for name, shape, dtype in tensors:
            written = 0
            for block in chunks(name, shape):
                data = block.contiguous().flatten().view(torch.uint8).numpy()
                f.write(data.data)
                written += data.nbytes
            if written != DTYPE_BYTES[dtype] * math.prod(shape):
                raise RuntimeError(f"{name}: wrote {written} bytes, expected {DTYPE_BYTES[dtype] * math.prod(shape)}")
    os.replace(tmp, path)
    return size


def finished_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...], str]]) -> bool:
    """Whether `path` is the complete file write_streaming_safetensors writes for `tensors` (same header, same
    size): a shard an interrupted run finished."""
    header, size = safetensors_header(tensors)
    if not path.exists() or path.stat().st_size != len(header) + size:
        return False
    with open(path, "rb") as f:
        return f.read(len(header)) == header


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _generation_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    return {k: hf_config[k] for k in ("bos_token_id", "eos_token_id") if hf_config.get(k) is not None}


def _bf16_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """hf_config saying bfloat16 in whichever spelling it uses (`dtype`, else the hub's `torch_dtype`)."""
    return {**hf_config, ("dtype" if "dtype" in hf_config else "torch_dtype"): "bfloat16"}


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _start_or_resume_hf(out: Path, options: dict[str, Any]) -> bool:
    """Start an HF folder, or resume one an interrupted run started with the same options. True when resuming."""
    marker = out / PROGRESS_FILE
    options = json.loads(json.dumps(options))  # as read back (tuples become lists)
    if out.exists() and any(out.iterdir()):
        if marker.exists() and json.loads(marker.read_text()) == options:
            return True
        raise SystemExit(f"{out} is not empty (and not an unfinished folder written with the same options); "
                         "choose an empty or new output folder")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(marker, options)
    return False


def write_hf(out: str | Path, hf_config: dict[str, Any], seed: int = 0, std: float = 0.02, skew: float = 0.0,
             embed_std: float | None = None, out_std: float | None = None, fp8: bool = False,
             log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """A Hugging Face bf16 checkpoint folder for hf_config, one shard per decoder layer plus one for the rest;
    with fp8, in DeepSeek-V3's published FP8 layout (fp8_weights quantized by encode_fp8_block from the same
    bf16 values, config.json with FP8_CONFIG). An interrupted run resumes from its finished shards when run
    again with the same arguments. Returns a summary: bytes, parameters, seconds."""
    out = Path(out).expanduser()
    t0 = time.perf_counter()
    config = _bf16_config(hf_config)
    if fp8:
        config["quantization_config"] = dict(FP8_CONFIG)
    _start_or_resume_hf(out, {"config": config, "seed": seed, "std": std, "skew": skew, "embed_std": embed_std,
                              "out_std": out_std})
    values = Values(hf_config, seed, std, skew, embed_std, out_std)
    roles = tensor_roles(hf_config)
    shards = shard_roles(roles, int(hf_config["num_hidden_layers"]))
    quantized = fp8_weights(roles) if fp8 else set()
    chunks = Fp8Chunks(values, quantized) if fp8 else values.chunks
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", _generation_config(hf_config))
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards):
        name = shard_file(k, len(shards))
        tensors = stored_tensors(hf_tensors(shard), quantized)
        kept = finished_safetensors(out / name, tensors)
        total += safetensors_header(tensors)[1] if kept else write_streaming_safetensors(out / name, tensors, chunks)
        weight_map.update(dict.fromkeys((t for t, _, _ in tensors), name))
        if log:
            log(f"[{k + 1}/{len(shards)}] {name}  {_gb((out / name).stat().st_size)}  total {_gb(total)}  "
                f"{time.perf_counter() - t0:.1f} s{'  (kept from an earlier run)' if kept else ''}")
    _write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    (out / PROGRESS_FILE).unlink()
    return _summary(out, roles, t0)


def write_quantized(out: str | Path, hf_config: dict[str, Any], experts: str = "int8", dense: str = "bf16",
                    seed: int = 0, std: float = 0.02, skew: float = 0.0, embed_std: float | None = None,
                    out_std: float | None = None, label: str = "",
                    log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """offload's pre-quantized store for hf_config (store.write_store reading from `Values`): experts and dense
    matrices packed from exactly the bf16 values write_hf writes for the same seed. Resumes an unfinished one."""
    out = Path(out).expanduser()
    t0 = time.perf_counter()
    roles = tensor_roles(hf_config)
    order = store_read_order(roles, dense, int(hf_config["num_hidden_layers"]))
    read = PrefetchingReader(Values(hf_config, seed, std, skew, embed_std, out_std), order)
    written = [0]

    def on_shard(done: int, total: int, file_name: str, resumed: bool) -> None:
        written[0] += (out / file_name).stat().st_size
        if log:
            log(f"[{done}/{total}] {file_name}  {_gb((out / file_name).stat().st_size)}  total {_gb(written[0])}  "
                f"{time.perf_counter() - t0:.1f} s{'  (kept from an earlier run)' if resumed else ''}")

    source = label or (f"synthetic {hf_config.get('model_type')} seed={seed} std={std} skew={skew} "
                       f"embed_std={embed_std} out_std={out_std}")
    try:
        write_store(out, _bf16_config(hf_config), read, experts=experts, dense=dense, source_label=source,
                    on_shard=on_shard)
    finally:
        read.close()
    _write_json(out / "generation_config.json", _generation_config(hf_config))
    return _summary(out, roles, t0)


def store_read_order(roles: list[TensorRole], dense: str, num_layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """The (name, shape) write_store reads, in its order (store._write_shard's rules): shard by shard, first the
    tensors it writes as made (their dtypes go into the header), then the matrices it packs."""
    order: list[tuple[str, tuple[int, ...]]] = []
    for shard in shard_roles(roles, num_layers):
        packed: list[tuple[str, tuple[int, ...]]] = []
        for role in shard:
            if role.kind == "plain":
                order.append((role.name, role.shape))
            elif role.kind == "linear":
                if dense != "bf16" and role.quantize:
                    packed.append((role.sources[0], role.shape))
                elif role.sources == (role.name,):
                    order.append((role.name, role.shape))
            else:
                packed.extend((source, role.shape[1:]) for source in role.sources)
        order.extend(packed)
    return order


class PrefetchingReader:
    """write_store's read(name, shape): makes each tensor on one worker thread and, while the caller packs it,
    already the next one in the expected order (generation is single-threaded torch, packing parallel Numba).
    A request out of the expected order (e.g. after shards kept by a resumed run) is simply made on demand.
    Values is only ever used from the worker thread."""

    def __init__(self, values: Values, order: list[tuple[str, tuple[int, ...]]]):
        self.values = values
        self.next_of = {name: order[i + 1] for i, (name, _) in enumerate(order[:-1])}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="make_checkpoint")
        self.pending: tuple[str, Future] | None = None

    def __call__(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if self.pending is not None and self.pending[0] == name:
            future = self.pending[1]
        else:
            future = self.pool.submit(self.values.tensor, name, tuple(shape))
        following = self.next_of.get(name)
        self.pending = None if following is None else (following[0], self.pool.submit(self.values.tensor,
                                                                                      *following))
        tensor = future.result()
        if tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"{name}: made shape {list(tensor.shape)}, write_store asked for {list(shape)}")
        return tensor

    def close(self) -> None:
        self.pending = None
        self.pool.shutdown(wait=True, cancel_futures=True)


def _summary(out: Path, roles: list[TensorRole], t0: float) -> dict[str, Any]:
    files = [p for p in out.iterdir() if p.is_file()]
    return {"bytes": sum(p.stat().st_size for p in files), "parameters": parameter_count(roles),
            "seconds": time.perf_counter() - t0}


def add_value_options(parser: Any) -> None:
    """The options that choose the model and its values (--layers, --skew, --seed, --std, --embed-std, --out-std)
    on an argparse parser or argument group: this tool's, and tools/gguf_export.py's for --synthetic, so both
    make the same weights from the same options."""
    parser.add_argument("--layers", type=int, default=None, help="keep the first N decoder layers")
    parser.add_argument("--skew", type=float, default=0.0,
                        help="skewed routers: the hottest expert's router row is 1 + SKEW times as long as the "
                             "coldest's (default 0: uniform routing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--std", type=float, default=0.02, help="standard deviation of the random weights")
    parser.add_argument("--embed-std", type=float, default=None, help="standard deviation of the embedding "
                        "(default: --std)")
    parser.add_argument("--out-std", type=float, default=None, help="standard deviation of o_proj and down_proj "
                        "(w2), the matrices that write into the residual stream (default: --std)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=RECOMMENDATION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(SHAPES), metavar="SHAPE", help=", ".join(SHAPES))
    parser.add_argument("out", type=Path, metavar="OUT", help="output folder (created; must be empty)")
    parser.add_argument("--hf", action="store_true", help="write a Hugging Face bf16 folder instead of a store")
    parser.add_argument("--fp8", action="store_true", help="write a Hugging Face folder in DeepSeek-V3's FP8 "
                        "layout (e4m3 weights with a float32 scale per 128x128 block); implies --hf")
    parser.add_argument("--experts-format", choices=EXPERT_FORMATS, default="int8",
                        help="store mode: packed format of the routed experts (default int8)")
    parser.add_argument("--dense", choices=DENSE_FORMATS, default="bf16",
                        help="store mode: packed format of the dense matrices (default bf16: kept as bf16)")
    add_value_options(parser)
    args = parser.parse_args(argv)
    cfg = shape_config(args.shape, args.layers)
    layers = cfg["num_hidden_layers"]
    what = "hf fp8" if args.fp8 else "hf bf16" if args.hf else f"store experts={args.experts_format} dense={args.dense}"
    stds = f"std {args.std}, embed std {args.embed_std or args.std}, out std {args.out_std or args.std}"
    print(f"{args.shape}: {layers} layers, {what}, seed {args.seed}, {stds}, skew {args.skew} -> {args.out}")
    if args.hf or args.fp8:
        summary = write_hf(args.out, cfg, args.seed, args.std, args.skew, args.embed_std, args.out_std, args.fp8)
    else:
        label = (f"synthetic {args.shape} layers={layers} seed={args.seed} std={args.std} skew={args.skew} "
                 f"embed_std={args.embed_std} out_std={args.out_std}")
        summary = write_quantized(args.out, cfg, args.experts_format, args.dense, args.seed, args.std, args.skew,
                                  args.embed_std, args.out_std, label)
    print(f"total {_gb(summary['bytes'])} ({summary['bytes']} bytes), {summary['parameters'] / 1e9:.3f} B "
          f"parameters, {summary['seconds']:.1f} s")
    print(f"done: {args.shape} ({layers} layers, {what}, {stds}, skew {args.skew}) in {args.out}: "
          f"{_gb(summary['bytes'])}, {summary['parameters'] / 1e9:.2f} B parameters, {summary['seconds']:.0f} s")


if __name__ == "__main__":
    main()

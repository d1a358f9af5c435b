"""How each Hugging Face model_type becomes a llama.cpp GGUF: its metadata keys and its tensors (tools/gguf_export.py).

One class per supported model_type, each built from config.json alone:
  mixtral      -> llama.cpp "llama":     experts stacked per projection, q/k rows permuted to interleaved rope pairs
  qwen3_moe    -> llama.cpp "qwen3moe":  per-head q/k RMSNorm, explicit head_dim, rotate-half rope (no permutation)
  deepseek_v2  -> llama.cpp "deepseek2": MLA (q or q_a/q_b, kv_a_mqa, kv_b split into the absorbed k_b / v_b),
                                         first dense layers, shared experts, YaRN with DeepSeek's mscale keys
The names, keys and layouts follow llama.cpp's convert_hf_to_gguf.py and the loader of the llama.cpp build that
llama-cpp-python 0.3.36 ships; tests/test_gguf_export.py checks each against transformers through that build.

A config llama.cpp cannot reproduce (a Qwen3-MoE with dense layers or unnormalised top-k weights, a DeepSeek-V2
with a MoE layer frequency) raises ExportError naming the field; an approximation llama.cpp makes (Mixtral's sliding
window dropped, DeepSeek-V2's group-limited routing scored by the top-2 sum instead of the max) becomes a note.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import gguf
import numpy as np

F32 = gguf.GGMLQuantizationType.F32
F16 = gguf.GGMLQuantizationType.F16


class ExportError(ValueError):
    """A checkpoint the exporter cannot turn into a GGUF that llama.cpp runs as the model: one line, with the fix."""


class Weights(Protocol):
    """The checkpoint's tensors, read one at a time (gguf_export.WeightFiles: a folder; gguf_export.SyntheticWeights:
    make_checkpoint's synthetic values)."""

    def __contains__(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str) -> np.ndarray: ...


@dataclass(frozen=True)
class TensorJob:
    """One GGUF tensor: its name, shape in PyTorch order, storage type, and how to build it: `slabs()` yields its
    float32 values as consecutive slabs along the leading dimension (the whole tensor, or for stacked experts one
    expert at a time), so the exporter never needs a whole stacked tensor in float32."""
    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    slabs: Callable[[], Iterable[np.ndarray]]
    fell_back: bool = False  # stored F16 because its rows are not whole blocks of the wanted type


def job(name: str, shape: tuple[int, ...], wanted: gguf.GGMLQuantizationType,
        slabs: Callable[[], Iterable[np.ndarray]]) -> TensorJob:
    """Stored as `wanted` where the row length is whole blocks of it; F16 otherwise (as llama.cpp's converter)."""
    block_size, _ = gguf.GGML_QUANT_SIZES[wanted]
    fits = shape[-1] % block_size == 0
    return TensorJob(name, shape, wanted if fits else F16, slabs, fell_back=not fits)


def whole(build: Callable[[], np.ndarray]) -> Callable[[], Iterable[np.ndarray]]:
    """A tensor built in one piece, as TensorJob.slabs."""
    return lambda: (build(),)


@dataclass(frozen=True)
class Formats:
    """The storage types asked for: routed experts, and every other matrix (embedding, attention, dense MLPs,
    shared experts, LM head). Norms and routers are always F32."""
    experts: gguf.GGMLQuantizationType
    dense: gguf.GGMLQuantizationType


class TensorList:
    """Builds the job list of one model from its checkpoint, in file order."""

    def __init__(self, files: Weights, formats: Formats):
        self.files, self.formats, self.jobs = files, formats, []

    def plain(self, gguf_name: str, hf_name: str, qtype: gguf.GGMLQuantizationType,
              transform: Callable[[np.ndarray], np.ndarray] = lambda w: w) -> None:
        self.jobs.append(job(gguf_name, self.files.shape(hf_name), qtype,
                             whole(lambda: transform(self.files.read(hf_name)))))

    def norm(self, gguf_name: str, hf_name: str) -> None:
        self.plain(gguf_name, hf_name, F32)

    def dense(self, gguf_name: str, hf_name: str, transform: Callable[[np.ndarray], np.ndarray] = lambda w: w) -> None:
        self.plain(gguf_name, hf_name, self.formats.dense, transform)

    def derived(self, gguf_name: str, shape: tuple[int, ...], build: Callable[[], np.ndarray]) -> None:
        """A dense-format tensor computed from checkpoint tensors (e.g. a split or transposed matrix)."""
        self.jobs.append(job(gguf_name, shape, self.formats.dense, whole(build)))

    def experts(self, gguf_name: str, hf_names: list[str]) -> None:
        """The routed experts' matrices of one projection stacked into [n_expert, rows, cols], read one expert at
        a time."""
        stacked = (len(hf_names), *self.files.shape(hf_names[0]))
        self.jobs.append(job(gguf_name, stacked, self.formats.experts,
                             lambda: (self.files.read(n)[None] for n in hf_names)))

    def embedding(self) -> None:
        self.dense("token_embd.weight", "model.embed_tokens.weight")

    def head(self) -> None:
        """The final norm and the LM head (absent with tied embeddings: llama.cpp then reuses token_embd)."""
        self.norm("output_norm.weight", "model.norm.weight")
        if "lm_head.weight" in self.files:
            self.dense("output.weight", "lm_head.weight")


# ---------------------------------------------------------------- config fields every architecture shares


def rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """rope_theta, rope_type and the scaling fields, whether the config spells them the transformers 5 way
    (`rope_parameters`) or the hub's (`rope_theta` + `rope_scaling` with `type`)."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return rope


def first_id(value: int | list[int] | None) -> int | None:
    return value[0] if isinstance(value, list) else value


@dataclass(frozen=True)
class CommonShape:
    """The fields every architecture's GGUF carries under the same keys."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # the dense MLP's (llama.cpp's feed_forward_length)
    num_layers: int
    num_heads: int
    num_experts: int
    experts_per_token: int
    rms_norm_eps: float
    rope: dict[str, Any]
    context_length: int
    bos_token_id: int | None
    eos_token_id: int | None

    @classmethod
    def from_config(cls, hf: dict[str, Any], num_experts_field: tuple[str, ...]) -> CommonShape:
        experts = next((hf[k] for k in num_experts_field if hf.get(k) is not None), None)
        if experts is None:
            raise ExportError(f"config.json has none of {', '.join(num_experts_field)}: not a MoE checkpoint")
        return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                   intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
                   num_heads=hf["num_attention_heads"], num_experts=experts,
                   experts_per_token=hf["num_experts_per_tok"], rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                   rope=rope_parameters(hf), context_length=hf.get("max_position_embeddings", 4096),
                   bos_token_id=first_id(hf.get("bos_token_id")), eos_token_id=first_id(hf.get("eos_token_id")))

    def add_keys(self, writer: gguf.GGUFWriter, name: str, file_type: gguf.LlamaFileType) -> None:
        writer.add_name(name)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_vocab_size(self.vocab_size)
        writer.add_context_length(self.context_length)
        writer.add_embedding_length(self.hidden_size)
        writer.add_block_count(self.num_layers)
        writer.add_feed_forward_length(self.intermediate_size)
        writer.add_head_count(self.num_heads)
        writer.add_layer_norm_rms_eps(self.rms_norm_eps)
        writer.add_expert_count(self.num_experts)
        writer.add_expert_used_count(self.experts_per_token)
        writer.add_rope_freq_base(float(self.rope["rope_theta"]))

    def add_rope_scaling(self, writer: gguf.GGUFWriter, allowed: tuple[str, ...]) -> None:
        """Linear or YaRN rope scaling keys as convert_hf_to_gguf.py writes them; other types are refused."""
        kind = self.rope["rope_type"]
        if kind not in ("default", *allowed):
            raise ExportError(f"rope type {kind!r} is not exported for this architecture (supported: default, "
                              f"{', '.join(allowed)})")
        if kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(self.rope["factor"]))
        elif kind == "yarn":
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(float(self.rope["factor"]))
            writer.add_rope_scaling_orig_ctx_len(int(self.rope["original_max_position_embeddings"]))
            for field, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                               ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
                               ("attention_factor", writer.add_rope_scaling_yarn_attn_factor)):
                if self.rope.get(field) is not None:
                    add(float(self.rope[field]))


class Architecture(Protocol):
    """One model_type's translation: built from config.json, then asked for its keys and its tensors."""
    llama_arch: str  # llama.cpp's architecture name (general.architecture)
    common: CommonShape
    notes: list[str]  # approximations llama.cpp makes for this config, said once by the exporter

    def add_keys(self, writer: gguf.GGUFWriter, file_type: gguf.LlamaFileType) -> None: ...

    def tensor_jobs(self, files: Weights, formats: Formats) -> list[TensorJob]: ...


# ---------------------------------------------------------------- mixtral -> llama


def permute_for_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """q/k_proj rows [n_head * head_dim, ...] from HF's rotate-half order to llama.cpp's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_for_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of permute_for_rope."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GQA_ATTENTION = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
# Mixtral's expert projections -> llama.cpp's stacked expert tensors
MIXTRAL_EXPERTS = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}
# every other family's expert / MLP projections -> llama.cpp's suffixes
GATED_MLP = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


@dataclass(frozen=True)
class GqaShape:
    """Grouped-query attention's head layout: the keys llama.cpp reads for it, and its q/k/v/o tensors."""
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, hf: dict[str, Any]) -> GqaShape:
        heads = hf["num_attention_heads"]
        return cls(heads, hf.get("num_key_value_heads") or heads, hf.get("head_dim") or hf["hidden_size"] // heads)

    def add_keys(self, writer: gguf.GGUFWriter) -> None:
        writer.add_head_count_kv(self.num_kv_heads)
        writer.add_key_length(self.head_dim)
        writer.add_value_length(self.head_dim)
        writer.add_rope_dimension_count(self.head_dim)

    def add_tensors(self, out: TensorList, hf_layer: str, blk: str, interleave_rope: bool) -> None:
        """attn_norm and q/k/v/o; with interleave_rope, q/k rows permuted from rotate-half to interleaved pairs."""
        out.norm(f"{blk}.attn_norm.weight", f"{hf_layer}.input_layernorm.weight")
        for proj, name in GQA_ATTENTION.items():
            heads = {"q_proj": self.num_heads, "k_proj": self.num_kv_heads}.get(proj) if interleave_rope else None
            rope = (lambda w, n=heads: permute_for_rope(w, n)) if heads else (lambda w: w)
            out.dense(f"{blk}.{name}.weight", f"{hf_layer}.self_attn.{proj}.weight", rope)


class Mixtral:
    """Mixtral as llama.cpp's "llama" architecture: q/k rows permuted from rotate-half to interleaved rope pairs;
    llama.cpp's "llama" has no sliding window, so attention runs over the whole context."""
    llama_arch = "llama"

    def __init__(self, hf: dict[str, Any]):
        self.common = CommonShape.from_config(hf, ("num_local_experts",))
        self.attention = GqaShape.from_config(hf)
        window = hf.get("sliding_window")
        self.notes = ([f"sliding_window={window} is dropped: llama.cpp attends to the whole context"]
                      if window is not None and window < self.common.context_length else [])

    def add_keys(self, writer: gguf.GGUFWriter, file_type: gguf.LlamaFileType) -> None:
        self.common.add_keys(writer, "mixtral", file_type)
        self.attention.add_keys(writer)
        self.common.add_rope_scaling(writer, ("linear",))

    def tensor_jobs(self, files: Weights, formats: Formats) -> list[TensorJob]:
        out = TensorList(files, formats)
        out.embedding()
        for i in range(self.common.num_layers):
            hf, blk = f"model.layers.{i}", f"blk.{i}"
            self.attention.add_tensors(out, hf, blk, interleave_rope=True)
            out.norm(f"{blk}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight")
            out.norm(f"{blk}.ffn_gate_inp.weight", f"{hf}.block_sparse_moe.gate.weight")
            for proj, name in MIXTRAL_EXPERTS.items():
                out.experts(f"{blk}.{name}.weight", [f"{hf}.block_sparse_moe.experts.{e}.{proj}.weight"
                                                     for e in range(self.common.num_experts)])
        out.head()
        return out.jobs


def routed_experts(out: TensorList, hf_layer: str, blk: str, num_experts: int) -> None:
    """A layer's router (F32) and its routed experts stacked per projection (`mlp.experts.E.*_proj`)."""
    out.norm(f"{blk}.ffn_gate_inp.weight", f"{hf_layer}.mlp.gate.weight")
    for proj, suffix in GATED_MLP.items():
        out.experts(f"{blk}.ffn_{suffix}_exps.weight",
                    [f"{hf_layer}.mlp.experts.{e}.{proj}.weight" for e in range(num_experts)])


# ---------------------------------------------------------------- qwen3_moe -> qwen3moe


class Qwen3Moe:
    """Qwen3-MoE as llama.cpp's "qwen3moe": GQA with per-head q/k RMSNorm (attn_q_norm / attn_k_norm) and NEOX
    (rotate-half) rope, so q/k rows keep the checkpoint's order. llama.cpp makes every layer MoE and always
    renormalises the top-k weights, so configs that do otherwise are refused."""
    llama_arch = "qwen3moe"

    def __init__(self, hf: dict[str, Any]):
        self.common = CommonShape.from_config(hf, ("num_experts", "num_local_experts"))
        if not hf.get("norm_topk_prob", False):
            raise ExportError("qwen3_moe with norm_topk_prob false: llama.cpp's qwen3moe always renormalises the "
                              "top-k weights, so its GGUF would not be this model")
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            raise ExportError("qwen3_moe with dense layers (mlp_only_layers / decoder_sparse_step): llama.cpp's "
                              "qwen3moe makes every layer MoE")
        if hf.get("attention_bias"):
            raise ExportError("qwen3_moe with attention_bias: llama.cpp's qwen3moe has no q/k/v/o biases")
        self.attention = GqaShape.from_config(hf)
        self.moe_intermediate_size = hf["moe_intermediate_size"]
        self.notes: list[str] = []

    def add_keys(self, writer: gguf.GGUFWriter, file_type: gguf.LlamaFileType) -> None:
        self.common.add_keys(writer, "qwen3_moe", file_type)
        self.attention.add_keys(writer)
        writer.add_expert_feed_forward_length(self.moe_intermediate_size)
        self.common.add_rope_scaling(writer, ("linear", "yarn"))

    def tensor_jobs(self, files: Weights, formats: Formats) -> list[TensorJob]:
        out = TensorList(files, formats)
        out.embedding()
        for i in range(self.common.num_layers):
            hf, blk = f"model.layers.{i}", f"blk.{i}"
            self.attention.add_tensors(out, hf, blk, interleave_rope=False)  # NEOX rope: rows as they are
            out.norm(f"{blk}.attn_q_norm.weight", f"{hf}.self_attn.q_norm.weight")
            out.norm(f"{blk}.attn_k_norm.weight", f"{hf}.self_attn.k_norm.weight")
            out.norm(f"{blk}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight")
            routed_experts(out, hf, blk, self.common.num_experts)
        out.head()
        return out.jobs


# ---------------------------------------------------------------- deepseek_v2 -> deepseek2


def split_kv_b(kv_b: np.ndarray, n_head: int, nope: int, v_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """kv_b_proj [n_head * (nope + v_dim), kv_lora] -> (k_b [n_head, kv_lora, nope], v_b [n_head, v_dim, kv_lora]):
    the halves MLA's absorbed form multiplies the query by (k_b, transposed per head) and the latent output by."""
    per_head = kv_b.reshape(n_head, nope + v_dim, kv_b.shape[-1])
    return np.ascontiguousarray(per_head[:, :nope].swapaxes(1, 2)), np.ascontiguousarray(per_head[:, nope:])


class DeepseekV2:
    """DeepSeek-V2 as llama.cpp's "deepseek2" with MLA: the latent cache is one MQA head of kv_lora_rank + rope
    width (head_count_kv 1, key_length kv_lora + rope, value_length kv_lora); kv_b_proj is split into attn_k_b
    (transposed per head) and attn_v_b, the layout the installed llama.cpp's loader wants; the interleaved rope
    pairs of the checkpoint are llama.cpp's normal rope already. Routing: softmax, top-k, × routed_scaling_factor,
    never renormalised (as transformers' DeepSeek-V2, whatever norm_topk_prob says)."""
    llama_arch = "deepseek2"

    def __init__(self, hf: dict[str, Any]):
        self.common = CommonShape.from_config(hf, ("n_routed_experts",))
        if hf.get("moe_layer_freq", 1) != 1:
            raise ExportError(f"deepseek_v2 with moe_layer_freq={hf['moe_layer_freq']}: llama.cpp's deepseek2 "
                              "makes every layer after first_k_dense_replace MoE")
        if (hf.get("scoring_func") or "softmax") != "softmax":
            raise ExportError(f"deepseek_v2 with scoring_func={hf['scoring_func']!r}: DeepSeek-V2 scores by softmax")
        self.q_lora_rank = hf.get("q_lora_rank")
        self.kv_lora_rank = hf["kv_lora_rank"]
        self.nope, self.rope_dim, self.v_dim = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"], hf["v_head_dim"]
        self.first_dense = hf.get("first_k_dense_replace") or 0
        self.moe_intermediate_size = hf["moe_intermediate_size"]
        self.shared_experts = hf.get("n_shared_experts") or 0
        self.routed_scaling_factor = float(hf.get("routed_scaling_factor") or 1.0)
        method = hf.get("topk_method") or "greedy"
        self.groups = (hf.get("n_group") or 1, hf.get("topk_group") or 1) if method != "greedy" else (1, 1)
        self.notes = []
        if hf.get("norm_topk_prob"):
            self.notes.append("norm_topk_prob is ignored, as transformers' DeepSeek-V2 does: weights are not "
                              "renormalised")
        rope = self.common.rope
        if rope["rope_type"] == "yarn" and not (rope.get("mscale") and rope.get("mscale") == rope.get("mscale_all_dim")
                                                and rope.get("attention_factor") is None):
            self.notes.append(f"YaRN with mscale={rope.get('mscale')}, mscale_all_dim={rope.get('mscale_all_dim')}: "
                              "llama.cpp's deepseek2 assumes the two are equal (as DeepSeek-V2 and V3 publish them), "
                              "so its rope part of the attention scores is scaled differently")
        if self.groups[0] > 1:
            self.notes.append(f"group-limited routing ({self.groups[1]} of {self.groups[0]} groups): llama.cpp ranks "
                              "groups by the sum of their top-2 scores (DeepSeek-V3's rule), DeepSeek-V2 by the max, "
                              "so its expert choices can differ")

    def add_keys(self, writer: gguf.GGUFWriter, file_type: gguf.LlamaFileType) -> None:
        self.common.add_keys(writer, "deepseek_v2", file_type)
        writer.add_head_count_kv(1)  # MLA decodes as MQA over the latent cache
        writer.add_key_length(self.kv_lora_rank + self.rope_dim)
        writer.add_value_length(self.kv_lora_rank)
        writer.add_key_length_mla(self.nope + self.rope_dim)
        writer.add_value_length_mla(self.v_dim)
        writer.add_kv_lora_rank(self.kv_lora_rank)
        writer.add_q_lora_rank(self.q_lora_rank or 0)  # the installed loader requires the key; 0: a plain q_proj
        writer.add_rope_dimension_count(self.rope_dim)
        writer.add_leading_dense_block_count(self.first_dense)
        writer.add_expert_feed_forward_length(self.moe_intermediate_size)
        writer.add_expert_shared_count(self.shared_experts)
        writer.add_expert_weights_scale(self.routed_scaling_factor)
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
        if self.groups[0] > 1:
            writer.add_expert_group_count(self.groups[0])
            writer.add_expert_group_used_count(self.groups[1])
        self.common.add_rope_scaling(writer, ("yarn",))
        if self.common.rope["rope_type"] == "yarn" and self.common.rope.get("mscale_all_dim"):
            # DeepSeek's softmax scale × mscale(factor, mscale_all_dim)^2; llama.cpp's deepseek2 reads this key as
            # 0.1 × mscale_all_dim (convert_hf_to_gguf.py's TAG_DEEPSEEK2_YARN_LOG_MUL_FIX)
            writer.add_rope_scaling_yarn_log_mul(0.1 * float(self.common.rope["mscale_all_dim"]))

    def tensor_jobs(self, files: Weights, formats: Formats) -> list[TensorJob]:
        out = TensorList(files, formats)
        out.embedding()
        heads = self.common.num_heads
        for i in range(self.common.num_layers):
            hf, blk = f"model.layers.{i}", f"blk.{i}"
            attn = f"{hf}.self_attn"
            out.norm(f"{blk}.attn_norm.weight", f"{hf}.input_layernorm.weight")
            if self.q_lora_rank is None:
                out.dense(f"{blk}.attn_q.weight", f"{attn}.q_proj.weight")
            else:
                out.dense(f"{blk}.attn_q_a.weight", f"{attn}.q_a_proj.weight")
                out.norm(f"{blk}.attn_q_a_norm.weight", f"{attn}.q_a_layernorm.weight")
                out.dense(f"{blk}.attn_q_b.weight", f"{attn}.q_b_proj.weight")
            out.dense(f"{blk}.attn_kv_a_mqa.weight", f"{attn}.kv_a_proj_with_mqa.weight")
            out.norm(f"{blk}.attn_kv_a_norm.weight", f"{attn}.kv_a_layernorm.weight")

            kv_b_name = f"{attn}.kv_b_proj.weight"
            files.shape(kv_b_name)  # raises ExportError now, before anything is written, if it is missing

            def kv_b(part: int, name: str = kv_b_name) -> np.ndarray:
                return split_kv_b(files.read(name), heads, self.nope, self.v_dim)[part]
            out.derived(f"{blk}.attn_k_b.weight", (heads, self.kv_lora_rank, self.nope), lambda f=kv_b: f(0))
            out.derived(f"{blk}.attn_v_b.weight", (heads, self.v_dim, self.kv_lora_rank), lambda f=kv_b: f(1))
            out.dense(f"{blk}.attn_output.weight", f"{attn}.o_proj.weight")
            out.norm(f"{blk}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight")
            if i < self.first_dense:
                for proj, suffix in GATED_MLP.items():
                    out.dense(f"{blk}.ffn_{suffix}.weight", f"{hf}.mlp.{proj}.weight")
                continue
            routed_experts(out, hf, blk, self.common.num_experts)
            if self.shared_experts:
                for proj, suffix in GATED_MLP.items():
                    out.dense(f"{blk}.ffn_{suffix}_shexp.weight", f"{hf}.mlp.shared_experts.{proj}.weight")
        out.head()
        return out.jobs


ARCHITECTURES: dict[str, Callable[[dict[str, Any]], Architecture]] = {
    "mixtral": Mixtral, "qwen3_moe": Qwen3Moe, "deepseek_v2": DeepseekV2}


def architecture(hf: dict[str, Any]) -> Architecture:
    """The translation for a config.json."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ExportError(f"model_type {model_type!r} is not exported to GGUF; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type](hf)

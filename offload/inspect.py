"""What a checkpoint is and what it costs, from config.json and the safetensors headers alone (no weight is read).

The parameter counts come from the planner's inventory and the byte sizes from the packed formats themselves, so
the planner and `offload inspect` agree on one set of numbers; a test holds them to real checkpoints' tensors.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .arch import architecture, config_from_hf
from .config import ModelConfig
from .errors import CheckpointError
from .placement import expert_host_bytes, inventory, kv_cache_bytes
from .tokenizer import Tokenizer
from .weights.checkpoint import Checkpoint, holds_weights, read_config
from .weights.quant import scheme_for
from .weights.store import store_formats

EXPERT_FORMATS = ("bf16", "int8", "int4", "int4s")
DEVICE_BYTES_PER_PARAM = 2  # everything but the routed experts sits on the device in bf16


def routed_expert_bytes(cfg: ModelConfig, fmt: str) -> int:
    """Every routed expert of every MoE layer: what lives in host RAM (or the expert cache)."""
    return cfg.num_moe_layers * cfg.router.num_experts * expert_host_bytes(cfg, fmt)


@dataclass(frozen=True)
class ParamCounts:
    """Parameters by role. Everything but the routed experts is needed for every token."""

    embeddings: int  # input embedding and LM head (once when tied)
    attention: int  # all layers
    norms: int  # the layer norms and the final norm
    dense_mlp: int  # the dense layers' MLPs
    routers: int  # router weights, DeepSeek-V3 correction biases, Qwen2-MoE shared-expert gates
    shared_experts: int
    routed_experts: int  # all of them
    per_expert: int  # one routed expert
    active_experts: int  # routed experts one token uses: top-k per MoE layer

    @property
    def total(self) -> int:
        return self.dense + self.routed_experts

    @property
    def dense(self) -> int:
        """The part that is not a routed expert: the device tier."""
        return self.embeddings + self.attention + self.norms + self.dense_mlp + self.routers + self.shared_experts

    @property
    def active(self) -> int:
        return self.dense + self.active_experts * self.per_expert


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """From the loader's own tensor list (placement.inventory), so these counts cannot drift from the model."""
    inv = inventory(cfg, architecture(cfg.model_type).names)
    p = inv.params
    return ParamCounts(
        embeddings=p["embeddings"] + p["lm_head"],
        attention=p["attention"],
        norms=p["norms"],
        dense_mlp=p["dense_mlp"],
        routers=p["routers"],
        shared_experts=p["shared_experts"],
        routed_experts=len(inv.moe_layers) * inv.num_experts * inv.expert_params,
        per_expert=inv.expert_params,
        active_experts=cfg.routed_per_token,
    )


def memory_by_format(cfg: ModelConfig) -> dict[str, dict[str, int]]:
    """Weight bytes per tier for each expert format: the device part in bf16, the routed experts in the format."""
    device = param_counts(cfg).dense * DEVICE_BYTES_PER_PARAM
    table = {}
    for fmt in EXPERT_FORMATS:
        experts = routed_expert_bytes(cfg, fmt)
        table[fmt] = {"device": device, "experts": experts, "total": device + experts}
    return table


def attention_summary(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.mla
    if m is not None:
        ix = cfg.indexer
        sparse = None if ix is None else {
            "index_topk": ix.topk, "index_n_heads": ix.n_heads, "index_head_dim": ix.head_dim,
            "rope": "interleaved" if ix.rope_interleaved else "half", "indexer_layers": ix.num_indexer_layers}
        return {"kind": "MLA", "heads": cfg.num_attention_heads, "q_lora_rank": m.q_lora_rank,
                "kv_lora_rank": m.kv_lora_rank, "qk_nope_head_dim": m.qk_nope_head_dim,
                "qk_rope_head_dim": m.qk_rope_head_dim, "v_head_dim": m.v_head_dim, "sparse": sparse}
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    kind = "MHA" if nkv == nh else "MQA" if nkv == 1 else "GQA"
    windows = sorted({w for w in cfg.sliding_windows if w is not None})
    return {"kind": kind, "heads": nh, "kv_heads": nkv, "head_dim": cfg.head_dim, "rope_dim": cfg.rope_dim,
            "rope_interleaved": cfg.rope_interleaved, "qkv_bias": cfg.attention_bias,
            "o_bias": cfg.attention_output_bias, "qk_norm": cfg.qk_norm, "qk_norm_after_rope": cfg.qk_norm_after_rope,
            "sinks": cfg.attention_sinks,
            "sliding_window": windows[0] if windows else None, "output_gate": cfg.attention_output_gate,
            "attention_chunk": next((c for c in cfg.attention_chunks if c is not None), None),
            "no_rope_layers": [i for i in range(cfg.num_hidden_layers) if not cfg.uses_rope(i)],
            "qk_l2_norm": cfg.qk_l2_norm, "temperature_tuning": cfg.attention_temperature is not None}


def linear_attention_summary(cfg: ModelConfig) -> dict[str, Any] | None:
    """The Gated DeltaNet layers of a hybrid stack (None when every layer is attention)."""
    la = cfg.linear_attention
    if la is None or not cfg.num_linear_attention_layers:
        return None
    return {"kind": "Gated DeltaNet", "layers": [i for i in range(cfg.num_hidden_layers) if cfg.is_linear_attention(i)],
            "key_heads": la.num_key_heads, "value_heads": la.num_value_heads, "key_head_dim": la.key_head_dim,
            "value_head_dim": la.value_head_dim, "conv_kernel": la.conv_kernel}


def experts_summary(cfg: ModelConfig) -> dict[str, Any]:
    r = cfg.router
    summary: dict[str, Any] = {
        "routed": r.num_experts, "top_k": r.top_k, "scoring": r.scoring, "topk_method": r.topk_method,
        "norm_topk_prob": r.norm_topk_prob, "routed_scaling_factor": r.routed_scaling_factor,
        "selection_bias": r.has_correction_bias, "router_bias": cfg.router_bias,
        "activation": cfg.expert_activation.kind, "expert_bias": cfg.expert_bias,
        "weight_scales_input": cfg.router_scales_input,
    }
    if cfg.layer_top_k:
        summary["top_k_by_layer"] = list(cfg.layer_top_k)
    if r.n_group > 1:
        summary.update(n_group=r.n_group, topk_group=r.topk_group)
    if cfg.shared_intermediate_size:
        # DeepSeek counts its shared experts; Qwen2-MoE has one wide shared expert behind a sigmoid gate.
        count = cfg.extra.get("n_shared_experts") or cfg.extra.get("moe_num_shared_experts") or 1
        summary["shared"] = {"count": count,
                             "intermediate_size": cfg.shared_intermediate_size, "gated": cfg.shared_expert_gate}
    return summary


def tokenizer_summary(folder: Path) -> dict[str, Any]:
    """Tokenizer and chat template presence. Reading tokenizer.json takes well under a second even for large
    vocabularies; a broken one is reported rather than fatal, since the weights may still be fine."""
    if not Tokenizer.exists(folder):
        return {"present": False, "chat_template": False}
    try:
        tokenizer = Tokenizer.from_dir(folder)
    except CheckpointError as error:
        return {"present": True, "error": str(error), "chat_template": False}
    return {"present": True, "vocab_size": tokenizer.vocab_size, "chat_template": tokenizer.chat_template is not None}


def checkpoint_summary(checkpoint: Checkpoint) -> dict[str, Any]:
    dtypes = Counter()
    for info in checkpoint.tensors.values():
        dtypes[info.dtype] += info.nbytes
    files = {info.file for info in checkpoint.tensors.values()}
    # A multimodal checkpoint's other towers (vision encoder, projector) and unused modules: not loaded.
    prefixes = architecture(checkpoint.config_json.get("model_type")).skipped_prefixes
    skipped = [info for name, info in checkpoint.tensors.items() if prefixes and name.startswith(prefixes)]
    return {"files": len(files), "tensors": len(checkpoint.tensors), "bytes": checkpoint.nbytes(),
            "dtypes": dict(dtypes.most_common()),
            "skipped": {"prefixes": list(prefixes), "tensors": len(skipped),
                        "bytes": sum(info.nbytes for info in skipped)}}


def describe(path: str | Path) -> dict[str, Any]:
    """Everything `offload inspect` shows, as plain data (the --json output). A folder with config.json alone (no
    weights yet: deciding what to download) is described from the config; its "checkpoint" is None."""
    folder = Path(path).expanduser()
    checkpoint = Checkpoint(folder) if holds_weights(folder) else None
    hf = checkpoint.config_json if checkpoint is not None else read_config(folder)
    scheme = checkpoint.scheme if checkpoint is not None else scheme_for(folder, hf)
    formats = store_formats(checkpoint) if checkpoint is not None else None
    cfg = config_from_hf(hf)
    params = param_counts(cfg)
    dense_layers = [i for i, moe in enumerate(cfg.moe_layers) if not moe]
    rope = cfg.rope
    return {
        "path": str(folder),
        "model_type": cfg.model_type,
        "architectures": hf.get("architectures") or [],
        "layers": {"total": cfg.num_hidden_layers, "moe": cfg.num_moe_layers, "dense": len(dense_layers),
                   "dense_indices": dense_layers},
        "hidden_size": cfg.hidden_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "experts": experts_summary(cfg),
        "attention": attention_summary(cfg),
        "linear_attention": linear_attention_summary(cfg),
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope": {"type": rope.type, "theta": rope.theta, "factor": rope.factor,
                 "original_max_position_embeddings": rope.original_max_position_embeddings},
        "parameters": {"total": params.total, "active_per_token": params.active,
                       "routed_experts": params.routed_experts, "per_expert": params.per_expert, "dense": params.dense},
        "checkpoint": checkpoint_summary(checkpoint) if checkpoint is not None else None,
        "quantization": scheme.describe() if scheme is not None else None,  # of the source, for a store
        "store": {"experts": formats.experts, "dense": formats.dense} if formats is not None else None,
        "memory": {"kv_cache_bytes_per_token": kv_cache_bytes(cfg, 1, 2) - kv_cache_bytes(cfg, 0, 2),
                   "recurrent_state_bytes": kv_cache_bytes(cfg, 0, 2),
                   "by_expert_format": memory_by_format(cfg)},
        "tokenizer": tokenizer_summary(folder),
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if n < 1000:
            return f"{n:.0f}" if unit == "" else f"{n:.2f}{unit}"
        n /= 1000
    return f"{n:.2f}T"


def _attention_text(a: dict[str, Any]) -> str:
    if a["kind"] == "MLA":
        q = "none" if a["q_lora_rank"] is None else a["q_lora_rank"]
        text = (f"MLA, {a['heads']} heads, q_lora_rank {q}, kv_lora_rank {a['kv_lora_rank']}, qk head dim "
                f"{a['qk_nope_head_dim']} nope + {a['qk_rope_head_dim']} rope, v head dim {a['v_head_dim']}")
        if (s := a["sparse"]) is not None:
            text += (f"; sparse (DSA): top-{s['index_topk']} positions per query, lightning indexer "
                     f"{s['index_n_heads']} heads x {s['index_head_dim']} ({s['rope']} rope) in "
                     f"{s['indexer_layers']} layers")
        return text
    text = f"{a['kind']}, {a['heads']} query heads, {a['kv_heads']} KV heads, head dim {a['head_dim']}"
    if a["rope_dim"] != a["head_dim"]:
        text += f" (rope on the first {a['rope_dim']})"
    if a["rope_interleaved"]:
        text += ", rope on adjacent pairs"
    if a["qkv_bias"]:
        text += ", q/k/v/o bias" if a.get("o_bias") else ", q/k/v bias"
    if a["qk_norm"]:
        text += f", q/k norm ({a['qk_norm']}{', after rope' if a['qk_norm_after_rope'] else ''})"
    if a["sinks"]:
        text += ", attention sinks"
    if a["sliding_window"]:
        text += f", sliding window {a['sliding_window']}"
    if a["output_gate"]:
        text += ", sigmoid output gate"
    if a["qk_l2_norm"]:
        text += ", q/k L2 norm"
    if a["attention_chunk"]:
        text += f", chunked attention ({a['attention_chunk']} positions)"
    if a["no_rope_layers"]:
        text += f", no rope on {len(a['no_rope_layers'])} layers"
        text += " (full attention, query temperature)" if a["temperature_tuning"] else " (full attention)"
    return text


def _linear_attention_text(la: dict[str, Any], total_layers: int) -> str:
    return (f"{la['kind']} on {len(la['layers'])} of {total_layers} layers (the rest attention): {la['key_heads']} "
            f"key heads x {la['key_head_dim']}, {la['value_heads']} value heads x {la['value_head_dim']}, "
            f"conv {la['conv_kernel']}; a fixed-size state per layer")


def _experts_text(e: dict[str, Any]) -> str:
    by_layer = e.get("top_k_by_layer")
    top_k = f"{min(by_layer)}..{max(by_layer)} by layer" if by_layer else e["top_k"]
    text = f"{e['routed']} routed, top-{top_k}, {e['scoring']} scores, {e['topk_method']}"
    if "n_group" in e:
        text += f" ({e['topk_group']} of {e['n_group']} groups)"
    if e["selection_bias"]:
        text += ", selection bias"
    if e["router_bias"]:
        text += ", router bias"
    if e["activation"] != "silu" or e["expert_bias"]:
        text += f", {e['activation']} experts{' with biases' if e['expert_bias'] else ''}"
    if e["routed_scaling_factor"] != 1.0:
        text += f", weights x {e['routed_scaling_factor']:g}"
    if e["weight_scales_input"]:
        text += ", weight scales the expert's input"
    return text


def _tokenizer_text(t: dict[str, Any]) -> str:
    if not t["present"]:
        return "none (no tokenizer.json or tiktoken.model): token ids only"
    if "error" in t:
        return f"unreadable: {t['error']}"
    return f"vocab {t['vocab_size']}, chat template {'yes' if t['chat_template'] else 'no'}"


def _quantization_text(q: dict[str, Any] | None, store: dict[str, str] | None) -> str:
    if store is not None:  # a store keeps its source's quantization_config, but holds its own formats
        source = f" (converted from {q['method']}: {q['label']})" if q is not None else ""
        return (f"offload store: routed experts packed as {store['experts']}, dense matrices as {store['dense']}"
                f"{source}")
    if q is None:
        return "none"
    return (f"{q['method']}: {q['label']}, {q['bits_per_weight']:.2f} bits per weight; routed experts load as "
            f"{q['expert_format']} ({q['mapping']}) unless --experts says otherwise, other quantized matrices are "
            "dequantized to the model dtype")


def _checkpoint_text(ckpt: dict[str, Any] | None) -> str:
    if ckpt is None:
        return "no weights in this folder (config.json only): sizes below are computed from the config"
    return (f"{human_bytes(ckpt['bytes'])} in {ckpt['files']} file(s), {ckpt['tensors']} tensors, "
            + ", ".join(ckpt["dtypes"]))


def render(report: dict[str, Any], console: Console) -> None:
    """The report as two tables: what the model is, and what its weights cost per expert format."""
    layers, rope, params, ckpt = report["layers"], report["rope"], report["parameters"], report["checkpoint"]
    info = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    info.add_column(style="bold")
    info.add_column()
    dense = f", dense: {layers['dense_indices']}" if layers["dense"] else ""
    shared = report["experts"].get("shared")
    rope_text = f"{rope['type']}, theta {rope['theta']:g}"
    if rope["type"] != "default":
        rope_text += f", factor {rope['factor']:g} (from {rope['original_max_position_embeddings']})"
    rows = [
        ("model", f"{report['model_type']} ({', '.join(report['architectures']) or 'no architectures field'})"),
        ("layers", f"{layers['total']} ({layers['moe']} MoE{dense})"),
        ("hidden size", f"{report['hidden_size']} (expert intermediate {report['moe_intermediate_size']})"),
        ("experts", _experts_text(report["experts"])),
        ("shared experts", f"{shared['count']} x intermediate {shared['intermediate_size']}"
                           f"{', sigmoid-gated' if shared['gated'] else ''}" if shared else "none"),
        ("attention", _attention_text(report["attention"])),
        *([("linear attention", _linear_attention_text(report["linear_attention"], layers["total"]))]
          if report["linear_attention"] else []),
        ("vocab", str(report["vocab_size"])),
        ("max positions", str(report["max_position_embeddings"])),
        ("rope", rope_text),
        ("parameters", f"{human_count(params['total'])} total, {human_count(params['active_per_token'])} active "
                       f"per token ({human_count(params['per_expert'])} per expert)"),
        ("checkpoint", _checkpoint_text(ckpt)),
        ("quantization", _quantization_text(report["quantization"], report["store"])),
        *([("skipped", f"{ckpt['skipped']['tensors']} tensors ({human_bytes(ckpt['skipped']['bytes'])}) under "
                       f"{', '.join(ckpt['skipped']['prefixes'])}: not loaded (another tower of a multimodal "
                       "checkpoint, or a multi-token-prediction module)")]
          if ckpt and ckpt["skipped"]["tensors"] else []),
        ("tokenizer", _tokenizer_text(report["tokenizer"])),
    ]
    for key, value in rows:
        info.add_row(key, value)
    console.print(info)

    memory = report["memory"]["by_expert_format"]
    table = Table(title="weights by tier", title_justify="left")
    table.add_column("experts as")
    table.add_column("device (bf16)", justify="right")
    table.add_column("routed experts", justify="right")
    table.add_column("total", justify="right")
    for fmt, row in memory.items():
        table.add_row(fmt, human_bytes(row["device"]), human_bytes(row["experts"]), human_bytes(row["total"]))
    console.print(table)
    kv_text = f"KV cache: {human_bytes(report['memory']['kv_cache_bytes_per_token'])} per token (bf16)"
    if report["memory"]["recurrent_state_bytes"]:
        kv_text += f", plus {human_bytes(report['memory']['recurrent_state_bytes'])} of recurrent state at any context"
    console.print(kv_text)

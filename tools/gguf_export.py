"""Convert a Hugging Face Mixtral checkpoint folder into a GGUF file that llama.cpp loads (Q8_0, Q4_0 or F16).

    python tools/gguf_export.py SRC OUT.gguf --type q8_0
    python tools/gguf_export.py SRC OUT.gguf --type q4_0 --dense-type q8_0

`--type` is the format of the routed experts and, unless `--dense-type` says otherwise, of every other matrix
(token embedding, attention, LM head); norms and the router stay F32, as llama.cpp's own converter keeps them.
A matrix whose rows are not a whole number of quantization blocks (32 values) is stored F16 instead.

Mixtral becomes llama.cpp's "llama" architecture: the experts of a layer are stacked into one 3-D tensor per
projection (`blk.N.ffn_gate_exps` / `ffn_up_exps` / `ffn_down_exps`, [n_expert, rows, cols]) and the rows of q_proj
and k_proj are permuted from Hugging Face's rotate-half layout to the interleaved pairs llama.cpp's rope expects
(as convert_hf_to_gguf.py does). Synthetic checkpoints have no tokenizer, so a placeholder SentencePiece-style
vocabulary of the right size is written; feed token ids, not text.

Memory: the tensor table is written first from the shapes alone, then each tensor is read, converted and written
in turn, so at most one layer's stacked experts (in float32) are in memory at a time.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from safetensors import safe_open

ARCH = "llama"
QTYPES = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
          "q4_0": gguf.GGMLQuantizationType.Q4_0}
FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
F32 = gguf.GGMLQuantizationType.F32
F16 = gguf.GGMLQuantizationType.F16
# Mixtral's expert projections -> llama.cpp's stacked expert tensors
EXPERT_PROJECTIONS = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}
ATTENTION = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}


class WeightFiles:
    """The tensors of a checkpoint folder (one model.safetensors or shards with an index), read one at a time."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(folder / "model.safetensors", framework="pt") as f:
                weight_map = {name: "model.safetensors" for name in f.keys()}
        self.files = {file: safe_open(folder / file, framework="pt") for file in set(weight_map.values())}
        self.file_of = {name: self.files[file] for name, file in weight_map.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        """float32, in the checkpoint's (PyTorch) dimension order."""
        return self._file(name).get_tensor(name).float().numpy()

    def _file(self, name: str):
        if name not in self.file_of:
            raise KeyError(f"the checkpoint has no tensor {name!r}")
        return self.file_of[name]


@dataclass(frozen=True)
class MixtralShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    experts_per_token: int
    rms_norm_eps: float
    rope_theta: float
    rope_linear_factor: float | None  # None: no rope scaling
    context_length: int
    bos_token_id: int | None
    eos_token_id: int | None
    sliding_window: int | None  # llama.cpp's "llama" architecture has none: attention is over the whole context

    @classmethod
    def from_config(cls, hf: dict) -> MixtralShape:
        if hf.get("model_type") != "mixtral":
            raise ValueError(f"only model_type 'mixtral' is supported, got {hf.get('model_type')!r}")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type not in ("default", "linear"):
            raise ValueError(f"rope type {rope_type!r} has no llama.cpp 'llama' equivalent here")
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, num_experts=hf["num_local_experts"],
            experts_per_token=hf["num_experts_per_tok"], rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 1e6))),
            rope_linear_factor=float(rope["factor"]) if rope_type == "linear" else None,
            context_length=hf.get("max_position_embeddings", 4096), bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos, sliding_window=hf.get("sliding_window"),
        )


@dataclass(frozen=True)
class TensorJob:
    """One GGUF tensor: its name, shape in PyTorch order, storage type, and how to build it (float32)."""
    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    build: Callable[[], np.ndarray]
    fell_back: bool = False  # stored F16 because its rows are not whole blocks of the wanted type


def permute_for_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """q/k_proj rows [n_head * head_dim, ...] from HF's rotate-half order to llama.cpp's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_for_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of permute_for_rope."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def job(name: str, shape: tuple[int, ...], wanted: gguf.GGMLQuantizationType,
        build: Callable[[], np.ndarray]) -> TensorJob:
    """Stored as `wanted` where the row length is whole blocks of it; F16 otherwise (as llama.cpp's converter)."""
    block_size, _ = gguf.GGML_QUANT_SIZES[wanted]
    fits = shape[-1] % block_size == 0
    return TensorJob(name, shape, wanted if fits else F16, build, fell_back=not fits)


def tensor_jobs(files: WeightFiles, shape: MixtralShape, expert_type: gguf.GGMLQuantizationType,
                dense_type: gguf.GGMLQuantizationType) -> list[TensorJob]:
    """Every GGUF tensor of the model, in file order, none read yet."""
    def plain(gguf_name: str, hf_name: str, qtype: gguf.GGMLQuantizationType,
              transform: Callable[[np.ndarray], np.ndarray] = lambda w: w) -> TensorJob:
        return job(gguf_name, files.shape(hf_name), qtype, lambda: transform(files.read(hf_name)))

    def experts(gguf_name: str, layer: int, proj: str) -> TensorJob:
        names = [f"model.layers.{layer}.block_sparse_moe.experts.{e}.{proj}.weight" for e in range(shape.num_experts)]
        stacked = (shape.num_experts, *files.shape(names[0]))  # [n_expert, rows, cols]
        return job(gguf_name, stacked, expert_type, lambda: np.stack([files.read(n) for n in names]))

    jobs = [plain("token_embd.weight", "model.embed_tokens.weight", dense_type)]
    for i in range(shape.num_layers):
        hf, blk = f"model.layers.{i}", f"blk.{i}"
        jobs.append(plain(f"{blk}.attn_norm.weight", f"{hf}.input_layernorm.weight", F32))
        for proj, name in ATTENTION.items():
            heads = {"q_proj": shape.num_heads, "k_proj": shape.num_kv_heads}.get(proj)
            rope = (lambda w, n=heads: permute_for_rope(w, n)) if heads else (lambda w: w)
            jobs.append(plain(f"{blk}.{name}.weight", f"{hf}.self_attn.{proj}.weight", dense_type, rope))
        jobs.append(plain(f"{blk}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight", F32))
        jobs.append(plain(f"{blk}.ffn_gate_inp.weight", f"{hf}.block_sparse_moe.gate.weight", F32))
        jobs += [experts(f"{blk}.{name}.weight", i, proj) for proj, name in EXPERT_PROJECTIONS.items()]
    jobs.append(plain("output_norm.weight", "model.norm.weight", F32))
    if "lm_head.weight" in files:  # absent with tied embeddings: llama.cpp then reuses token_embd
        jobs.append(plain("output.weight", "lm_head.weight", dense_type))
    return jobs


def encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """float32 [..., cols] -> what the file holds: float arrays for F32/F16, uint8 blocks [..., row bytes] else."""
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def encoded_layout(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, nbytes) of encode()'s result for a tensor of `shape`, without computing it."""
    if qtype in (F32, F16):
        dtype = np.dtype(np.float32 if qtype == F32 else np.float16)
        return shape, dtype, int(np.prod(shape)) * dtype.itemsize
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def add_model_keys(writer: gguf.GGUFWriter, shape: MixtralShape, file_type: gguf.LlamaFileType) -> None:
    writer.add_name("mixtral")
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(shape.vocab_size)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.hidden_size)
    writer.add_block_count(shape.num_layers)
    writer.add_feed_forward_length(shape.intermediate_size)
    writer.add_head_count(shape.num_heads)
    writer.add_head_count_kv(shape.num_kv_heads)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    if shape.rope_linear_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(shape.rope_linear_factor)
    writer.add_layer_norm_rms_eps(shape.rms_norm_eps)
    writer.add_expert_count(shape.num_experts)
    writer.add_expert_used_count(shape.experts_per_token)


def add_placeholder_vocab(writer: gguf.GGUFWriter, shape: MixtralShape) -> None:
    """A SentencePiece ("llama") vocabulary of unique dummy pieces, with the checkpoint's bos/eos as control tokens.
    llama.cpp loads it (warning that it has no newline byte token); it is only good for token ids."""
    tokens = [f"<t{i}>" for i in range(shape.vocab_size)]
    types = [int(gguf.TokenType.NORMAL)] * shape.vocab_size
    for token_id, piece in ((shape.bos_token_id, "<s>"), (shape.eos_token_id, "</s>")):
        if token_id is not None and token_id < shape.vocab_size:
            tokens[token_id], types[token_id] = piece, int(gguf.TokenType.CONTROL)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * shape.vocab_size)
    writer.add_token_types(types)
    if shape.bos_token_id is not None:
        writer.add_bos_token_id(shape.bos_token_id)
    if shape.eos_token_id is not None:
        writer.add_eos_token_id(shape.eos_token_id)
    writer.add_add_bos_token(False)


def export(src: str | Path, out: str | Path, qtype: str = "q8_0", dense_qtype: str | None = None,
           log: Callable[[str], None] = print) -> Path:
    """Write `out` from the checkpoint folder `src`; returns the output path."""
    src, out = Path(src), Path(out)
    shape = MixtralShape.from_config(json.loads((src / "config.json").read_text()))
    if shape.sliding_window is not None and shape.sliding_window < shape.context_length:
        log(f"note: sliding_window={shape.sliding_window} is dropped: llama.cpp attends to the whole context")
    files = WeightFiles(src)
    jobs = tensor_jobs(files, shape, QTYPES[qtype], QTYPES[dense_qtype or qtype])
    for t in jobs:
        if t.fell_back:
            log(f"{t.name}: rows of {t.shape[-1]} values are not whole quantization blocks; stored as F16")

    writer = gguf.GGUFWriter(out, ARCH)
    add_model_keys(writer, shape, FILE_TYPES[qtype])
    add_placeholder_vocab(writer, shape)
    for t in jobs:  # the tensor table first, from the shapes alone
        stored_shape, dtype, nbytes = encoded_layout(t.shape, t.qtype)
        writer.add_tensor_info(t.name, stored_shape, dtype, nbytes, raw_dtype=t.qtype if dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for n, t in enumerate(jobs, 1):  # then the data, one tensor in memory at a time
        writer.write_tensor_data(encode(t.build(), t.qtype))
        log(f"[{n}/{len(jobs)}] {t.name} {t.qtype.name} {list(t.shape)}")
    writer.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="Hugging Face checkpoint folder (config.json + safetensors)")
    parser.add_argument("out", type=Path, help="the GGUF file to write")
    parser.add_argument("--type", default="q8_0", choices=sorted(QTYPES), help="experts (and default dense) format")
    parser.add_argument("--dense-type", default=None, choices=sorted(QTYPES),
                        help="token embedding, attention and LM head format (default: --type)")
    parser.add_argument("--quiet", action="store_true", help="do not print a line per tensor")
    args = parser.parse_args()
    out = export(args.src, args.out, args.type, args.dense_type, log=(lambda _: None) if args.quiet else print)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()

"""Convert a Hugging Face MoE checkpoint folder into a GGUF file that llama.cpp loads (Q8_0, Q4_0, F16 or F32).

    python tools/gguf_export.py SRC OUT.gguf --type q8_0
    python tools/gguf_export.py SRC OUT.gguf --type q4_0 --dense-type q8_0

`--type` is the format of the routed experts and, unless `--dense-type` says otherwise, of every other matrix
(token embedding, attention, dense MLPs, shared experts, LM head); norms and routers stay F32, as llama.cpp's own
converter keeps them. A matrix whose rows are not a whole number of quantization blocks (32 values) is stored F16
instead. F32 everywhere (`--type f32`) is for checking the export against transformers.

Architectures (tools/gguf_architectures.py has the details; names and keys follow llama.cpp's
convert_hf_to_gguf.py and the loader of the llama.cpp build llama-cpp-python 0.3.36 ships):
  mixtral      llama.cpp "llama". The experts of a layer are stacked into one 3-D tensor per projection
               (`blk.N.ffn_gate_exps` / `ffn_up_exps` / `ffn_down_exps`, [n_expert, rows, cols]); the rows of q_proj
               and k_proj are permuted from Hugging Face's rotate-half layout to the interleaved pairs llama.cpp's
               rope expects. A sliding window is dropped (llama.cpp's "llama" has none).
  qwen3_moe    llama.cpp "qwen3moe" (Qwen3-30B-A3B, Qwen3-235B-A22B). Per-head q/k RMSNorm (`attn_q_norm`,
               `attn_k_norm`), head_dim as configured, stacked experts, expert_feed_forward_length; rope is NEOX
               (rotate-half), so no permutation. Refused: dense layers (mlp_only_layers, decoder_sparse_step),
               norm_topk_prob false, attention biases (llama.cpp's qwen3moe has none of them).
  deepseek_v2  llama.cpp "deepseek2" with MLA (DeepSeek-V2, -V2-Lite). `attn_q` (q_lora_rank null) or `attn_q_a`,
               `attn_q_a_norm`, `attn_q_b`; `attn_kv_a_mqa`, `attn_kv_a_norm`; kv_b_proj split into `attn_k_b`
               [n_head, kv_lora_rank, qk_nope] (transposed per head, for the absorbed query) and `attn_v_b`
               [n_head, v_head_dim, kv_lora_rank]; key/value_length(_mla), kv_lora_rank, q_lora_rank; the first
               `first_k_dense_replace` layers' dense MLP (`ffn_gate` / `ffn_up` / `ffn_down`); shared experts
               (`ffn_*_shexp`); softmax gating, expert_weights_scale = routed_scaling_factor, expert group keys for
               group_limited_greedy; YaRN rope keys and rope.scaling.yarn_log_multiplier = 0.1 × mscale_all_dim as
               DeepSeek's softmax scale needs. The checkpoint's rope pairs are already llama.cpp's interleaved ones.
               llama.cpp ranks expert groups by their top-2 sum (DeepSeek-V3's rule), so a group-limited config
               exports with a note that its routing can differ; DeepSeek-V2-Lite has one group.

Synthetic checkpoints have no tokenizer, so a placeholder SentencePiece-style vocabulary of the right size is
written (for every architecture); feed token ids, not text.

A config llama.cpp cannot run as the same model is refused with one line (exit code 2). Memory: the tensor table
is written first from the shapes alone, then each tensor is read, converted and written in turn, so at most one
layer's stacked experts (in float32) are in memory at a time. The file is written to OUT.tmp and renamed when
complete.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_architectures import F16, F32, Architecture, ExportError, Formats, architecture  # noqa: E402

QTYPES = {"f32": F32, "f16": F16, "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}


class WeightFiles:
    """The tensors of a checkpoint folder (one model.safetensors or shards with an index), read one at a time."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").exists():
            with safe_open(folder / "model.safetensors", framework="pt") as f:
                weight_map = {name: "model.safetensors" for name in f.keys()}
        else:
            raise ExportError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
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
            raise ExportError(f"the checkpoint has no tensor {name!r}, which its config.json's model_type needs")
        return self.file_of[name]


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


def add_placeholder_vocab(writer: gguf.GGUFWriter, model: Architecture) -> None:
    """A SentencePiece ("llama") vocabulary of unique dummy pieces, with the checkpoint's bos/eos as control tokens.
    llama.cpp loads it (warning that it has no newline byte token); it is only good for token ids."""
    shape = model.common
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
           log: Callable[[str], None] = print, per_tensor: bool = True) -> Path:
    """Write `out` from the checkpoint folder `src`; returns the output path. Notes (approximations, F16 fallbacks)
    and, with per_tensor, a line per tensor written go to `log`. Raises ExportError for a checkpoint llama.cpp
    cannot run as the same model."""
    src, out = Path(src), Path(out)
    if not (src / "config.json").exists():
        raise ExportError(f"{src} has no config.json: give a Hugging Face checkpoint folder")
    model = architecture(json.loads((src / "config.json").read_text()))
    for note in model.notes:
        log(f"note: {note}")
    jobs = model.tensor_jobs(WeightFiles(src), Formats(experts=QTYPES[qtype], dense=QTYPES[dense_qtype or qtype]))
    for t in jobs:
        if t.fell_back:
            log(f"{t.name}: rows of {t.shape[-1]} values are not whole quantization blocks; stored as F16")

    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, model.llama_arch)
    try:
        model.add_keys(writer, FILE_TYPES[qtype])
        add_placeholder_vocab(writer, model)
        for t in jobs:  # the tensor table first, from the shapes alone
            stored_shape, dtype, nbytes = encoded_layout(t.shape, t.qtype)
            writer.add_tensor_info(t.name, stored_shape, dtype, nbytes,
                                   raw_dtype=t.qtype if dtype == np.uint8 else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for n, t in enumerate(jobs, 1):  # then the data, one tensor in memory at a time
            writer.write_tensor_data(encode(t.build(), t.qtype))
            if per_tensor:
                log(f"[{n}/{len(jobs)}] {t.name} {t.qtype.name} {list(t.shape)}")
    except BaseException:  # no half-written file left behind under either name
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="Hugging Face checkpoint folder (config.json + safetensors)")
    parser.add_argument("out", type=Path, help="the GGUF file to write")
    parser.add_argument("--type", default="q8_0", choices=sorted(QTYPES), help="experts (and default dense) format")
    parser.add_argument("--dense-type", default=None, choices=sorted(QTYPES),
                        help="token embedding, attention, dense MLP, shared expert and LM head format "
                             "(default: --type)")
    parser.add_argument("--quiet", action="store_true", help="no line per tensor (notes are still printed)")
    args = parser.parse_args()
    try:
        out = export(args.src, args.out, args.type, args.dense_type, per_tensor=not args.quiet)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()

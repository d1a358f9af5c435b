"""Convert a Hugging Face MoE checkpoint folder into a GGUF file that llama.cpp loads (Q8_0, Q4_0, F16 or F32).

    python tools/gguf_export.py SRC OUT.gguf --type q8_0
    python tools/gguf_export.py SRC OUT.gguf --type q4_0 --dense-type q8_0
    python tools/gguf_export.py --synthetic qwen3-30b-a3b OUT.gguf --type q4_0 --embed-std 1 --out-std 0.002 --skew 1

`--synthetic SHAPE` takes the weights from tools/make_checkpoint.py's generator instead of a folder: the GGUF holds
exactly the weights `make_checkpoint.py SHAPE DIR` packs into an offload store (or writes as a bf16 folder with
`--hf`) for the same `--layers / --seed / --std / --embed-std / --out-std / --skew`, without a bf16 copy of the
model on disk. Both engines then run the same model on the same token ids.

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
is written first from the shapes alone, then each tensor is built, encoded and written in turn; stacked experts
are read one expert at a time and every tensor is encoded in bands of rows into its encoded buffer, so memory
holds one tensor's encoded bytes plus one source matrix in float32 (the largest is the LM head or embedding). The
file is written to OUT.tmp and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_checkpoint  # noqa: E402
from gguf_architectures import F16, F32, Architecture, ExportError, Formats, TensorJob, architecture  # noqa: E402
from offload.weights.store import tensor_roles  # noqa: E402

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


class SyntheticWeights:
    """The tensors of make_checkpoint's synthetic model (the names and shapes of a `make_checkpoint.py --hf` folder),
    each made from make_checkpoint.Values when read: the same bf16 values that tool writes for the same options."""

    def __init__(self, hf_config: dict[str, Any], values: make_checkpoint.Values):
        self.values = values
        self.shapes = dict(make_checkpoint.hf_tensors(tensor_roles(hf_config)))

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.shapes:
            raise ExportError(f"the synthetic model has no tensor {name!r}, which its config's model_type needs")
        return tuple(self.shapes[name])

    def read(self, name: str) -> np.ndarray:
        """float32, in PyTorch dimension order."""
        return self.values.tensor(name, self.shape(name)).float().numpy()


BAND_VALUES = 1 << 22  # values encoded per call: bounds the quantizer's float temporaries (~10x its input)


def encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """float32 [..., cols] -> what the file holds: float arrays for F32/F16, uint8 blocks [..., row bytes] else."""
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def encode_job(t: TensorJob) -> np.ndarray:
    """The bytes of one tensor as the file holds them, built from its slabs and encoded in bands of whole rows
    (every type here encodes each row on its own, so the bands concatenate to encode(whole tensor))."""
    stored_shape, dtype, _ = encoded_layout(t.shape, t.qtype)
    out = np.empty(stored_shape, dtype)
    out_rows = out.reshape(-1, stored_shape[-1])  # [rows, encoded row]
    cols = t.shape[-1]
    band = max(1, BAND_VALUES // cols)
    row = 0
    for slab in t.slabs():
        rows = slab.reshape(-1, cols)  # [slab rows, cols]
        for start in range(0, len(rows), band):
            encoded = encode(rows[start : start + band], t.qtype)
            out_rows[row : row + len(encoded)] = encoded
            row += len(encoded)
    if row != len(out_rows):
        raise RuntimeError(f"{t.name}: built {row} rows, its shape {list(t.shape)} has {len(out_rows)}")
    return out


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
    src = Path(src)
    if not (src / "config.json").exists():
        raise ExportError(f"{src} has no config.json: give a Hugging Face checkpoint folder")
    return write_gguf(json.loads((src / "config.json").read_text()), WeightFiles(src), out, qtype, dense_qtype,
                      log, per_tensor)


def export_synthetic(hf_config: dict[str, Any], out: str | Path, qtype: str = "q8_0", dense_qtype: str | None = None,
                     seed: int = 0, std: float = 0.02, skew: float = 0.0, embed_std: float | None = None,
                     out_std: float | None = None, log: Callable[[str], None] = print,
                     per_tensor: bool = True) -> Path:
    """Write `out` from make_checkpoint's synthetic values for `hf_config` (make_checkpoint.shape_config(SHAPE,
    layers) on the command line), as export() does from a folder: the weights make_checkpoint writes for the same
    config and options (write_hf, write_quantized)."""
    values = make_checkpoint.Values(hf_config, seed, std, skew, embed_std, out_std)
    return write_gguf(hf_config, SyntheticWeights(hf_config, values), out, qtype, dense_qtype, log, per_tensor)


def write_gguf(config: dict[str, Any], weights: WeightFiles | SyntheticWeights, out: str | Path, qtype: str,
               dense_qtype: str | None, log: Callable[[str], None], per_tensor: bool) -> Path:
    """The GGUF of the model `config` describes, its tensors read from `weights` (OUT's folder made if missing)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = architecture(config)
    for note in model.notes:
        log(f"note: {note}")
    jobs = model.tensor_jobs(weights, Formats(experts=QTYPES[qtype], dense=QTYPES[dense_qtype or qtype]))
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
        t0 = time.perf_counter()
        for n, t in enumerate(jobs, 1):  # then the data, one tensor in memory at a time
            writer.write_tensor_data(encode_job(t))
            if per_tensor:
                log(f"[{n}/{len(jobs)}] {t.name} {t.qtype.name} {list(t.shape)}  {time.perf_counter() - t0:.1f} s")
    except BaseException:  # no half-written file left behind under either name
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s [options] SRC OUT.gguf | --synthetic SHAPE [options] OUT.gguf")
    parser.add_argument("paths", type=Path, nargs="+", metavar="SRC OUT.gguf",
                        help="Hugging Face checkpoint folder (config.json + safetensors) and the GGUF file to write; "
                             "with --synthetic, only the GGUF file")
    parser.add_argument("--type", default="q8_0", choices=sorted(QTYPES), help="experts (and default dense) format")
    parser.add_argument("--dense-type", default=None, choices=sorted(QTYPES),
                        help="token embedding, attention, dense MLP, shared expert and LM head format "
                             "(default: --type)")
    parser.add_argument("--quiet", action="store_true", help="no line per tensor (notes are still printed)")
    synthetic = parser.add_argument_group("synthetic source", "the weights of tools/make_checkpoint.py SHAPE, "
                                          "made from these options as that tool makes them")
    synthetic.add_argument("--synthetic", metavar="SHAPE", default=None, choices=list(make_checkpoint.SHAPES),
                           help="export make_checkpoint's SHAPE instead of a folder: "
                                f"{', '.join(make_checkpoint.SHAPES)}")
    make_checkpoint.add_value_options(synthetic)
    args = parser.parse_args(argv)
    try:
        out = run(args, parser)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """The export the parsed command line asks for."""
    value_options = {"seed": args.seed, "std": args.std, "skew": args.skew, "embed_std": args.embed_std,
                     "out_std": args.out_std}
    if args.synthetic is None:
        if len(args.paths) != 2:
            raise ExportError("give SRC OUT.gguf (a checkpoint folder and the file to write), or --synthetic SHAPE "
                              "OUT.gguf")
        given = [f"--{k.replace('_', '-')}" for k, v in {**value_options, "layers": args.layers}.items()
                 if v != parser.get_default(k)]
        if given:
            raise ExportError(f"{', '.join(given)} only apply with --synthetic SHAPE (a folder's weights are its own)")
        return export(args.paths[0], args.paths[1], args.type, args.dense_type, per_tensor=not args.quiet)
    if len(args.paths) != 1:
        raise ExportError("with --synthetic SHAPE give only OUT.gguf (the weights come from make_checkpoint, not a "
                          "folder)")
    if args.layers is not None and args.layers < 1:
        raise ExportError(f"--layers must be at least 1, got {args.layers}")
    config = make_checkpoint.shape_config(args.synthetic, args.layers)
    return export_synthetic(config, args.paths[0], args.type, args.dense_type, **value_options,
                            per_tensor=not args.quiet)


if __name__ == "__main__":
    main()

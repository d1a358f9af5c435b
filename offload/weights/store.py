"""Pre-quantized stores: checkpoint folders whose expert (and optionally dense) matrices are already in offload's
packed formats, so loading is a memory map with no quantization step.

A store is a checkpoint folder like any other: config.json, tokenizer files, one safetensors shard per decoder
layer plus one for the embeddings, final norm and LM head (`model-0000k-of-0000n.safetensors`), and
model.safetensors.index.json, whose metadata names the formats:

    {"metadata": {"offload_store": {"version": 1, "experts": "int4", "dense": "int8"}}, "weight_map": {...}}

A packed matrix NAME — a layer's stacked experts (`model.layers.3.mlp.experts.gate_proj`, [E, O, K]) or a dense
weight (`model.layers.3.self_attn.q_proj.weight`, a [1, O, K] stack) — is stored as the arrays NAME.q, NAME.d and
NAME.m of csrc_py.formats (those its format has: int8 and int4s have no .m), and its shard's metadata entry
"offload.packed" maps NAME -> {"format", "shape"}.
Everything else is stored exactly as in the source checkpoint. Byte layouts: docs/formats.md.

Writing goes one shard at a time, each to a temporary name renamed when complete, and streams within a shard
(weights.safetensors_writer: the header first, then each matrix as it is packed and each kept tensor copied from
its source file), so memory is one matrix in float plus its packed copy; the index is written last, so a folder
without it is unfinished and a second run resumes from the finished shards.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Union

import torch

from ..arch import Architecture, architecture
from ..errors import CheckpointError, OffloadError
from .checkpoint import CONVERT_PROGRESS_FILE, INDEX_FILE, Checkpoint, TensorInfo, read_safetensors_file
from .fused import ExpertSlice, FusedExperts, pack_slice_exact, read_slice
from .safetensors_writer import Job, TensorSpec, TensorWriter, write_safetensors
from .source import InventedSource

if TYPE_CHECKING:
    from csrc_py.formats import PackedMatrix

STORE_VERSION = 1
STORE_KEY = "offload_store"
PACKED_KEY = "offload.packed"
EXPERT_FORMATS = ("bf16", "int8", "int4", "int4s")
DENSE_FORMATS = ("bf16", "int8", "int4", "int4s")  # "bf16": dense weights stay as the source stores them
ARRAY_DTYPES = {"q": None, "d": "float16", "m": "float16"}  # q's dtype depends on the format
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.uint16: "U16", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
                      torch.float8_e5m2: "F8_E5M2", torch.float8_e8m0fnu: "F8_E8M0"}
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                "chat_template.jinja", "chat_template.json", "tiktoken.model", "tokenization_kimi.py")


@dataclass(frozen=True)
class PackedEntry:
    fmt: str
    shape: tuple[int, int, int]  # (E, O, K) before padding


@dataclass(frozen=True)
class StoreFormats:
    experts: str
    dense: str


def store_formats(checkpoint: Checkpoint) -> StoreFormats | None:
    """The formats of a store, or None for an ordinary checkpoint."""
    info = checkpoint.index_metadata.get(STORE_KEY)
    if info is None:
        return None
    if not isinstance(info, dict) or info.get("version") != STORE_VERSION:
        raise CheckpointError(f"{checkpoint.folder} is an offload store of an unknown version ({info!r}); convert "
                              "the model again with this offload")
    return StoreFormats(info["experts"], info["dense"])


def packed_entries(checkpoint: Checkpoint) -> dict[str, PackedEntry]:
    """Every packed matrix of a checkpoint by name (empty for an ordinary checkpoint)."""
    entries: dict[str, PackedEntry] = {}
    for path, metadata in checkpoint.file_metadata.items():
        if PACKED_KEY not in metadata:
            continue
        try:
            table = json.loads(metadata[PACKED_KEY])
            for name, entry in table.items():
                entries[name] = PackedEntry(entry["format"], tuple(entry["shape"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt {PACKED_KEY} metadata; convert the model again") from None
    return entries


def packed_nbytes(checkpoint: Checkpoint, entries: dict[str, PackedEntry]) -> int:
    """Bytes of the stored arrays of the packed matrices `entries` (packed_entries(checkpoint))."""
    tensors = checkpoint.tensors
    return sum(tensors[f"{name}.{part}"].nbytes for name in entries for part in ARRAY_DTYPES
               if f"{name}.{part}" in tensors)


def read_packed(checkpoint: Checkpoint, name: str, entry: PackedEntry, huge_pages: bool = False) -> PackedMatrix:
    """A packed matrix (checked against the layout its format needs) over memory-mapped arrays, or with
    `huge_pages` its large arrays read into huge pages (Checkpoint.array)."""
    import numpy as np

    from csrc_py.formats import PackedMatrix, empty

    layout = empty(entry.fmt, 1, 1, 1)  # which arrays the format has, and their dtypes
    arrays = {}
    for part in ("q", "d", "m"):
        if getattr(layout, part) is None:
            continue
        array_name = f"{name}.{part}"
        if array_name not in checkpoint.tensors:
            raise CheckpointError(f"{checkpoint.folder}: packed matrix {name!r} has no {part} array; the store is "
                                  "incomplete, convert the model again")
        arrays[part] = checkpoint.array(array_name, np.dtype(getattr(layout, part).dtype), huge_pages)
    return PackedMatrix(entry.fmt, entry.shape, **arrays)


# --- writing ---------------------------------------------------------------------------------------------------

MatrixName = Union[str, ExpertSlice]  # a tensor's name, or one expert's matrix in a whole-layer tensor


@dataclass
class TensorRole:
    """How the loader uses one tensor, and so how a store writes it.

    plain:   stored as in the source (norms, routers, biases, embeddings)
    linear:  a dense Linear weight [out, in]: packed when the store's dense format is quantized and `quantize`
    experts: one layer's stacked routed experts (`name` is the packed name); `sources` are the per-expert
             tensors, or each expert's slice of whole-layer tensors (weights.fused), stacked in order
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    quantize: bool = True
    sources: tuple[MatrixName, ...] = field(default_factory=tuple)


class RoleRecorder(InventedSource):
    """Builds the model on the meta device and records, for every tensor the loader asks for, its role."""

    def __init__(self) -> None:
        super().__init__(lambda name, shape: torch.empty(shape, device="meta"), device=torch.device("meta"))
        self.roles: list[TensorRole] = []

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        self.roles.append(TensorRole(name, "plain", tuple(shape)))
        return super().take(name, shape, dtype)

    def linear_weight(self, name: str, shape: tuple[int, int], quantize: bool = True):
        self.roles.append(TensorRole(name, "linear", tuple(shape), quantize, (name,)))
        return torch.empty(shape, device="meta")

    def tied_linear_weight(self, embed_name: str, embed: torch.Tensor):
        self.roles.append(TensorRole("lm_head.weight", "linear", tuple(embed.shape), True, (embed_name,)))
        return embed

    def expert_weights(self, prefix: str, proj: tuple[str, str, str], E: int, I: int, H: int):
        from ..experts.base import ExpertWeights

        for p, shape in zip(proj, ((I, H), (I, H), (H, I))):
            sources = tuple(f"{prefix}.{j}.{p}.weight" for j in range(E))
            self.roles.append(TensorRole(f"{prefix}.{p}", "experts", (E, *shape), True, sources))
        return ExpertWeights(*(torch.empty(s, device="meta") for s in ((E, I, H), (E, I, H), (E, H, I))))

    def _take_fused(self, fused: FusedExperts) -> None:
        """A fused layer is stored as the packed stacks `{prefix}.gate_proj` / `up_proj` / `down_proj`
        (weights.fused), each expert's matrix cut from the whole-layer tensors (its biases are plain tensors)."""
        for name, shape, slices in fused.stacks():
            self.roles.append(TensorRole(name, "experts", shape, True, tuple(slices)))

    def _read_slice(self, s: ExpertSlice) -> torch.Tensor:
        return torch.empty(s.shape, device="meta")


def tensor_roles(hf_config: dict[str, Any]) -> list[TensorRole]:
    """Every tensor the loader reads for hf_config, with its role, in build order."""
    from ..experts.reference import ReferenceExperts
    from ..model.transformer import Transformer

    arch = architecture(hf_config.get("model_type"))
    recorder = RoleRecorder()
    Transformer(arch.config_from_hf(hf_config), arch.names, recorder, lambda layer, w: ReferenceExperts(w),
                max_context=1)
    return recorder.roles


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def shard_roles(roles: list[TensorRole], num_layers: int) -> list[list[TensorRole]]:
    """One shard per decoder layer, then one for everything outside the layers."""
    shards: list[list[TensorRole]] = [[] for _ in range(num_layers + 1)]
    for role in roles:
        match = _LAYER.match(role.name)
        shards[int(match.group(1)) if match else num_layers].append(role)
    return shards


def shard_file(k: int, n: int) -> str:
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


Reader = Callable[[MatrixName, tuple[int, ...]], torch.Tensor]  # (source tensor name, shape) -> tensor


@dataclass(frozen=True)
class KeptTensor:
    """A source tensor a store keeps as it is: its name in the store, and where its bytes are in the source."""

    name: str
    info: TensorInfo


@dataclass(frozen=True)
class StoreSource:
    """What write_store reads. `read(name, shape)`: a tensor the loader asks for (float32 where the source stores
    it quantized). A checkpoint also gives `kept(name)`, the stored tensors of one the store keeps as it is (a
    quantized encoding included: the store's config.json keeps the quantization_config that reads them), copied
    from the source file without being read into memory, and `pack_exact(name, out, e)`, which packs a quantized
    matrix from its own integer grid where the format holds it exactly (False where not)."""

    read: Reader
    kept: Callable[[str], list[KeptTensor]] | None = None
    pack_exact: Callable[[MatrixName, "PackedMatrix", int], bool] | None = None  # Checkpoint.pack_exact


def write_store(out: str | Path, hf_config: dict[str, Any], read: Reader | StoreSource, experts: str,
                dense: str = "bf16", copy_from: Path | None = None, source_label: str = "",
                on_shard: Callable[[int, int, str, bool], None] | None = None) -> Path:
    """Write a store for hf_config into `out`, reading source tensors with `read(name, shape)` (or a StoreSource).

    Resumes an unfinished store written with the same options (finished shards are kept; a shard whose file does
    not validate is written again). on_shard(done, total, file name, resumed) follows the progress.
    """
    from csrc_py.formats import check_format

    if experts not in EXPERT_FORMATS:
        raise OffloadError(f"experts must be one of {', '.join(EXPERT_FORMATS)}, got {experts!r}")
    if dense not in DENSE_FORMATS:
        raise OffloadError(f"dense must be one of {', '.join(DENSE_FORMATS)}, got {dense!r}")
    check_format(experts)
    source = read if isinstance(read, StoreSource) else StoreSource(read)
    out = Path(out).expanduser()
    options = {"version": STORE_VERSION, "experts": experts, "dense": dense, "source": source_label}
    if _already_written(out, options):
        return out
    _start_or_resume(out, options)
    roles = tensor_roles(hf_config)
    shards = shard_roles(roles, int(hf_config["num_hidden_layers"]))
    _write_text(out / "config.json", json.dumps(hf_config, indent=2) + "\n")
    for name in COPIED_FILES:
        if copy_from is not None and (copy_from / name).exists():
            shutil.copyfile(copy_from / name, out / name)
    weight_map: dict[str, str] = {}
    total_size = 0
    for k, shard in enumerate(shards):
        name = shard_file(k, len(shards))
        path = out / name
        tensors = _finished_shard(path)
        resumed = tensors is not None
        if tensors is None:
            tensors = _write_shard(path, shard, source, experts, dense)
        for tensor_name, info in tensors.items():
            weight_map[tensor_name] = name
            total_size += info.nbytes
        if on_shard is not None:
            on_shard(k + 1, len(shards), name, resumed)
    index = {"metadata": {"total_size": total_size, STORE_KEY: {k: v for k, v in options.items() if k != "source"}},
             "weight_map": dict(sorted(weight_map.items()))}
    _write_text(out / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    (out / CONVERT_PROGRESS_FILE).unlink(missing_ok=True)
    return out


def _already_written(out: Path, options: dict[str, Any]) -> bool:
    """Whether `out` is a finished store with these formats (running convert again is then a no-op)."""
    if not (out / INDEX_FILE).exists() or (out / CONVERT_PROGRESS_FILE).exists():
        return False
    try:
        formats = store_formats(Checkpoint(out))
    except CheckpointError:
        return False
    return formats == StoreFormats(options["experts"], options["dense"])


def _start_or_resume(out: Path, options: dict[str, Any]) -> None:
    """Record the options of a new store, or check that an unfinished one was started with the same ones."""
    progress = out / CONVERT_PROGRESS_FILE
    if out.exists() and any(out.iterdir()):
        if (out / INDEX_FILE).exists() and not progress.exists():
            raise OffloadError(f"{out} already holds a finished checkpoint in other formats; choose another output "
                               "folder or delete it")
        if not progress.exists():
            raise OffloadError(f"{out} is not empty and is not an unfinished store; choose an empty output folder")
        try:
            started = json.loads(progress.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise OffloadError(f"{progress} is corrupt; delete {out} and convert again") from None
        if started != options:
            diff = ", ".join(f"{k} {started.get(k)!r} -> {v!r}" for k, v in options.items() if started.get(k) != v)
            raise OffloadError(f"{out} is an unfinished store written with other options ({diff}); rerun with the "
                               "same options to resume, or choose an empty output folder")
        (out / INDEX_FILE).unlink(missing_ok=True)
        for leftover in out.glob("*.tmp"):
            leftover.unlink()
        return
    out.mkdir(parents=True, exist_ok=True)
    _write_text(progress, json.dumps(options, indent=2) + "\n")


def _finished_shard(path: Path):
    """The tensor table of a shard a previous run finished, or None (absent or not valid: written again)."""
    if not path.exists():
        return None
    try:
        return read_safetensors_file(path)[0]
    except CheckpointError:
        path.unlink()
        return None


def _write_shard(path: Path, roles: Iterable[TensorRole], source: StoreSource, experts: str, dense: str):
    """One shard, streamed (weights.safetensors_writer): memory is one packed matrix or one copied chunk."""
    specs: list[TensorSpec] = []
    jobs: list[Job] = []
    packed: dict[str, dict[str, Any]] = {}
    for role in roles:
        if role.kind == "linear" and (dense == "bf16" or not role.quantize):
            if role.sources == (role.name,):  # a tied head is not written: the loader ties it again
                _keep(role, source, specs, jobs)
        elif role.kind == "plain":
            _keep(role, source, specs, jobs)
        else:
            stack = role.kind == "experts"
            fmt, shape = (experts, role.shape[1:]) if stack else (dense, role.shape)
            _pack(role.name, list(role.sources), tuple(shape), fmt, source, specs, jobs)
            packed[role.name] = {"format": fmt, "shape": [len(role.sources), *shape]}
    tmp = path.with_name(path.name + ".tmp")
    write_safetensors(tmp, specs, jobs, {PACKED_KEY: json.dumps(packed)})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return read_safetensors_file(path)[0]


def _keep(role: TensorRole, source: StoreSource, specs: list[TensorSpec], jobs: list[Job]) -> None:
    """A tensor written as the source stores it: copied from the source file, or (a source that makes its
    tensors, e.g. tools/make_checkpoint.py) made now and written from memory."""
    if source.kept is not None:
        for kept in source.kept(role.name):
            specs.append(TensorSpec(kept.name, kept.info.dtype, tuple(kept.info.shape)))
            jobs.append(functools.partial(_copy_job, kept))
        return
    tensor = source.read(role.name, role.shape).contiguous()
    specs.append(TensorSpec(role.name, SAFETENSORS_DTYPES[tensor.dtype], tuple(tensor.shape)))
    jobs.append(functools.partial(_bytes_job, role.name, tensor))


def _copy_job(kept: KeptTensor, writer: TensorWriter) -> None:
    writer.copy(kept.name, kept.info.file, kept.info.offset)


def _bytes_job(name: str, tensor: torch.Tensor, writer: TensorWriter) -> None:
    writer.write(name, 0, tensor.reshape(-1).view(torch.uint8).numpy().data)


def _pack(name: str, sources: list[MatrixName], shape: tuple[int, int], fmt: str, source: StoreSource,
          specs: list[TensorSpec], jobs: list[Job]) -> None:
    """The matrices `sources` (each [O, K]) as one packed stack NAME.q/.d/.m, written one matrix at a time."""
    from csrc_py.formats import empty

    for part, array in _parts(empty(fmt, 1, *shape)):
        specs.append(TensorSpec(f"{name}.{part}", SAFETENSORS_DTYPES[torch.from_numpy(array).dtype],
                                (len(sources), *array.shape[1:])))
    jobs.append(functools.partial(_pack_job, name, sources, shape, fmt, source))


def _pack_job(name: str, sources: list[MatrixName], shape: tuple[int, int], fmt: str, source: StoreSource,
              writer: TensorWriter) -> None:
    """Each matrix packed alone and written into its slot of the stack: from the source's own integer grid where
    the format holds it exactly (weights.source does the same at load), else quantized from floats."""
    from csrc_py.formats import empty, pack_expert

    for e, matrix_name in enumerate(sources):
        one = empty(fmt, 1, *shape)
        if source.pack_exact is None or not source.pack_exact(matrix_name, one, 0):
            pack_expert(one, 0, source.read(matrix_name, shape))
        for part, array in _parts(one):
            writer.write(f"{name}.{part}", e * array.nbytes, array.data)


def _parts(matrix: PackedMatrix) -> list[tuple[str, Any]]:
    return [(part, getattr(matrix, part)) for part in ("q", "d", "m") if getattr(matrix, part) is not None]


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def convert(source: str | Path, out: str | Path, experts: str | None, dense: str = "bf16",
            on_shard: Callable[[int, int, str, bool], None] | None = None) -> Path:
    """Convert a Hugging Face checkpoint folder (unquantized, or in a weights.quant scheme) into a store (see
    write_store). Every tensor of the source must be used or a known extra, checked before any weight is read.
    experts=None: the format a quantized checkpoint's scheme maps onto."""
    checkpoint = Checkpoint(source)
    if store_formats(checkpoint) is not None:
        raise OffloadError(f"{checkpoint.folder} is already an offload store; convert the original checkpoint")
    if experts is None:
        if checkpoint.scheme is None:
            raise OffloadError(f"{checkpoint.folder} is not quantized: choose the experts' format with --experts "
                               f"({', '.join(EXPERT_FORMATS)})")
        experts = checkpoint.scheme.expert_format
    # A multimodal checkpoint's store is its text model alone: the text config, the text model's own names.
    arch = architecture(checkpoint.config_json.get("model_type"))
    hf_config, stored, own_name = arch.text_config(checkpoint.config_json), arch.checkpoint_name, arch.runtime_name
    check_sources(checkpoint, tensor_roles(hf_config), arch)

    # Each read closes the files after it: the next one maps its file anew, so the source pages a matrix was read
    # from leave resident memory when that matrix is packed and dropped, instead of staying mapped (and counted)
    # until the end of the shard (a whole layer of source on top of its packed weights).
    def read(name: MatrixName, shape: tuple[int, ...]) -> torch.Tensor:
        try:  # names and shapes were checked by check_sources
            if isinstance(name, ExpertSlice):
                return read_slice(checkpoint, name.renamed(stored))
            return checkpoint.read_logical(stored(name))
        finally:
            checkpoint.release()

    def kept(name: str) -> list[KeptTensor]:
        return [KeptTensor(own_name(part), checkpoint.tensors[part]) for part in checkpoint.logical[stored(name)].parts]

    def pack_exact(name: MatrixName, out: PackedMatrix, e: int) -> bool:
        try:
            if isinstance(name, ExpertSlice):
                return pack_slice_exact(checkpoint, name.renamed(stored), out, e)
            return checkpoint.pack_exact(stored(name), out, e)
        finally:
            checkpoint.release()

    return write_store(out, hf_config, StoreSource(read, kept, pack_exact), experts, dense,
                       copy_from=checkpoint.folder, source_label=str(checkpoint.folder.resolve()), on_shard=on_shard)


def check_sources(checkpoint: Checkpoint, roles: list[TensorRole], arch: Architecture) -> None:
    """Every tensor the roles read is in the checkpoint with its shape, and every stored tensor is read by one of
    them or is a known extra (as WeightSource.finish checks at load): from the headers alone."""
    from .source import known_extras, unexpected_tensors_error

    used: set[str] = set()
    for role in roles:
        names = role.sources if role.kind != "plain" else (role.name,)
        for source in names:
            name = source.tensor if isinstance(source, ExpertSlice) else source
            t = checkpoint.logical.get(arch.checkpoint_name(name))
            if t is None:
                raise CheckpointError(f"tensor {arch.checkpoint_name(name)!r} is missing from {checkpoint.folder}; "
                                      "the checkpoint is incomplete or does not match config.json")
            shape = source.stored_shape(t.quantized) if isinstance(source, ExpertSlice) else \
                role.shape[1:] if role.kind == "experts" else role.shape
            if tuple(t.shape) != tuple(shape):
                raise CheckpointError(f"tensor {t.name!r} in {checkpoint.tensors[t.parts[0]].file.name} has shape "
                                      f"{list(t.shape)}, config.json implies {list(shape)}")
            used.update(t.parts)
    cfg = arch.config_from_hf(checkpoint.config_json)
    is_extra = known_extras(cfg.num_hidden_layers, cfg.num_extra_layers, arch.runtime_name, arch.skipped_prefixes)
    unexpected = [name for name in sorted(set(checkpoint.tensors) - used) if not is_extra(name)]
    if unexpected:
        raise unexpected_tensors_error(checkpoint, unexpected)

"""A Hugging Face checkpoint folder: config.json plus one safetensors file or shards listed in an index.

Headers are validated up front (so a missing shard or a truncated download is reported before any weight is
read); tensors are then read lazily through safetensors' memory-mapped `safe_open`.
"""
from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open

from ..errors import CheckpointError
from . import hugepages
from .quant import LogicalTensor, QuantScheme, logical_tensors, scheme_for

if TYPE_CHECKING:
    from csrc_py.formats import PackedMatrix

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONVERT_PROGRESS_FILE = ".offload-convert.json"  # present while `offload convert` is writing a folder
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int = 0  # where the tensor's bytes start in the file

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * DTYPE_BYTES.get(self.dtype, 1)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; a checkpoint folder needs it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); re-download or fix the file") from None


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor table of one safetensors file, checking that the file holds every byte its header promises."""
    return read_safetensors_file(path)[0]


def read_safetensors_file(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """(tensor table, the header's __metadata__) of one safetensors file, validated as read_safetensors_header."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes, no safetensors header); re-download it")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100_000_000:
            raise CheckpointError(f"{path} has a corrupt safetensors header (length {header_len}); re-download it")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} has a corrupt safetensors header (not JSON); re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header; re-download it")
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []  # (start, end, name) of each tensor's bytes in the data section
    metadata = header.get("__metadata__") or {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if not all(isinstance(n, int) and n >= 0 for n in (*shape, start, end)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: header entry for tensor {name!r} is corrupt; re-download it") from None
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r} (known: "
                                  f"{', '.join(DTYPE_BYTES)}); re-download or re-save the checkpoint")
        numel = 1
        for dim in shape:
            numel *= dim
        if end - start != numel * DTYPE_BYTES[dtype]:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - start} bytes for shape {list(shape)} {dtype}")
        spans.append((start, end, name))
        tensors[name] = TensorInfo(path, dtype, shape, 8 + header_len + start)
    # As the safetensors format requires (and safe_open checks when a weight is read): the tensors tile the data
    # section, each starting where the previous one ends, so no two tensors share a byte.
    data_end, previous = 0, None
    for start, end, name in sorted(spans):
        if start < data_end:
            raise CheckpointError(f"{path}: tensors {previous!r} and {name!r} overlap in the file; re-download or "
                                  "re-save the checkpoint")
        if start > data_end:
            raise CheckpointError(f"{path}: {start - data_end} bytes before tensor {name!r} belong to no tensor; "
                                  "re-download or re-save the checkpoint")
        data_end, previous = end, name
    if 8 + header_len + data_end > size:
        missing = 8 + header_len + data_end - size
        raise CheckpointError(f"{path} is truncated: {missing} bytes of tensor data are missing; re-download it")
    if 8 + header_len + data_end < size:
        extra = size - 8 - header_len - data_end
        raise CheckpointError(f"{path} has {extra} bytes past its last tensor; re-download or re-save the checkpoint")
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (__metadata__); re-download it")
    return tensors, metadata


def read_config(folder: str | Path) -> dict[str, Any]:
    """A checkpoint folder's config.json, alone: what a plan or a description needs before any weight exists."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; pass a Hugging Face checkpoint folder")
    return read_json(folder / "config.json")


def holds_weights(folder: str | Path) -> bool:
    """Whether a folder has (or is writing) safetensors weights; a folder with only config.json describes a model
    that `plan` and `inspect` can still size."""
    folder = Path(folder).expanduser()
    return any((folder / name).exists() for name in (INDEX_FILE, SINGLE_FILE, CONVERT_PROGRESS_FILE))


class Checkpoint:
    """The tensors of a checkpoint folder by name, with their files, dtypes and shapes; reads are lazy.

    `tensors` are the stored tensors; `logical` the tensors the loader asks for, which a quantized checkpoint
    (`scheme`, from quantization_config) stores as several parts (weights.quant)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        self.config_json = read_config(self.folder)
        self.scheme: QuantScheme | None = scheme_for(self.folder, self.config_json)  # before any header or weight
        self.index_metadata: dict[str, Any] = {}
        self.file_metadata: dict[Path, dict[str, str]] = {}  # each file's safetensors __metadata__
        self.tensors = self._read_tables()
        self.logical: dict[str, LogicalTensor] = logical_tensors(self.tensors, self.scheme)
        self._handles: dict[Path, Any] = {}
        self._maps: dict[Path, np.ndarray] = {}

    def _read_tables(self) -> dict[str, TensorInfo]:
        index_path = self.folder / INDEX_FILE
        if index_path.exists():
            index = read_json(index_path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path} has no 'weight_map'; re-download it")
            self.index_metadata = index.get("metadata") or {}
            shards = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE_FILE).exists():
            weight_map, shards = None, [SINGLE_FILE]
        elif (self.folder / CONVERT_PROGRESS_FILE).exists():
            raise CheckpointError(f"{self.folder} is an unfinished `offload convert` output; run the same convert "
                                  "command again to finish it")
        else:
            raise CheckpointError(f"{self.folder} has neither {SINGLE_FILE} nor {INDEX_FILE}; is this a safetensors "
                                  "checkpoint?")
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            path = self.folder / shard
            if not path.exists():
                raise CheckpointError(f"shard {shard} listed in {INDEX_FILE} is missing from {self.folder}; "
                                      "download it")
            shard_tensors, self.file_metadata[path] = read_safetensors_file(path)
            tensors.update(shard_tensors)
        for name, shard in (weight_map or {}).items():
            if name not in tensors or tensors[name].file.name != shard:
                raise CheckpointError(f"{INDEX_FILE} puts tensor {name!r} in {shard}, which does not hold it; "
                                      "re-download the checkpoint")
        return tensors

    def read(self, name: str) -> torch.Tensor:
        """One tensor as stored (memory-mapped until the caller converts or copies it)."""
        return self._handle(name).get_tensor(name)

    def read_expert(self, name: str, e: int) -> torch.Tensor:
        """Expert e of a stored tensor stacked over experts (its first dimension), read alone: one expert's bytes,
        not the whole layer's."""
        return self._handle(name).get_slice(name)[e]

    def _handle(self, name: str):
        info = self.tensors[name]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(str(info.file), framework="pt")
        return handle

    def read_logical(self, name: str) -> torch.Tensor:
        """A logical tensor: float32 when the scheme stores it quantized, else as stored."""
        t = self.logical[name]
        return self.scheme.floats(self.read, t) if t.quantized else self.read(name)

    def pack_exact(self, name: str, out: PackedMatrix, e: int) -> bool:
        """Pack quantized matrix `name` into expert slot e of `out` straight from its integer grid, without
        requantizing; False (slot untouched) where the scheme has no grid or the format cannot hold it."""
        from csrc_py.formats import pack_groups_expert

        t = self.logical[name]
        grid = self.scheme.grid(self.read, t) if t.quantized else None
        return grid is not None and pack_groups_expert(out, e, grid, round_scales=self.scheme.round_scales)

    def stored_nbytes(self, name: str) -> int:
        """Bytes of a logical tensor's stored parts."""
        return sum(self.tensors[part].nbytes for part in self.logical[name].parts)

    def array(self, name: str, dtype: np.dtype, huge_pages: bool = False) -> np.ndarray:
        """One tensor as a numpy array over a copy-on-write memory map of its file: no bytes are read until used,
        and the pages it touches are shared with the page cache (zero-copy loading of packed stores). With
        `huge_pages`, a tensor of at least hugepages.MIN_BYTES is read into anonymous huge pages instead."""
        info = self.tensors[name]
        if huge_pages and info.nbytes >= hugepages.MIN_BYTES:
            out = hugepages.empty(info.shape, dtype)
            if out.nbytes != info.nbytes:
                raise CheckpointError(f"{info.file.name}: tensor {name!r} holds {info.nbytes} bytes, not the "
                                      f"{out.nbytes} of {np.dtype(dtype)}{list(info.shape)}; convert the model again")
            hugepages.read_into(info.file, info.offset, out)
            return out
        whole = self._maps.get(info.file)
        if whole is None:
            with info.file.open("rb") as f:
                whole = self._maps[info.file] = np.frombuffer(
                    mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=np.uint8)
        nbytes = info.nbytes
        return whole[info.offset: info.offset + nbytes].view(dtype).reshape(info.shape)

    def release(self) -> None:
        """Close the open files and memory maps (tensors already handed out stay valid): a streaming reader
        calls it between layers so the pages it has read stop counting towards its resident memory."""
        self._handles.clear()
        self._maps.clear()

    def nbytes(self) -> int:
        """Tensor bytes in the checkpoint files."""
        return sum(info.nbytes for info in self.tensors.values())

"""Writes a safetensors file piece by piece: the header first, from the tensors' names, dtypes and shapes, then
each tensor's bytes at its offset, as jobs produce them.

`offload convert` packs a layer's experts one matrix at a time and copies kept tensors (embeddings, a quantized
checkpoint's FP8 weights) from their source file in chunks, so a shard never exists in memory as a whole: memory
is one matrix, not one layer (a DeepSeek-V3 layer's int8 experts are ~12 GB) and not the mapped source of an
embedding table. The layout is the format's own (8-byte header length, JSON header padded with spaces, the tensors
back to back); tensors are ordered by element size, largest first, as the safetensors library does, so that each
starts aligned to its dtype.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .checkpoint import DTYPE_BYTES

CHUNK = 8 << 20  # bytes copied at a time from a source file


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * DTYPE_BYTES[self.dtype]


class TensorWriter:
    """Where each tensor's bytes go in the open file; jobs call write(name, offset within the tensor, bytes)."""

    def __init__(self, fd: int, starts: dict[str, int], sizes: dict[str, int]):
        self.fd, self.starts, self.sizes = fd, starts, sizes

    def write(self, name: str, offset: int, data: bytes | memoryview) -> None:
        if offset + len(data) > self.sizes[name]:
            raise ValueError(f"{len(data)} bytes at {offset} overflow tensor {name!r} ({self.sizes[name]} bytes)")
        view, position = memoryview(data).cast("B"), self.starts[name] + offset
        while view:
            written = os.pwrite(self.fd, view, position)
            view, position = view[written:], position + written

    def copy(self, name: str, source: Path, source_offset: int) -> None:
        """The whole tensor `name`, copied from `source` at `source_offset` in chunks."""
        with source.open("rb") as f:
            done = 0
            while done < self.sizes[name]:
                chunk = os.pread(f.fileno(), min(CHUNK, self.sizes[name] - done), source_offset + done)
                if not chunk:
                    raise OSError(f"{source} ended while copying tensor {name!r}")
                self.write(name, done, chunk)
                done += len(chunk)


Job = Callable[[TensorWriter], None]


def write_safetensors(path: Path, tensors: list[TensorSpec], jobs: list[Job], metadata: dict[str, str]) -> None:
    """Write `path`: the header for `tensors`, then run each job in order (together they write every byte)."""
    ordered = sorted(tensors, key=lambda t: -DTYPE_BYTES[t.dtype])  # stable: same input, same bytes
    header: dict[str, object] = {"__metadata__": metadata}
    starts, sizes, end = {}, {}, 0
    for t in ordered:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [end, end + t.nbytes]}
        starts[t.name], sizes[t.name] = end, t.nbytes
        end += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    base = 8 + len(text)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(base + end)
        f.flush()
        writer = TensorWriter(f.fileno(), {name: base + start for name, start in starts.items()}, sizes)
        for job in jobs:
            job(writer)
        os.fsync(f.fileno())

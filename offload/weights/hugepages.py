"""Weights in transparent huge pages: host arrays the CPU kernels stream at every decode step, in anonymous memory
the kernel backs with 2 MiB pages.

A decode step streams every active weight once; with 4 KiB pages that is a TLB miss every 4 KiB, and in a virtual
machine each miss walks two page tables. On the 2-core test VM a two-thread read of anonymous 2 MiB pages runs at
~29 GB/s against ~25 GB/s over a store's memory-mapped file pages and ~22 GB/s over 4 KiB anonymous pages
(docs/benchmarks.md, "Weights in huge pages"). So where the kernel offers transparent huge pages (`offered`),
packed matrices are allocated there (`empty`: csrc_py.formats makes every packed array with it), and a store's
packed matrices are read into such memory at load (`read_into`) instead of memory-mapped, where the copies fit in
the memory available (`copies_fit`). The numbers do not change: the same bytes, elsewhere.

OFFLOAD_HUGE_PAGES=0 in the environment keeps the memory maps and ordinary allocations (A/B measurements, or a
machine where the load-time copy does not pay).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
from pathlib import Path

import numpy as np

ENV_SWITCH = "OFFLOAD_HUGE_PAGES"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HUGE_PAGE = 2 << 20  # the x86-64 PMD page: what MADV_HUGEPAGE asks for
MADV_HUGEPAGE = 14
MIN_BYTES = HUGE_PAGE  # smaller arrays stay ordinary allocations: they could not fill one huge page
RESERVE_BYTES = 2 << 30  # left to everything else when the copies are sized against the available memory


def thp_mode(setting: str | None) -> str | None:
    """The active choice in /sys/kernel/mm/transparent_hugepage/enabled ("always [madvise] never" -> "madvise"),
    or None where there is no such file (not Linux, or a kernel without transparent huge pages)."""
    if not setting:
        return None
    for word in setting.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def offered(environ: dict[str, str], mode: str | None) -> bool:
    """Whether weights go to huge pages at all: the kernel offers them (mode "always" or "madvise") and the user
    did not turn it off. Packing at load then allocates there: the memory is allocated either way."""
    return environ.get(ENV_SWITCH, "1") != "0" and mode in ("always", "madvise")


def copies_fit(needed: int, available: int) -> bool:
    """Whether a store's `needed` bytes of packed matrices, read into anonymous memory instead of mapped, leave
    RESERVE_BYTES of the `available` memory. A store larger than that keeps its memory maps, whose pages the kernel
    can drop and read again."""
    return needed + RESERVE_BYTES <= available


@functools.lru_cache(maxsize=1)
def system_mode() -> str | None:
    try:
        return thp_mode(THP_SETTING.read_text())
    except OSError:
        return None


_libc = None


def _madvise(address: int, length: int, advice: int) -> None:
    """madvise(2) as a hint: an error (a kernel that refuses the advice) leaves ordinary pages."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    _libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), ctypes.c_int(advice))


def empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """np.empty(shape, dtype), except that where huge pages are `offered` an array of at least MIN_BYTES lies in
    anonymous memory of its own, starting on a huge-page boundary and advised for huge pages over its whole huge
    pages (the tail past the last one keeps small pages: no memory is wasted). The array keeps its mapping alive."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < MIN_BYTES or not offered(os.environ, system_mode()):
        return np.empty(shape, dtype)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = np.frombuffer(region, np.uint8)
    skip = -raw.ctypes.data % HUGE_PAGE
    _madvise(raw.ctypes.data + skip, nbytes // HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE)
    return raw[skip: skip + nbytes].view(dtype).reshape(shape)


def read_into(path: Path, offset: int, out: np.ndarray) -> None:
    """Fill C-contiguous `out` with the file's bytes from `offset` (no memory map: the pages land in `out` once)."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < len(view):
            n = os.preadv(f.fileno(), [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"{path}: file ended {len(view) - done} bytes early at offset {offset + done}")
            done += n

"""Weights in transparent huge pages: host arrays the CPU kernels stream at every decode step, in anonymous memory
the kernel backs with 2 MiB pages.

Where the kernel offers transparent huge pages (`offered`), every packed matrix of at least one huge page is
allocated in such memory (`empty`: csrc_py.formats makes every packed array with it). It costs nothing (the memory
is allocated either way) and the numbers do not change (the same bytes, elsewhere).

A store's packed matrices are memory-mapped (file pages, read at first use). With OFFLOAD_HUGE_PAGES=1 they are
read into huge pages at load instead (`read_into`), where the copies fit in the memory available (`copies_fit`).
Measured on the 2-core test VM (docs/benchmarks.md, "Weights in huge pages"): decode 1.07-1.14x faster on the
Mixtral 4.7B stores, 1.03-1.42x on an 8-layer Qwen3-30B-A3B-shaped one (the memory map's own speed varied between
runs), and no faster on the full Qwen3-30B-A3B and DeepSeek-V2-Lite shapes (the kernels' software prefetch already
hides the page walks that slow a plain read of 4 KiB pages), while the load reads the whole store first (~1-2 s per
GB from the page cache). Hence opt-in.
OFFLOAD_HUGE_PAGES=0 keeps ordinary allocations too (A/B measurements).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
from pathlib import Path

import numpy as np

from ..errors import OffloadError

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


SETTINGS = ("0", "1")  # OFFLOAD_HUGE_PAGES: unset (the default), 0 (off) or 1 (stores read in too)


def check_setting(environ: dict[str, str]) -> None:
    """A clear error for an OFFLOAD_HUGE_PAGES value other than 0 or 1 (checked at load, before any weight)."""
    value = environ.get(ENV_SWITCH)
    if value is not None and value not in SETTINGS:
        raise OffloadError(f"{ENV_SWITCH}={value!r} is not a setting: use 1 (read stores into huge pages), 0 (no huge "
                           "pages), or leave it unset")


def offered(environ: dict[str, str], mode: str | None) -> bool:
    """Whether packed weights are allocated in huge pages: the kernel offers them (mode "always" or "madvise") and
    the user did not turn them off (OFFLOAD_HUGE_PAGES=0)."""
    return environ.get(ENV_SWITCH, "") != "0" and mode in ("always", "madvise")


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

"""How much a benchmark must read to leave the caches cold: twice the host's last-level cache, at least 256 MiB.

A decode step streams more than any cache holds between one use of a weight and the next, so a kernel's "cold"
time is its time after a read that evicted everything. 256 MiB did that on the 32 MiB L3 of the hosts these tools
were written on; the Intel host of later sessions reports a 480 MiB L3, where a 256 MiB read left a Qwen3 layer's
experts (340 MB at 4 bits) partly cached and the kernels read above the measured DRAM bandwidth
(docs/benchmarks.md, "Cold means past the L3"). The eviction reads (a written buffer leaves dirty lines, whose
write-backs the next read then pays for: the experts' call 8-16% slower after a 1 GiB write than after a 1 GiB read).
That read runs on one thread, so the kernel pool's workers fall asleep during it: `wake_threads` runs an empty
parallel region after it, as a decode step's previous region leaves them awake (waking a sleeping worker costs
these VMs tens of microseconds to a millisecond, tools/bench_latent.py says, which a cold figure should not carry).
"""
from __future__ import annotations

from pathlib import Path

import csrc_py  # noqa: F401  (before numba: the OpenMP environment and torch first)
import numpy as np
from numba import njit, prange

MIN_BYTES = 256 << 20
CACHE_ROOT = Path("/sys/devices/system/cpu/cpu0/cache")
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """sysfs's cache size ("491520K", "32M", "1024") -> bytes."""
    text = text.strip()
    return int(text[:-1]) * UNITS[text[-1]] if text[-1] in UNITS else int(text)


def last_level_cache_bytes(root: Path = CACHE_ROOT) -> int | None:
    """The largest data or unified cache cpu0 reports, or None where sysfs has none (not Linux)."""
    sizes = []
    for index in root.glob("index*"):
        try:
            if (index / "type").read_text().strip() in ("Data", "Unified"):
                sizes.append(parse_size((index / "size").read_text()))
        except (OSError, ValueError, KeyError):
            continue
    return max(sizes, default=None)


def eviction_bytes(llc: int | None = None) -> int:
    """Bytes to read before a cold call: twice the last-level cache, at least MIN_BYTES."""
    llc = last_level_cache_bytes() if llc is None else llc
    return max(MIN_BYTES, 2 * (llc or 0))


def eviction_buffer() -> np.ndarray:
    """A float32 buffer of eviction_bytes(); `.sum()` over it evicts the caches."""
    return np.ones(eviction_bytes() // 4, np.float32)


@njit(parallel=True, nogil=True, cache=True)
def wake_threads(a: np.ndarray) -> None:
    """A trivial parallel loop over a small float32 array: the thread pool's workers running again."""
    for i in prange(a.size):
        a[i] += 1.0


def describe() -> str:
    llc = last_level_cache_bytes()
    known = f"last-level cache {llc / 2**20:.0f} MiB" if llc else "last-level cache unknown"
    return f"{known}; a cold call follows a read of {eviction_bytes(llc) / 2**20:.0f} MiB"

"""How many threads the Numba kernels and torch use, set together so the two pools don't oversubscribe the cores.

Numba's thread count is per calling thread: a worker thread that runs kernels must call `apply()` itself.
"""
from __future__ import annotations

import os

import numba
import numpy as np
import psutil
import torch
from numba import njit, prange

# OpenMP first. Measured on the 2-core development machine (torch imported first): an empty two-thread
# parallel region costs ~4 us under omp and ~80 us under workqueue; a fused MoE layer runs ~5 regions.
# tbb is not a dependency; it stays second so an installed tbb still beats workqueue.
if "NUMBA_THREADING_LAYER" not in os.environ and "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

_threads: int | None = None


def default_threads() -> int:
    """Physical cores: a second hyperthread adds nothing to a bandwidth-bound kernel."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def set_threads(n: int | None = None) -> int:
    """Use `n` threads (default: physical cores) in Numba kernels and torch ops; returns the count applied."""
    global _threads
    _threads = max(1, min(n or default_threads(), numba.config.NUMBA_NUM_THREADS))
    apply()
    torch.set_num_threads(_threads)
    return _threads


def configured() -> int:
    """The configured thread count (set_threads'), or the default."""
    return _threads if _threads is not None else min(default_threads(), numba.config.NUMBA_NUM_THREADS)


def use(n: int) -> None:
    """Run the calling thread's next Numba kernels and torch ops on `n` threads (at most the configured count),
    e.g. one decode step at a measured count (offload.decode_threads); `apply()` returns to the configured count."""
    n = max(1, min(n, configured()))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def apply() -> None:
    """Apply the configured count to the calling thread's Numba kernels (call once in every worker thread)."""
    numba.set_num_threads(configured())


@njit(parallel=True, nogil=True, cache=True)
def _touch(a: np.ndarray) -> None:
    for i in prange(a.size):
        a[i] += 1.0


def threading_layer() -> str:
    """The active Numba threading layer ('omp', 'tbb' or 'workqueue'), starting the pool if none ran yet."""
    _touch(np.zeros(4, np.float32))
    return numba.threading_layer()

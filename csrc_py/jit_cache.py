"""Make Numba's on-disk cache see the whole kernel package.

Numba stamps a cached kernel with the hash of its own source file only, but our kernels compile in code from
other files (the IR in simd.py, the stages of grouped_matmul.py): after editing those, Numba would load stale
machine code. These locators stamp every csrc_py kernel with a hash of all csrc_py sources and the ISA tier the
microkernels compile for (OFFLOAD_CPU_ISA can lower it without changing the CPU Numba keys its cache by), and the
prefetch hint, which follows the host's vendor rather than the JIT target (simd.PREFETCH_LOCALITY). Import
this module before any module that defines a cached kernel: Numba picks the locator when a function is decorated.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from numba.core import caching

from csrc_py.simd import PREFETCH_LOCALITY, TIER

_PACKAGE = Path(__file__).resolve().parent


def _package_hash() -> bytes:
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.digest()


PACKAGE_HASH = _package_hash()  # also keys the measured engine crossovers (csrc_py.crossover)
_STAMP = PACKAGE_HASH + TIER.encode() + bytes([PREFETCH_LOCALITY])


def _in_package(py_file: str) -> bool:
    return Path(py_file).resolve().parent == _PACKAGE


class _InTreeLocator(caching.InTreeCacheLocator):
    """csrc_py/__pycache__, stamped with the package hash."""

    def get_source_stamp(self) -> bytes:
        return _STAMP

    @classmethod
    def from_function(cls, py_func, py_file):
        return super().from_function(py_func, py_file) if _in_package(py_file) else None


class _UserDirLocator(caching.UserProvidedCacheLocator):
    """NUMBA_CACHE_DIR, stamped with the package hash."""

    def get_source_stamp(self) -> bytes:
        return _STAMP

    @classmethod
    def from_function(cls, py_func, py_file):
        return super().from_function(py_func, py_file) if _in_package(py_file) else None


_LOCATORS = getattr(caching, "CacheImpl", None) or caching._CacheImpl  # renamed in Numba 0.61
if _UserDirLocator not in _LOCATORS._locator_classes:
    # NUMBA_CACHE_DIR keeps priority over the in-tree cache, as in Numba's own list.
    _LOCATORS._locator_classes[:0] = [_UserDirLocator, _InTreeLocator]

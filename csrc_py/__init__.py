"""Numba CPU kernels for offload's expert and linear weight formats (see docs/formats.md).

torch is imported before numba on purpose: in the other order Numba's OpenMP threading layer (system libgomp)
and torch's bundled libgomp interfere and every parallel region costs milliseconds.
"""
from offload.openmp_env import set_default_wait_policy

set_default_wait_policy()  # before torch starts libgomp, which reads its environment once
import torch  # noqa: F401,E402  (must precede every numba import)

from csrc_py import jit_cache  # noqa: F401,E402  (before any cached kernel is defined)
from csrc_py import threads  # noqa: F401,E402  (pins the threading layer before any kernel runs)

"""The OpenMP wait policy for torch's and the CPU kernels' thread pools (one libgomp serves both).

libgomp reads its environment once, when torch loads it: this runs before torch is imported (offload and
csrc_py both call it first) and leaves any setting the user made alone. By default a thread that finishes a
parallel region spins ~3 ms for the next one; a decode step is hundreds of short regions, so once another
process shares a core the spinning worker and the waiting caller wait out each other's time slices. Measured on
2 cores (docs/benchmarks.md, "Decode under contention"): with a busy process on one core, decode fell to 12-34% of
quiet with spinning and held 80-99% with passive waits (sleep on a futex at once); on a quiet host passive decodes
15-20% slower than spinning, which a user with cores to spare takes back with OMP_WAIT_POLICY=ACTIVE.
"""
from __future__ import annotations

import os

POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def set_default_wait_policy() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the user chose a policy or a spin count."""
    if not any(name in os.environ for name in POLICY_VARIABLES):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

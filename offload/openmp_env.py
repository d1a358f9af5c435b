"""How the OpenMP threads of torch and the CPU kernels wait between parallel regions.

libgomp reads its environment once, when it is loaded: `set_default_wait_policy` runs before torch is imported
(offload and csrc_py both call it first) and leaves any setting the user made alone. The process may hold two
libgomp runtimes, each with its threads: torch's wheel bundles one (torch 2.13.0+cpu: torch/lib/libgomp.so.1),
and Numba's omp layer asks for the system's by its file name (libgomp.so.1.0.0), which the loader does not take
for torch's copy. Both read the same environment when they load, so the setting reaches both.

A decode step is hundreds of short parallel regions a few microseconds apart, so how a worker waits for the next
one matters:

- libgomp's own default spins ~3 ms (GOMP_SPINCOUNT 300,000). Once another process shares a core, the spinning
  worker and the waiting caller wait out each other's time slices: decode fell to 12-34% of quiet.
- Passive waits (sleep on a futex at once) hold 80-99% of quiet beside a busy core, but every region then starts
  by waking a sleeping thread; on the virtual machines measured that made a quiet decode 15-20% slower.
- A short spin (`SPIN_COUNT`, ~0.1-0.5 ms depending on the CPU's `pause`) spans the gaps inside a step and sleeps
  between steps. Beside a busy core it costs two threads more than passive waits, but a CPU-only run measures its
  decode thread count while generating (offload.decode_threads, the default) and moves to one thread there.
  Measured with that default, against passive waits: 1.11-1.20x quiet and 0.96-1.06x beside a busy core on an
  Intel Xeon, 1.24x / 0.88x on an AMD EPYC (docs/benchmarks.md, "OpenMP waits").

So a machine without a GPU gets the short spin, and one with a GPU keeps passive waits: there the CPU experts run
on worker threads beside the thread driving the GPU, whose load the decode-thread measurement does not cover.

libgomp keeps a team of threads for every thread that has started a parallel region, for as long as that thread
lives, and once its teams' threads outnumber the CPUs it throttles every spin to 100 iterations: each region then
starts by waking a sleeping thread. On the 2-core test VM an empty kernel region took 1.6 us while one thread
started regions and 70-80 us once a second thread that had started the kernels' regions (or torch's: measured,
across the two runtimes) stayed alive; `offload serve`, which loads on one thread and generates on another,
decoded the demo model at 0.26x the Python API's speed. A load runs the kernels and torch (packing, warm-up,
crossovers); so where the short spin applies, `on_a_passing_thread` runs it on a thread that ends with it, and
the thread that generates is the only one left that has started regions.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import TypeVar

T = TypeVar("T")

POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
SPIN_COUNT = 10_000  # libgomp spin iterations (one `pause` each: 11 ns on the Intel host measured, up to ~50)
# Device nodes a GPU driver creates (NVIDIA's, AMD ROCm's): present where offload may run a device tier.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/kfd")


def default_wait_settings(environ: Mapping[str, str], gpu_present: bool) -> dict[str, str]:
    """The OpenMP variables to set (a pure decision): none where the user chose a policy or a spin count, passive
    waits on a machine with a GPU, else a spin of SPIN_COUNT iterations."""
    if any(name in environ for name in POLICY_VARIABLES):
        return {}
    if gpu_present:
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    return {"GOMP_SPINCOUNT": str(SPIN_COUNT)}


def gpu_present() -> bool:
    """Whether a GPU driver's device node exists (checked without importing torch, which would load libgomp)."""
    return any(os.path.exists(node) for node in GPU_DEVICE_NODES)


def set_default_wait_policy() -> None:
    """Put default_wait_settings into the environment, before libgomp is loaded."""
    os.environ.update(default_wait_settings(os.environ, gpu_present()))


def on_a_passing_thread(work: Callable[[threading.Event], T]) -> T:
    """work(cancelled) on a new thread that ends when it returns, so that the OpenMP teams its parallel regions
    started end with it; its result, or its exception, comes back to the caller. Ctrl-C in the caller sets
    `cancelled` and raises KeyboardInterrupt once work has stopped where it checks it: a process that exits while
    the thread is still inside torch or the kernels can abort in their C++ teardown. A second Ctrl-C does not
    wait."""
    cancelled, outcome = threading.Event(), {}

    def run() -> None:
        try:
            outcome["result"] = work(cancelled)
        except BaseException as error:  # noqa: BLE001  (re-raised in the caller)
            outcome["error"] = error

    thread = threading.Thread(target=run, name="offload-load", daemon=True)
    thread.start()
    try:
        thread.join()
    except KeyboardInterrupt:
        cancelled.set()
        thread.join()
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]

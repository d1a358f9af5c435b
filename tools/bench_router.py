"""The router's logits at decode (csrc_py.decode_step.router_logits) on one thread and on two, caches cleared.

    python tools/bench_router.py

For the routers of Mixtral, DeepSeek-V2-Lite, Qwen3-30B-A3B and DeepSeek-V3 (bf16 bits, one token): before every
call a 1 GiB read clears the caches (a decode step streams more than that between one layer's router and the
next token's) and an empty parallel region wakes the threads, as the region before the router does in a step;
calls at one and two threads alternate. Prints the median microseconds and their ratio. A benchmark, not a test.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numba  # noqa: E402  (csrc_py first: it sets the OpenMP environment and imports torch before numba)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cold_caches import wake_threads  # noqa: E402  (tools/, beside this file)
from csrc_py import decode_step as ds  # noqa: E402

ROUTERS = (("Mixtral", 8, 4096), ("DeepSeek-V2-Lite", 64, 2048), ("Qwen3-30B-A3B", 128, 2048),
           ("DeepSeek-V3", 256, 7168))


def main() -> None:
    evict, tiny = np.ones(1 << 28, np.float32), np.zeros(64, np.float32)
    print(f"split from {ds.ROUTER_PARALLEL_MIN} values (ROUTER_PARALLEL_MIN)")
    for label, experts, hidden in ROUTERS:
        router = torch.randn(experts, hidden).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        h = np.random.randn(1, hidden).astype(np.float32)
        logits, bias = np.zeros((1, experts), np.float32), np.zeros(0, np.float32)
        times: dict[int, list[float]] = {1: [], 2: []}
        for threads in times:
            numba.set_num_threads(threads)
            ds.router_logits(h, router, bias, logits)
        for _ in range(40):
            for threads, samples in times.items():
                numba.set_num_threads(threads)
                evict.sum()
                wake_threads(tiny)
                start = time.perf_counter()
                ds.router_logits(h, router, bias, logits)
                samples.append(time.perf_counter() - start)
        one, two = (statistics.median(times[n]) * 1e6 for n in (1, 2))
        print(f"{label} {experts} x {hidden}: one thread {one:.1f} us, two threads {two:.1f} us ({one / two:.2f}x)")


if __name__ == "__main__":
    main()

"""The miss cost model: for an expert that is not resident, compute it on the CPU or copy it into a device slot?
And for a prefill chunk: stream the layer's used experts to the device, or run them on the CPU workers?

Fed by numbers measured at load (CPU expert GB/s and GFLOP/s, copy GB/s, device GFLOP/s); the decision is a
pure function of them, the token count and the expert's sizes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class CostModel:
    cpu_bytes_per_s: float  # CPU workers streaming expert weights (decode)
    cpu_flops: float  # CPU workers at many tokens per expert (prefill)
    copy_bytes_per_s: float  # host storage -> a device slot
    device_flops: float  # device matmul throughput

    def cpu_seconds(self, tokens: int, host_bytes: int, flops_per_token: int) -> float:
        return host_bytes / self.cpu_bytes_per_s + tokens * flops_per_token / self.cpu_flops

    def copy_seconds(self, tokens: int, copy_bytes: int, flops_per_token: int) -> float:
        return copy_bytes / self.copy_bytes_per_s + tokens * flops_per_token / self.device_flops

    def prefer_copy(self, tokens: int, host_bytes: int, copy_bytes: int, flops_per_token: int) -> bool:
        """True when copying the expert to the device (`copy_bytes`: uploads move the packed host bytes) and
        computing it there beats computing it on the CPU."""
        return self.copy_seconds(tokens, copy_bytes, flops_per_token) < self.cpu_seconds(
            tokens, host_bytes, flops_per_token)

    def prefer_stream(self, pairs: int, experts: int, host_bytes: int, flops_per_token: int) -> bool:
        """True when streaming `experts` experts of a layer (their packed host bytes) to the device and running
        their `pairs` (token, expert) pairs there beats running them on the CPU workers."""
        stream = experts * host_bytes / self.copy_bytes_per_s + pairs * flops_per_token / self.device_flops
        cpu = experts * host_bytes / self.cpu_bytes_per_s + pairs * flops_per_token / self.cpu_flops
        return stream < cpu

    def stream_threshold(self, num_experts: int, top_k: int, host_bytes: int, flops_per_token: int,
                         limit: int = 1 << 20) -> int | None:
        """The fewest tokens per prefill chunk (at least 2: a decode step never streams) for which streaming a
        layer pays, taking T tokens' T*K pairs to use min(E, T*K) experts (every one, once a chunk is long);
        None when no chunk of up to `limit` tokens pays. While T*K <= E the costs are proportional to T (one
        answer for all); past it only the pairs grow, so the first paying T is found by bisection."""
        def pays(tokens: int) -> bool:
            pairs = tokens * top_k
            return self.prefer_stream(pairs, min(num_experts, pairs), host_bytes, flops_per_token)

        if pays(2):
            return 2
        lo, hi = max(2, -(-num_experts // top_k)), limit  # the last T of the first region, then bisect
        if pays(lo):
            return lo
        if not pays(hi):
            return None
        while hi - lo > 1:  # pays(hi), not pays(lo)
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if pays(mid) else (mid, hi)
        return hi

    def as_dict(self) -> dict[str, float]:
        return {"cpu_GBps": self.cpu_bytes_per_s / 1e9, "cpu_GFLOPs": self.cpu_flops / 1e9,
                "copy_GBps": self.copy_bytes_per_s / 1e9, "device_GFLOPs": self.device_flops / 1e9}


def best_seconds(run: Callable[[], None], repeats: int = 3, sync: Callable[[], None] | None = None) -> float:
    """The fastest of a few runs after one warm-up: a robust estimate on a noisy machine."""
    run()
    best = float("inf")
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        run()
        if sync:
            sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure_device_flops(device: torch.device, dtype: torch.dtype, hidden: int, intermediate: int,
                         sync: Callable[[], None] | None) -> float:
    x = torch.randn(64, hidden, device=device, dtype=dtype)
    w = torch.randn(intermediate, hidden, device=device, dtype=dtype)
    seconds = best_seconds(lambda: torch.nn.functional.linear(x, w), sync=sync)
    return 2 * 64 * hidden * intermediate / seconds

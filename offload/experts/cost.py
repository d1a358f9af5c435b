"""The miss cost model: for an expert that is not resident, compute it on the CPU or copy it into a device slot?
And for a prefill chunk: stream the layer's used experts to the device, or run them on the CPU workers?

Fed by numbers measured at load (CPU expert GB/s and GFLOP/s, copy GB/s, device GFLOP/s); the decision is a
pure function of them, the token count and the expert's sizes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Collection, Sequence

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


@dataclass(frozen=True)
class PrefetchChoice:
    on: bool
    reason: str  # why, as a phrase for the placement line


def uniform_reuse_rate(top_k: int, num_experts: int) -> float:
    """The hit-rate estimate of decode prefetch before anything is measured: the chance that an expert one step
    used is among the next step's top-k if tokens routed uniformly and independently, K/E. Real routing repeats
    more than that, so this leans towards leaving prefetch off."""
    return min(1.0, top_k / num_experts)


def heat_reuse_rate(heat: Sequence[Sequence[float]], top_k: int, pinned: Sequence[Collection[int]]) -> float:
    """The hit-rate estimate of decode prefetch from a profile's routing heat [MoE layer][expert]: the chance that
    an expert a step ran on the CPU is used again by the next step, if each token picks expert e with probability
    q_e = min(1, K * heat_e / layer heat) independently. The prefetcher predicts the step's non-pinned experts (e
    with chance q_e) and is right for each with chance q_e again, so the rate is sum q_e^2 / sum q_e over every
    layer's non-pinned experts; uniform heat gives K/E. A layer without heat counts as uniform."""
    squares = total = 0.0
    for row, resident in zip(heat, pinned, strict=True):
        layer_heat = sum(row)
        for expert, h in enumerate(row):
            if expert in resident:
                continue
            q = min(1.0, top_k * h / layer_heat) if layer_heat > 0 else min(1.0, top_k / len(row))
            squares, total = squares + q * q, total + q
    return squares / total if total > 0 else 0.0


@dataclass(frozen=True)
class PrefetchPrice:
    """What one prefetch copy costs and what it saves when the next step uses the expert (seconds)."""

    copy_seconds: float  # the packed bytes over the link (and the side stream)
    saved_seconds: float  # one CPU expert computation less the device's

    @property
    def break_even(self) -> float:
        """The hit rate above which prefetch pays: a copy costs less than the CPU time it saves on average."""
        return self.copy_seconds / self.saved_seconds if self.saved_seconds > 0 else float("inf")

    def numbers(self) -> str:
        return f"a copy takes {self.copy_seconds * 1e3:.3g} ms, a hit saves {self.saved_seconds * 1e3:.3g} ms"


def prefetch_price(cost: CostModel, expert_bytes: int, flops_per_token: int) -> PrefetchPrice:
    """One decode token per expert (expert_bytes: one expert as the host holds it, what the CPU reads and a copy
    moves)."""
    cpu_expert = cost.cpu_seconds(1, expert_bytes, flops_per_token) - flops_per_token / cost.device_flops
    return PrefetchPrice(expert_bytes / cost.copy_bytes_per_s, cpu_expert)


def prefetch_pays(price: PrefetchPrice, hit_rate: float, source: str | None = None) -> PrefetchChoice:
    """Decode prefetch copies each expert a step ran on the CPU into a cache slot for the next step. One copy costs
    price.copy_seconds of the link and the side stream (the packed bytes the host holds, dequantized on the
    device); it saves price.saved_seconds (one CPU expert computation less the device's) when the next step uses
    the expert, i.e. hit_rate of the time. Prefetch pays when the saving exceeds the copy. `source` says where the
    hit rate comes from, for the reason."""
    numbers = f"{price.numbers()} at a hit rate of {hit_rate:.2f}" + (f" ({source})" if source else "")
    if hit_rate * price.saved_seconds > price.copy_seconds:
        return PrefetchChoice(True, f"it pays: {numbers}")
    return PrefetchChoice(False, f"it does not pay: {numbers}")


NO_COPIES = "no layer has both CPU experts and cache slots"


def choose_prefetch(asked: bool | None, cost: CostModel | None, copies_possible: bool, expert_bytes: int,
                    flops_per_token: int, hit_rate: float, source: str | None = None) -> PrefetchChoice:
    """Prefetch as asked, or (asked None) where the measured cost model says it pays for one decode token per
    expert (expert_bytes: one expert as the host holds it, what the CPU reads and a copy moves) at the estimated
    `hit_rate`; off where no layer has both CPU experts and cache slots (nothing to copy, or nowhere to copy it)."""
    if asked is not None:
        return PrefetchChoice(asked, "as asked")
    if cost is None or not copies_possible:
        return PrefetchChoice(False, NO_COPIES)
    return prefetch_pays(prefetch_price(cost, expert_bytes, flops_per_token), hit_rate, source)


# Reviewing the choice from the precision measured during the run (offload/experts/prefetch.py PrefetchReview).
REVIEW_MIN_CANDIDATES = 64  # scored copy candidates before a measured precision counts
REVIEW_BAND = 0.25  # hysteresis: off below break-even x (1 - band), on again above break-even x (1 + band)


def review_prefetch(on: bool, precision: float, candidates: int, break_even: float,
                    min_candidates: int = REVIEW_MIN_CANDIDATES, band: float = REVIEW_BAND) -> bool:
    """Prefetch on or off for the next steps, from the precision measured over `candidates` scored predictions
    (experts a step ran on the CPU, and whether the next step used them). Too few candidates keep the current
    state; otherwise a running prefetcher stops once the precision falls below the break-even hit rate by more
    than the band, and a stopped one starts once it rises above it by more than the band, so noise around the
    break-even does not toggle it every step."""
    if candidates < min_candidates:
        return on
    if on:
        return precision >= break_even * (1 - band)
    return precision > break_even * (1 + band)


def prefetch_outlook(copies_possible: bool, expert_bytes: int) -> str:
    """What a plan means for prefetch before a load measures anything (`offload plan`)."""
    if not copies_possible:
        return f"prefetch off: {NO_COPIES}"
    return (f"prefetch decided at load: on where copying an expert ({expert_bytes / 2**20:.2f} MiB) costs "
            "less than the CPU time it saves, from the copy and CPU-expert times measured there, and reviewed "
            "during the run from the prefetcher's measured precision")


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

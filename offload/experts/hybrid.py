"""HybridExperts: one MoE layer's experts split between the device tier (pinned experts and cache slots) and
the CPU workers, behind the experts contract.

A device table maps each expert to its pool row (-1: the CPU's); it changes only between steps. Every call looks
its pairs up in the table on the device, sends the CPU pairs down to the CPU workers in one packed copy (they
start first and run with the GIL released), computes the resident pairs from the pool rows in place, and joins
(`start`, then the returned finish; the MoE block queues its shared expert in between).

A decode step (and any call for which the cost model never prefers a copy) reads nothing back: it records its
expert ids with the step recorder, and at the step boundary (offload/experts/step.py) the layer counts its hits
and misses and the prefetcher admits the step's missed experts into the cache, copied on the side stream before
the next step. A prefill chunk for which copies pay decides per call: the ids come to the host, and each missed
expert is copied into a slot or computed on the CPU by the cost model. A prefill chunk of at least the stream
threshold (the cost model's: streaming the layer's used experts at host-to-device bandwidth beats the CPU
workers) streams every used expert that is not resident through the shared double buffer (offload/experts/
stream.py) and runs it on the device: no CPU part, no cache slot taken, and a layer without cache slots streams
as well as one with them. A chunk long enough that it almost surely uses every expert, in a layer whose last
measured chunk did, streams all the non-resident ones without reading its ids back (they are counted at the step
boundary).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

import torch

from ..timers import Timers
from .cache import ExpertCache
from .base import Finish
from .cost import CostModel
from .device import DeviceExpertPool, ExpertUploader
from .link import HostLink
from .prefetch import Prefetcher
from .step import StepRecorder
from .stream import LayerStream, streams_blind

if TYPE_CHECKING:
    from .cpu import CpuExperts  # imported lazily at run time: it loads Numba


@dataclass
class LayerStats:
    calls: int = 0
    expert_uses: int = 0  # distinct experts needed per call, summed
    pinned_hits: int = 0
    cache_hits: int = 0
    cpu_misses: int = 0  # computed by the CPU workers
    copied_misses: int = 0  # copied into a slot on demand, then computed on the device
    streamed_misses: int = 0  # streamed through the double buffer by a long prefill chunk
    bytes_streamed: int = 0  # their packed bytes

    @property
    def hit_rate(self) -> float:
        return (self.pinned_hits + self.cache_hits) / self.expert_uses if self.expert_uses else 0.0


@dataclass(frozen=True)
class ExpertSizes:
    host_bytes: int  # one expert in the host format: what an upload copies
    device_bytes: int  # one expert in the device dtype
    flops_per_token: int  # 2 * 3 * H * I


DECODE_TOKENS = 1  # a call of this many tokens never reads its ids back, whatever the cost model says


@dataclass
class Streaming:
    """What a layer streams with: the shared double buffer, the layer's uploader into it, the fewest tokens per
    call for which streaming pays (the cost model's stream threshold), and the fewest from which a call streams
    every non-resident expert without reading its ids back (stream.every_expert_tokens; None: never)."""

    buffer: LayerStream
    uploader: ExpertUploader
    min_tokens: int
    blind_tokens: int | None = None


class StreamedCalls:
    """Counts a layer's calls that streamed every non-resident expert without reading their ids back: their ids
    come back at the step boundary with the decode steps' (offload/experts/step.py), and each call's coverage
    (the share of its streamed experts it used) becomes the layer's."""

    def __init__(self, hybrid: "HybridExperts"):
        self.hybrid = hybrid
        self.layer = hybrid.layer
        self.streamed: list[int] = []  # experts each recorded call streamed, in call order

    def record(self, topk_ids: torch.Tensor, streamed: int) -> None:
        self.hybrid.recorder.record(self, topk_ids)
        self.streamed.append(streamed)

    def settle(self, calls: list[list[int]]) -> None:
        for ids, streamed in zip(calls, self.streamed, strict=True):
            used = len(self.hybrid._count_streamed(set(ids)))
            self.hybrid.stream_coverage = used / streamed if streamed else 1.0
        self.streamed = []


class HybridExperts:
    def __init__(self, layer: int, num_experts: int, host_ids: list[int], pool: DeviceExpertPool,
                 cache: ExpertCache, uploader: ExpertUploader, cpu: CpuExperts | None, cost: CostModel | None,
                 sizes: ExpertSizes, timers: Timers, link: HostLink, recorder: StepRecorder):
        self.layer, self.num_experts = layer, num_experts
        self.pool, self.cache, self.uploader, self.cpu = pool, cache, uploader, cpu
        self.cost, self.sizes, self.timers = cost, sizes, timers
        self.link, self.recorder = link, recorder
        self.prefetcher: Prefetcher | None = None  # attached once every layer exists
        self.streaming: Streaming | None = None  # attached with the cost model where a layer can stream
        self.streamed_calls = StreamedCalls(self)
        # The share of the non-resident experts the last measured streamed call used (None: none measured yet).
        self.stream_coverage: float | None = None
        self.stats = LayerStats()
        device = pool.gate.device
        # expert -> pool row (-1: the CPU's) for every resident expert: kept on the host (a numpy view, pinned for
        # a GPU), copied into the device table whenever the residents change.
        host_rows = torch.full((num_experts,), -1, dtype=torch.long, pin_memory=device.type == "cuda")
        self.host_rows, self.host_table = host_rows, host_rows.numpy()
        self.row_table = host_rows if device.type == "cpu" else host_rows.to(device)
        self.pinned_table = np.full(num_experts, -1, dtype=np.int64)  # the rows that never change
        self.pinned_table[list(pool.pinned_row)] = list(pool.pinned_row.values())
        self.residents_changed = False
        self._publish(non_blocking=False)
        # The CPU workers hold only the host experts, renumbered 0..len(host_ids)-1; -1 marks pinned ones.
        self.host_index = torch.full((num_experts,), -1, dtype=torch.long, device=device)
        self.host_index[torch.tensor(host_ids, dtype=torch.long)] = torch.arange(len(host_ids)).to(device)

    # --- what the prefetcher uses -------------------------------------------------------------------------
    @property
    def cache_slots(self) -> int:
        return self.cache.num_slots

    def is_resident(self, expert: int) -> bool:
        return expert in self.pool.pinned_row or expert in self.cache

    def prefetch(self, expert: int, protected: set[int], wait: bool = True) -> bool:
        """Copy `expert` into a slot (evicting one not in `protected`); False when no slot can be had or, with
        wait=False, no staging buffer is free now."""
        if not wait and not self.uploader.ring.ready():
            return False
        slot = self.cache.insert(expert, protected)
        if slot is None:
            return False
        self._copy_in(expert, slot)
        return True

    def _copy_in(self, expert: int, slot: int) -> None:
        try:
            with self.timers.section("copies"):
                self.uploader.copy(expert, self.pool.slot_row(slot))
        except BaseException:  # Ctrl-C mid-copy included: a half-filled slot must not stay mapped
            self.cache.remove(expert)
            self.residents_changed = True
            raise
        self.residents_changed = True

    # --- the experts contract -----------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return self.start(x, topk_ids, topk_weights)()

    def start(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Finish:
        """Submit the CPU pairs, queue the resident pairs on the device, and return the join."""
        if self._streams(x.shape[0]):
            return self._start_streamed(x, topk_ids, topk_weights)
        if self._decides_per_call(x.shape[0]):
            any_on_cpu = self._place_per_call(x, topk_ids)
        else:
            self.recorder.record(self, topk_ids)
            any_on_cpu = self.cpu is not None
        self.uploader.wait()  # rows copied in since the last call: the compute stream waits for them
        pair_rows = self.row_table[topk_ids]  # [T, K] pool row, or -1 for the CPU's pairs
        handle = None
        if any_on_cpu:
            with self.timers.section("cpu_experts"):
                host_ids = torch.where(pair_rows < 0, self.host_index[topk_ids], -1)  # -1: the device's pair
                handle = self.link.submit(self.cpu, x, host_ids, topk_weights)
        with self.timers.section("device_experts"):
            y = self.pool.compute(x, pair_rows, topk_weights) if self.pool.num_rows else torch.zeros_like(x)

        def finish() -> torch.Tensor:
            if handle is not None:
                with self.timers.section("cpu_experts"):
                    self.link.add_result(y, handle)
            return y

        return finish

    # --- decode: decisions at the step boundary -----------------------------------------------------------
    def settle(self, calls: list[list[int]]) -> None:
        """The step is over and its expert ids are on the host: count each call's hits and misses (the table did
        not change during the step), let the prefetcher admit what it predicts, and publish the new residents."""
        s = self.stats
        for ids in calls:
            ranked = [expert for expert, _ in Counter(ids).most_common()]  # most-used first
            s.calls += 1
            s.expert_uses += len(ranked)
            s.cpu_misses += sum(not self._count_hit(expert) for expert in ranked)
            if self.prefetcher is not None:
                self.prefetcher.after_step(self.layer, ranked)
        if self.residents_changed:
            self._publish(non_blocking=True)  # read by the next step's first kernels, long after this copy

    def _count_hit(self, expert: int) -> bool:
        """Count a use of `expert` as a pinned or cache hit; False (nothing counted) when it is on neither."""
        if expert in self.pool.pinned_row:
            self.stats.pinned_hits += 1
        elif self.cache.lookup(expert) is not None:
            self.stats.cache_hits += 1
        else:
            return False
        return True

    # --- prefill: decisions per call ----------------------------------------------------------------------
    def _decides_per_call(self, tokens: int) -> bool:
        """Whether a call reads its ids back to decide copies itself: a chunk of more than a decode step's tokens
        for which the cost model prefers copying an expert used by every token (fewer tokens per expert only
        lower the gain)."""
        if tokens <= DECODE_TOKENS or not self.cache.num_slots or self.cost is None:
            return False
        return self.cost.prefer_copy(tokens, self.sizes.host_bytes, self.sizes.host_bytes,
                                     self.sizes.flops_per_token)

    # --- long prefill chunks: whole-layer streaming -------------------------------------------------------
    def _streams(self, tokens: int) -> bool:
        return (self.streaming is not None and self.cpu is not None and tokens > DECODE_TOKENS
                and tokens >= self.streaming.min_tokens)

    def _start_streamed(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Finish:
        """Compute the resident pairs from the pool and stream the other experts through the double buffer;
        everything runs on the device. A call of at least `blind_tokens`, in a layer whose last measured call used
        nearly every expert it could stream (stream.streams_blind), streams every non-resident expert and reads
        nothing back (its ids are counted at the step boundary), so the host goes on to queue the next layer,
        whose first copies then overlap this layer's compute; otherwise the call reads its ids back, streams only
        the experts it uses and measures the layer's coverage."""
        stream = self.streaming
        non_resident = [expert for expert in range(self.num_experts) if not self.is_resident(expert)]
        if streams_blind(x.shape[0], stream.blind_tokens, self.stream_coverage):
            streamed = non_resident
            self.streamed_calls.record(topk_ids, len(streamed))
        else:
            streamed = self._count_streamed(set(topk_ids.reshape(-1).unique().tolist()))
            self.stream_coverage = len(streamed) / len(non_resident) if non_resident else 1.0
        self.stats.bytes_streamed += len(streamed) * self.sizes.host_bytes
        self.uploader.wait()
        with self.timers.section("device_experts"):
            y = self.pool.compute(x, self.row_table[topk_ids], topk_weights) if self.pool.num_rows \
                else torch.zeros_like(x)
        with self.timers.section("streamed_experts"):
            y += stream.buffer.run(stream.uploader, streamed, self.num_experts, x, topk_ids, topk_weights)
        return lambda: y

    def _count_streamed(self, experts: set[int]) -> list[int]:
        """Count a streamed call that used `experts`; the ones not resident (streamed), in id order."""
        s = self.stats
        s.calls += 1
        s.expert_uses += len(experts)
        streamed = [expert for expert in sorted(experts) if not self._count_hit(expert)]
        s.streamed_misses += len(streamed)
        if self.prefetcher is not None:
            self.prefetcher.observe(self.layer, experts)
        return streamed

    def _place_per_call(self, x: torch.Tensor, topk_ids: torch.Tensor) -> bool:
        """Place this call's experts (host reads allowed): predict the next layers' experts, copy misses that pay
        into slots, and publish the table. True when some pair is left to the CPU workers."""
        if self.prefetcher is not None:
            self.prefetcher.after_attention(self.layer, x)
        experts, counts = topk_ids.reshape(-1).unique(return_counts=True)
        experts, counts = experts.tolist(), counts.tolist()
        used = set(experts)
        if self.prefetcher is not None:
            self.prefetcher.observe(self.layer, used)
        any_on_cpu = self._place(experts, counts, used)
        if self.residents_changed:
            self._publish(non_blocking=False)  # the next call of this layer may change it again at once
        return any_on_cpu

    def _place(self, experts: list[int], counts: list[int], used: set[int]) -> bool:
        """Each needed expert stays resident, is copied into a slot now, or is left to the CPU (True if any)."""
        s = self.stats
        s.calls += 1
        s.expert_uses += len(experts)
        any_on_cpu = False
        for expert, tokens in zip(experts, counts):
            if expert in self.pool.pinned_row:
                s.pinned_hits += 1
            elif self.cache.lookup(expert) is not None:
                s.cache_hits += 1
            elif self.cost.prefer_copy(tokens, self.sizes.host_bytes, self.sizes.host_bytes,
                                       self.sizes.flops_per_token) and self.prefetch(expert, protected=used):
                s.copied_misses += 1
            else:
                s.cpu_misses += 1
                any_on_cpu = True
        return any_on_cpu

    def _publish(self, non_blocking: bool) -> None:
        """Rewrite the table from the pinned experts and the cache's slots, and copy it to the device."""
        table = self.host_table
        table[:] = self.pinned_table
        for expert, slot in self.cache.slot_of.items():
            table[expert] = self.pool.slot_row(slot)
        if self.row_table is not self.host_rows:
            self.row_table.copy_(self.host_rows, non_blocking=non_blocking)
        self.residents_changed = False

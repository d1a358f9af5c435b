"""HybridExperts: one MoE layer's experts split between the device tier (pinned experts and cache slots) and
the CPU workers, behind the experts contract.

Per call: resident experts (pinned, or cached — possibly prefetched) run on the device; for each miss the cost
model picks between computing it on the CPU (few tokens: decode) and copying it into a slot (many tokens:
prefill). The CPU part is submitted first and runs on the CPU workers (GIL released) while the device computes
its part; the two are summed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..timers import Timers
from .cache import ExpertCache
from .cost import CostModel
from .device import DeviceExpertPool, ExpertUploader
from .prefetch import Prefetcher

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

    @property
    def hit_rate(self) -> float:
        return (self.pinned_hits + self.cache_hits) / self.expert_uses if self.expert_uses else 0.0


@dataclass(frozen=True)
class ExpertSizes:
    host_bytes: int  # one expert in the host format
    device_bytes: int  # one expert in the device dtype
    flops_per_token: int  # 2 * 3 * H * I


class HybridExperts:
    def __init__(self, layer: int, num_experts: int, host_ids: list[int], pool: DeviceExpertPool,
                 cache: ExpertCache, uploader: ExpertUploader, cpu: CpuExperts | None, cost: CostModel | None,
                 sizes: ExpertSizes, timers: Timers):
        self.layer, self.num_experts = layer, num_experts
        self.pool, self.cache, self.uploader, self.cpu = pool, cache, uploader, cpu
        self.cost, self.sizes, self.timers = cost, sizes, timers
        self.prefetcher: Prefetcher | None = None  # attached once every layer exists
        self.stats = LayerStats()
        device = pool.gate.device
        # expert -> pool row (-1: the CPU's), filled on the host each call and copied into the device table
        self.host_rows = torch.full((num_experts,), -1, dtype=torch.long)
        self.row_table = self.host_rows if device.type == "cpu" else self.host_rows.to(device)
        # The CPU workers hold only the host experts, renumbered 0..len(host_ids)-1; -1 marks pinned ones.
        self.host_index = torch.full((num_experts,), -1, dtype=torch.long, device=device)
        self.host_index[torch.tensor(host_ids, dtype=torch.long)] = torch.arange(len(host_ids)).to(device)

    # --- what the prefetcher uses -------------------------------------------------------------------------
    @property
    def cache_slots(self) -> int:
        return self.cache.num_slots

    def is_resident(self, expert: int) -> bool:
        return expert in self.pool.pinned_row or expert in self.cache

    def prefetch(self, expert: int, protected: set[int]) -> bool:
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
            raise

    # --- the experts contract -----------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        if self.prefetcher is not None:
            self.prefetcher.after_attention(self.layer, x)
        experts, counts = topk_ids.reshape(-1).unique(return_counts=True)
        experts, counts = experts.tolist(), counts.tolist()
        used = set(experts)
        if self.prefetcher is not None:
            self.prefetcher.observe(self.layer, used)

        rows, on_cpu = self._place(experts, counts, used)
        host_rows = self.host_rows.numpy()
        host_rows[:] = -1
        host_rows[list(rows)] = list(rows.values())
        if self.row_table is not self.host_rows:
            self.row_table.copy_(self.host_rows)
        pair_rows = self.row_table[topk_ids]  # [T, K] pool row, or -1 for the CPU's pairs

        handle = None
        if on_cpu:
            with self.timers.section("cpu_experts"):
                cpu_ids = torch.where(pair_rows < 0, self.host_index[topk_ids], -1).cpu()  # -1: the device's pair
                handle = self.cpu.submit(x.cpu(), cpu_ids, topk_weights.cpu())
        with self.timers.section("device_experts"):
            y = self.pool.compute(x, pair_rows, topk_weights) if rows else torch.zeros_like(x)
        if handle is not None:
            with self.timers.section("cpu_experts"):
                y += self.cpu.wait(handle).to(device=y.device, dtype=y.dtype)
        return y

    def _place(self, experts: list[int], counts: list[int], used: set[int]) -> tuple[dict[int, int], list[int]]:
        """Each needed expert -> a pool row (resident, or copied in now) or the CPU list."""
        s = self.stats
        s.calls += 1
        s.expert_uses += len(experts)
        rows: dict[int, int] = {}
        on_cpu: list[int] = []
        for expert, tokens in zip(experts, counts):
            row = self.pool.pinned_row.get(expert)
            if row is not None:
                s.pinned_hits += 1
                rows[expert] = row
                continue
            slot = self.cache.lookup(expert)
            if slot is not None:
                s.cache_hits += 1
            elif self.cache.num_slots and self.cost.prefer_copy(tokens, self.sizes.host_bytes,
                                                                self.sizes.device_bytes, self.sizes.flops_per_token):
                slot = self.cache.insert(expert, protected=used)
                if slot is not None:
                    s.copied_misses += 1
                    self._copy_in(expert, slot)
            if slot is None:
                s.cpu_misses += 1
                on_cpu.append(expert)
                continue
            rows[expert] = self.pool.slot_row(slot)
            self.uploader.wait(rows[expert])
        return rows, on_cpu

"""Builds each MoE layer's experts backend from the load options and the plan, and wires the prefetcher.

    no plan, no expert format  -> ReferenceExperts: every expert in torch on the device tier
    no plan, expert format     -> CpuExperts: every routed expert on the CPU workers (device="cpu")
    a plan                     -> HybridExperts: pinned + cached experts on the device (in the device dtype or the
                                  plan's slot format), the rest on the CPU

Placement never changes the numbers: unless the user asks for a host format, the host tier holds experts in the
device tier's dtype (`default_host_format`), so a float32 model's offloaded experts stay float32 (in torch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..config import ModelConfig
from ..errors import OffloadError
from ..placement.planner import Plan
from ..timers import Timers
from .base import ExpertWeights, Experts, PackedExperts
from .cache import ExpertCache, make_policy
from .cost import (CostModel, PrefetchChoice, best_seconds, choose_prefetch, heat_reuse_rate, measure_device_flops,
                   prefetch_price, uniform_reuse_rate)
from .device import ExpertPool, ExpertUploader, StagingRing
from .hybrid import ExpertSizes, HybridExperts, Streaming
from .quant_pool import NIBBLE_FORMATS, make_pool
from .link import HostLink
from .prefetch import Prefetcher, PrefetchReview
from .reference import ReferenceExperts
from .step import StepRecorder
from .stream import LayerStream, every_expert_tokens
from .torch_host import FLOAT_FORMATS, TorchHostExperts

if TYPE_CHECKING:
    from .cpu import CpuExperts


PREFILL_CHUNK = 512  # tokens per prefill forward by default
MAX_PREFILL_CHUNK = 4096  # the default chunk is raised to the stream threshold up to this many tokens


@dataclass(frozen=True)
class ExpertsOptions:
    host_format: str | None = None  # "bf16" | "int8" | "int4" | "float32" | "float16"; None: the device tier's
    plan: Plan | None = None
    cache_policy: str = "lru"
    prefetch: bool | None = None  # None: where the measured cost model says it pays (cost.choose_prefetch)
    heat: list[list[float]] | None = None  # a profile's routing heat [MoE layer][expert]: prefetch's first estimate


class ExpertsBuilder:
    """The experts factory handed to the Transformer: (layer, weights) -> backend."""

    def __init__(self, cfg: ModelConfig, options: ExpertsOptions, device: torch.device, dtype: torch.dtype,
                 timers: Timers):
        self.cfg, self.options, self.device, self.dtype, self.timers = cfg, options, device, dtype, timers
        self.hybrids: dict[int, HybridExperts] = {}
        self.cost: CostModel | None = None
        self.prefetcher: Prefetcher | None = None
        self.prefetch_choice: PrefetchChoice | None = None  # made with the prefetcher; None without a hybrid layer
        self.prefetch_review: PrefetchReview | None = None  # where prefetch is decided automatically
        self.recorder = StepRecorder()  # every hybrid layer's decode-step ids, read back at the step boundary
        self.ring: StagingRing | None = None  # made with the first layer that has host experts: one for all layers
        self.link = HostLink(cfg.hidden_size, device)  # the CPU workers' traffic, one pair of buffers for all layers
        # The double buffer of whole-layer streaming: the rows the plan reserves, made once every layer is built if
        # the cost model says streaming pays.
        self.stream_buffer: LayerStream | None = None
        make_policy(options.cache_policy)  # fail on a bad policy name before any weight is read
        H, I = cfg.hidden_size, cfg.moe_intermediate_size
        self.flops_per_token = 2 * 3 * H * I

    def __call__(self, layer: int, weights: ExpertWeights | PackedExperts) -> Experts:
        opts = self.options
        if opts.plan is None and opts.host_format is None:
            return ReferenceExperts(_floats(weights))
        if opts.plan is None:
            from .cpu import CpuExperts  # here, so the reference path never loads Numba

            if isinstance(weights, PackedExperts):
                return CpuExperts.from_packed(weights.gate, weights.up, weights.down, weights.biases,
                                              weights.activation)
            return CpuExperts(weights, opts.host_format)
        lp = opts.plan.layer(layer)
        host_ids = [e for e in range(weights.num_experts) if e not in set(lp.pinned)]
        cpu = _host_experts(weights, host_ids, opts.host_format or opts.plan.expert_format) if host_ids else None
        pool = make_pool(opts.plan.slot_format, lp.pinned, lp.cache_slots, self.cfg.hidden_size,
                         self.cfg.moe_intermediate_size, self.dtype, self.device, weights.biases is not None,
                         weights.activation)
        if lp.pinned:
            self._fill_pinned(pool, weights, lp.pinned, opts.host_format or opts.plan.expert_format)
        local = {expert: i for i, expert in enumerate(host_ids)}.__getitem__
        if self.ring is None and cpu is not None:
            self.ring = StagingRing(cpu.packed_expert(0), self.device)
        uploader = ExpertUploader(pool, cpu, local, self.device, self.ring)
        sizes = ExpertSizes(cpu.expert_nbytes if cpu else 0, opts.plan.expert_device_bytes, self.flops_per_token)
        if self.cost is None and cpu is not None:
            # Measured once, on the first layer with host experts: slots or none, a layer may copy or stream them.
            self.cost = self._measure_costs(cpu, host_ids, pool, sizes)
        cache = ExpertCache(lp.cache_slots, sizes.host_bytes, make_policy(opts.cache_policy))
        hybrid = HybridExperts(layer, weights.num_experts, host_ids, pool, cache, uploader, cpu, self.cost, sizes,
                               self.timers, self.link, self.recorder)
        self.hybrids[layer] = hybrid
        return hybrid

    def _fill_pinned(self, pool: ExpertPool, weights: ExpertWeights | PackedExperts, pinned: tuple[int, ...],
                     host_format: str) -> None:
        """Row i holds expert pinned[i]: where the rows keep the host format's int4 / int4s values (slots of that
        format), packed as the host packs them and laid out as an upload lands, so an expert has the same values on
        either tier; else from its float weights."""
        if getattr(pool, "fmt", None) != host_format or host_format not in NIBBLE_FORMATS:
            pool.fill(0, _floats(_select(weights, pinned)))
            return
        host = _host_experts(weights, list(pinned), host_format)
        for row in range(len(pinned)):
            pool.land(row, host, [t.to(self.device) for t in host.packed_expert(row)])

    def settle(self) -> None:
        """The step boundary: the last step's expert ids come back once, every hybrid layer acts on them, and an
        automatic prefetch choice is reviewed from the precision measured so far."""
        self.recorder.settle()
        if self.prefetch_review is not None:
            self.prefetch_choice = self.prefetch_review.review()

    def attach_prefetcher(self, routers: dict[int, Callable]) -> None:
        """Once every layer is built: give every hybrid layer the cost model measured on one of them, and a
        prefetcher over the next layer's router. Decided automatically, the prefetcher starts on or off by the
        hit rate estimated from the profile's heat (else uniform routing) and is reviewed at step boundaries;
        while off it only measures."""
        for hybrid in self.hybrids.values():
            hybrid.cost = self.cost
        self._attach_streaming()
        if not self.hybrids:
            return
        layers = sorted(self.hybrids)
        copies_possible = any(h.cpu is not None and h.cache_slots for h in self.hybrids.values())
        hit_rate, source = self._estimated_hit_rate(layers)
        asked, host_bytes = self.options.prefetch, self.options.plan.expert_host_bytes
        self.prefetch_choice = choose_prefetch(asked, self.cost, copies_possible, host_bytes, self.flops_per_token,
                                               hit_rate, source)
        reviewed = asked is None and copies_possible and self.cost is not None
        if not (self.prefetch_choice.on or reviewed):
            return
        expert_bytes = next(h.sizes.host_bytes for h in self.hybrids.values())  # what a prefetch copies
        self.prefetcher = Prefetcher(layers, routers, dict(self.hybrids), expert_bytes)
        for hybrid in self.hybrids.values():
            hybrid.prefetcher = self.prefetcher
        if reviewed:
            price = prefetch_price(self.cost, host_bytes, self.flops_per_token)
            self.prefetch_review = PrefetchReview(self.prefetcher, self.prefetch_choice, price)

    def _estimated_hit_rate(self, layers: list[int]) -> tuple[float, str]:
        """Decode prefetch's hit rate before one is measured, and where it comes from."""
        router, heat = self.cfg.router, self.options.heat
        if heat is None:
            return uniform_reuse_rate(router.top_k, router.num_experts), "uniform routing"
        pinned = [set(self.options.plan.layer(layer).pinned) for layer in layers]
        return heat_reuse_rate(heat, router.top_k, pinned), "the profile's heat"

    @property
    def stream_threshold(self) -> int | None:
        """The fewest tokens per prefill call for which a layer streams its experts (None: never)."""
        hybrid = next((h for h in self.hybrids.values() if h.cpu is not None), None)
        if self.cost is None or hybrid is None:
            return None
        return self.cost.stream_threshold(hybrid.num_experts, self.cfg.router.top_k, hybrid.sizes.host_bytes,
                                          self.flops_per_token)

    def prefill_chunk(self, setting: int | None) -> int:
        """Tokens per prefill forward: the setting, or PREFILL_CHUNK raised to the stream threshold where that
        stays within MAX_PREFILL_CHUNK (a chunk shorter than the threshold would never stream)."""
        if setting is not None:
            check_prefill_chunk(setting)
            return setting
        threshold = self.stream_threshold
        return max(PREFILL_CHUNK, threshold) if threshold is not None and threshold <= MAX_PREFILL_CHUNK \
            else PREFILL_CHUNK

    def _attach_streaming(self) -> None:
        """Give every layer with host experts the shared double buffer, once the cost model says streaming pays
        for some chunk size, with the rows the plan reserves in the device budget, in the plan's format for them
        (the slots'; a plan without them, made before the planner counted the buffer, streams nothing). Cache slots
        are not needed: a plan that leaves every expert on the host streams as well."""
        threshold = self.stream_threshold
        rows = self.options.plan.stream_buffer_experts if self.options.plan is not None else 0
        if threshold is None or rows < 2:
            return
        hosted = [h for h in self.hybrids.values() if h.cpu is not None]
        like = hosted[0].pool  # the layers' activation and biases
        buffer = LayerStream(make_pool(self.options.plan.stream_buffer_format, (), rows, self.cfg.hidden_size,
                                       self.cfg.moe_intermediate_size, self.dtype, self.device,
                                       like.biases is not None, like.activation))
        self.stream_buffer = buffer
        # Streaming blind saves the ids' readback; rows computed with a host read per batch (quantized rows, or a
        # GPU without the in-place grouped kernel) would still read back, and copy unused experts besides.
        blind = every_expert_tokens(self.cfg.router.top_k, hosted[0].num_experts) if buffer.pool.in_place else None
        for hybrid in hosted:
            uploader = ExpertUploader(buffer.pool, hybrid.cpu, hybrid.uploader.local, self.device, self.ring)
            hybrid.streaming = Streaming(buffer, uploader, threshold, blind)

    def _measure_costs(self, cpu: CpuExperts | TorchHostExperts, host_ids: list[int], pool: ExpertPool,
                       sizes: ExpertSizes) -> CostModel:
        """Time the CPU workers at one and at 64 tokens, one expert copy and a device matmul, once per load. The
        copy lands in a one-row scratch pool of the slots' format (the stream buffer's too) with the layer's
        (`pool`) biases and activation, so a plan without cache slots is priced the same way as one with them."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else None
        H, K = self.cfg.hidden_size, self.cfg.router.top_k
        device_flops = measure_device_flops(self.device, self.dtype, H, self.cfg.moe_intermediate_size, sync)
        experts = min(K, cpu.num_experts)
        ids = torch.arange(experts).reshape(1, experts)
        one = best_seconds(lambda: cpu(torch.randn(1, H), ids, torch.ones(1, experts)))
        many_ids = torch.arange(64 * experts).remainder(cpu.num_experts).reshape(64, experts)
        many = best_seconds(lambda: cpu(torch.randn(64, H), many_ids, torch.ones(64, experts)))
        scratch = make_pool(self.options.plan.slot_format, (), 1, H, self.cfg.moe_intermediate_size, self.dtype,
                            self.device, pool.biases is not None, pool.activation)
        uploader = ExpertUploader(scratch, cpu, {host_ids[0]: 0}.__getitem__, self.device, self.ring)
        copy = best_seconds(lambda: uploader.copy(host_ids[0], 0), sync=sync)
        self.ring.bytes_copied = 0  # the timing copies are no traffic of the model's
        return CostModel(cpu_bytes_per_s=experts * sizes.host_bytes / one,
                         cpu_flops=64 * experts * self.flops_per_token / many,
                         copy_bytes_per_s=sizes.host_bytes / copy,
                         device_flops=device_flops)


def check_prefill_chunk(setting: int | None) -> None:
    if setting is not None and setting < 1:
        raise OffloadError(f"prefill_chunk must be at least 1 token, got {setting}; give a positive chunk size or "
                           "leave it unset")


def default_host_format(dtype: torch.dtype) -> str:
    """The host format that keeps experts as the device tier does: the CPU workers' bf16 for a bf16 model, the
    model's float dtype otherwise (computed in torch on the CPU)."""
    if dtype == torch.bfloat16:
        return "bf16"
    return next(name for name, float_dtype in FLOAT_FORMATS.items() if float_dtype == dtype)


def _select(weights: ExpertWeights | PackedExperts, ids: list[int]) -> ExpertWeights | PackedExperts:
    """Experts `ids` of a layer, in that order."""
    if isinstance(weights, PackedExperts):
        return weights.select(ids)
    index = torch.tensor(ids)
    biases = weights.biases.select(ids) if weights.biases is not None else None
    return ExpertWeights(weights.gate[index], weights.up[index], weights.down[index], biases, weights.activation)


def _host_experts(weights: ExpertWeights | PackedExperts, ids: list[int], fmt: str
                  ) -> CpuExperts | TorchHostExperts:
    """Experts `ids` on the host: a store's packed experts as they are, float weights packed as `fmt` for the CPU
    workers, or kept as float32 / float16 in torch."""
    selected = _select(weights, ids)
    if fmt in FLOAT_FORMATS:
        return TorchHostExperts(_floats(selected), fmt)
    from .cpu import CpuExperts

    if isinstance(selected, PackedExperts):
        return CpuExperts.from_packed(selected.gate, selected.up, selected.down, selected.biases,
                                      selected.activation)
    return CpuExperts(selected, fmt)


def _floats(weights: ExpertWeights | PackedExperts) -> ExpertWeights:
    return weights.dequantized() if isinstance(weights, PackedExperts) else weights

"""Model.stats(): the runtime's counters gathered into one plain dict (JSON-ready)."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from .experts.builder import ExpertsBuilder
from .experts.cache import CacheStats
from .experts.hybrid import LayerStats
from .experts.prefetch import PrefetchStats
from .generate import Generation, PromptCacheStats
from .timers import Timers


def runtime_stats(experts: ExpertsBuilder, timers: Timers, last: Generation | None, load_info,
                  prompt_cache: PromptCacheStats) -> dict[str, Any]:
    layers = []
    prefetch = experts.prefetcher.stats if experts.prefetcher else {}
    for layer, hybrid in sorted(experts.hybrids.items()):
        s, c = hybrid.stats, hybrid.cache.stats
        p = prefetch.get(layer)
        layers.append({
            "layer": layer,
            "expert_uses": s.expert_uses,
            "hits": s.pinned_hits + s.cache_hits,
            "misses": s.cpu_misses + s.copied_misses + s.streamed_misses,
            "hit_rate": round(s.hit_rate, 4),
            "pinned_hits": s.pinned_hits,
            "cache_hits": s.cache_hits,
            "cpu_misses": s.cpu_misses,
            "copied_misses": s.copied_misses,
            "streamed_misses": s.streamed_misses,
            "bytes_streamed": s.bytes_streamed,
            "evictions": c.evictions,
            "bytes_copied": c.bytes_copied,
            "prefetch_copies": p.copies if p else 0,
            "prefetch_precision": round(p.precision, 4) if p else None,
            "prefetch_recall": round(p.recall, 4) if p else None,
            "prefetch_wasted_bytes": p.wasted_bytes if p else 0,
        })
    uses = sum(l["expert_uses"] for l in layers)
    predicted = sum(p.predicted for p in prefetch.values())
    needed = sum(p.needed for p in prefetch.values())
    useful = sum(p.useful for p in prefetch.values())
    totals = {
        "expert_uses": uses,
        "hit_rate": round(sum(l["hits"] for l in layers) / uses, 4) if uses else None,
        "bytes_copied": sum(l["bytes_copied"] for l in layers),
        "bytes_streamed": sum(l["bytes_streamed"] for l in layers),
        "prefetch_precision": round(useful / predicted, 4) if predicted else None,
        "prefetch_recall": round(useful / needed, 4) if needed else None,
    }
    return {
        "layers": layers,
        "totals": totals,
        "prompt_cache": prompt_cache.as_dict(),
        "seconds": {name: round(v, 6) for name, v in sorted(timers.seconds.items())},
        "last_generation": last.stats.as_dict() if last else None,
        "cost_model": experts.cost.as_dict() if experts.cost else None,
        "load": asdict(load_info),
    }


def reset_runtime_stats(experts: ExpertsBuilder, timers: Timers) -> None:
    experts.settle()  # a step before the reset counts before it
    timers.reset()
    for hybrid in experts.hybrids.values():
        hybrid.stats = LayerStats()
        hybrid.cache.stats = CacheStats()
    if experts.prefetcher:
        experts.prefetcher.stats = {layer: PrefetchStats() for layer in experts.prefetcher.stats}

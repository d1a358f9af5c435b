"""ExpertCache: a fixed pool of device slots holding copies of one MoE layer's experts, with a pluggable
eviction policy. Slots are allocated once; the cache maps expert ids to slot indices and counts everything."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Collection, Protocol

from ..errors import OffloadError


class EvictionPolicy(Protocol):
    def touch(self, expert: int) -> None: ...  # the expert was used or inserted
    def forget(self, expert: int) -> None: ...  # the expert left the cache
    def victim(self, candidates: Collection[int]) -> int: ...  # which resident expert to evict


class LRUPolicy:
    """Evict the least recently used expert."""

    def __init__(self) -> None:
        self.order: OrderedDict[int, None] = OrderedDict()

    def touch(self, expert: int) -> None:
        self.order[expert] = None
        self.order.move_to_end(expert)

    def forget(self, expert: int) -> None:
        self.order.pop(expert, None)

    def victim(self, candidates: Collection[int]) -> int:
        return next(e for e in self.order if e in candidates)


class LFUDecayPolicy:
    """Evict the expert with the lowest use count, where older uses count less: each use adds 1 and every
    score halves every `half_life` uses of the layer. Frequent experts survive bursts of one-off ones."""

    def __init__(self, half_life: float = 32.0) -> None:
        self.decay = 0.5 ** (1.0 / half_life)
        self.now = 0
        self.score: dict[int, tuple[float, int]] = {}  # expert -> (score at time t, t)

    def _current(self, expert: int) -> float:
        score, at = self.score.get(expert, (0.0, self.now))
        return score * self.decay ** (self.now - at)

    def touch(self, expert: int) -> None:
        self.now += 1
        self.score[expert] = (self._current(expert) + 1.0, self.now)

    def forget(self, expert: int) -> None:
        self.score.pop(expert, None)

    def victim(self, candidates: Collection[int]) -> int:
        return min(candidates, key=lambda e: (self._current(e), e))


POLICIES = {"lru": LRUPolicy, "lfu": LFUDecayPolicy}


def make_policy(name: str) -> EvictionPolicy:
    if name not in POLICIES:
        raise OffloadError(f"cache_policy must be one of {', '.join(POLICIES)}, got {name!r}")
    return POLICIES[name]()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    insertions: int = 0
    evictions: int = 0
    bytes_copied: int = 0


class ExpertCache:
    """Which expert sits in which of `num_slots` slots. The caller copies weights into the slot `insert` returns."""

    def __init__(self, num_slots: int, expert_bytes: int, policy: EvictionPolicy):
        self.num_slots = num_slots
        self.expert_bytes = expert_bytes
        self.policy = policy
        self.slot_of: dict[int, int] = {}  # expert -> slot
        self.free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self.stats = CacheStats()

    def __contains__(self, expert: int) -> bool:
        return expert in self.slot_of

    def lookup(self, expert: int) -> int | None:
        """The expert's slot (a hit), or None (a miss)."""
        slot = self.slot_of.get(expert)
        if slot is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
            self.policy.touch(expert)
        return slot

    def remove(self, expert: int) -> None:
        """Free the expert's slot (a copy into it failed or was interrupted: it must never serve a hit)."""
        slot = self.slot_of.pop(expert, None)
        if slot is not None:
            self.free.append(slot)
            self.policy.forget(expert)

    def insert(self, expert: int, protected: Collection[int] = ()) -> int | None:
        """A slot for `expert`, evicting a resident expert not in `protected` if the pool is full.
        None when every resident expert is protected (or there are no slots): the caller computes elsewhere."""
        if expert in self.slot_of:
            return self.slot_of[expert]
        if not self.free:
            candidates = [e for e in self.slot_of if e not in protected]
            if not candidates:
                return None
            evicted = self.policy.victim(candidates)
            self.free.append(self.slot_of.pop(evicted))
            self.policy.forget(evicted)
            self.stats.evictions += 1
        slot = self.free.pop()
        self.slot_of[expert] = slot
        self.policy.touch(expert)
        self.stats.insertions += 1
        self.stats.bytes_copied += self.expert_bytes
        return slot

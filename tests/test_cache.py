"""ExpertCache and Prefetcher accounting on hand-built routing sequences with known answers."""
from __future__ import annotations

import pytest
import torch

from offload.experts.cache import ExpertCache, LFUDecayPolicy, LRUPolicy
from offload.experts.hybrid import HybridExperts
from offload.experts.prefetch import Prefetcher
from offload.timers import Timers


def run(cache: ExpertCache, sequence: list[int]) -> list[int | None]:
    """Look each expert up; insert on a miss. Returns the slot after each access."""
    slots = []
    for expert in sequence:
        slot = cache.lookup(expert)
        if slot is None:
            slot = cache.insert(expert)
        slots.append(slot)
    return slots


def test_lru_evicts_the_least_recently_used():
    cache = ExpertCache(2, expert_bytes=10, policy=LRUPolicy())
    run(cache, [1, 2, 1, 3])  # 3 evicts 2 (1 was used more recently)
    assert 1 in cache and 3 in cache and 2 not in cache
    run(cache, [2])  # 2 evicts 1
    assert set(cache.slot_of) == {2, 3}
    s = cache.stats
    assert (s.hits, s.misses, s.insertions, s.evictions, s.bytes_copied) == (1, 4, 4, 2, 40)


def test_lfu_keeps_the_frequent_expert_through_a_burst():
    cache = ExpertCache(2, expert_bytes=1, policy=LFUDecayPolicy(half_life=100))
    run(cache, [7, 7, 7, 7])
    run(cache, [1, 2, 3, 4, 5])  # one-off experts churn through the other slot
    assert 7 in cache
    lru = ExpertCache(2, expert_bytes=1, policy=LRUPolicy())
    run(lru, [7, 7, 7, 7, 1, 2, 3, 4, 5])
    assert 7 not in lru


def test_lfu_forgets_old_popularity():
    cache = ExpertCache(1, expert_bytes=1, policy=LFUDecayPolicy(half_life=1))
    run(cache, [7, 7, 7])
    policy = cache.policy
    for _ in range(20):
        policy.touch(99)  # time passes on other experts
    assert policy._current(7) < 1e-3


def test_protected_experts_are_never_evicted():
    cache = ExpertCache(2, expert_bytes=1, policy=LRUPolicy())
    run(cache, [1, 2])
    assert cache.insert(3, protected={1, 2}) is None
    assert cache.insert(3, protected={1}) == cache.slot_of[3]
    assert 2 not in cache


def test_slots_are_reused_not_grown():
    cache = ExpertCache(3, expert_bytes=1, policy=LRUPolicy())
    slots = run(cache, list(range(20)))
    assert set(slots) == {0, 1, 2}
    assert len(cache.slot_of) == 3


class FakeLayer:
    """A prefetch target with a real cache; copies are recorded instead of moving weights."""

    def __init__(self, slots: int):
        self.cache = ExpertCache(slots, expert_bytes=100, policy=LRUPolicy())
        self.copies: list[int] = []
        self.staging_free = True  # False: a copy that may not wait finds no staging buffer

    @property
    def cache_slots(self) -> int:
        return self.cache.num_slots

    def is_resident(self, expert: int) -> bool:
        return expert in self.cache

    def prefetch(self, expert: int, protected: set[int], wait: bool = True) -> bool:
        if not (wait or self.staging_free) or self.cache.insert(expert, protected) is None:
            return False
        self.copies.append(expert)
        return True


def fixed_router(ids: list[list[int]]):
    table = torch.tensor(ids)
    return lambda h: (table[: h.shape[0]], torch.ones(h.shape[0], table.shape[1]))


def test_prefetch_precision_recall_and_waste():
    layers = [0, 1, 2]
    targets = {l: FakeLayer(slots=4) for l in layers}
    routers = {1: fixed_router([[3, 4]]), 2: fixed_router([[5, 6], [5, 7]])}
    pre = Prefetcher(layers, routers, targets, expert_bytes=100)
    h = torch.zeros(1, 8)
    pre.after_attention(0, h)  # predicts {3, 4} for layer 1
    assert targets[1].copies == [3, 4]
    pre.observe(1, {3, 9})  # used 3 (useful) and 9 (not predicted); 4 was a wasted copy
    s = pre.stats[1]
    assert (s.predicted, s.useful, s.needed, s.copies, s.wasted_copies, s.wasted_bytes) == (2, 1, 2, 2, 1, 100)
    assert s.precision == 0.5 and s.recall == 0.5

    pre.after_attention(1, torch.zeros(2, 8))  # two tokens: predicts {5, 6, 7} for layer 2, 5 ranked first
    assert targets[2].copies[0] == 5 and set(targets[2].copies) == {5, 6, 7}
    pre.observe(2, {5, 6, 7})
    assert pre.stats[2].precision == 1.0 and pre.stats[2].recall == 1.0
    pre.observe(0, {1})  # layer 0 had no prediction: nothing is scored
    assert pre.stats[0].needed == 0


def test_prefetch_skips_resident_and_respects_slot_count():
    layers = [0, 1]
    target = FakeLayer(slots=2)
    target.cache.insert(4)
    pre = Prefetcher(layers, {1: fixed_router([[4, 5, 6, 7]])}, {0: FakeLayer(1), 1: target}, expert_bytes=1)
    pre.after_attention(0, torch.zeros(1, 8))
    assert target.copies == [5]  # 4 already resident; two slots' worth of predictions considered


def test_step_boundary_prefetch_predicts_that_the_step_repeats_and_scores_it():
    target = FakeLayer(slots=2)
    pre = Prefetcher([0], {}, {0: target}, expert_bytes=10)
    pre.after_step(0, [3, 4, 5])  # most-used first: two slots' worth copied
    assert target.copies == [3, 4]
    pre.after_step(0, [3, 6])  # predicted {3, 4, 5}: 3 was useful, 4 a wasted copy; 6 evicts 4 (3 is protected)
    s = pre.stats[0]
    assert (s.predicted, s.useful, s.needed, s.copies, s.wasted_copies, s.wasted_bytes) == (3, 1, 2, 3, 1, 10)
    assert target.copies == [3, 4, 6] and set(target.cache.slot_of) == {3, 6}
    target.staging_free = False  # the boundary never waits for a staging buffer: the copy is left for later
    pre.after_step(0, [7])
    assert target.copies == [3, 4, 6] and pre.stats[0].copies == 3


def test_an_interrupted_copy_never_leaves_a_mapped_slot():
    """Ctrl-C during a copy into a slot: the expert is unmapped, so it can never be served half-copied."""
    cache = ExpertCache(2, expert_bytes=1, policy=LRUPolicy())

    class FailingUploader:
        def copy(self, expert, row):
            raise KeyboardInterrupt

    hybrid = HybridExperts.__new__(HybridExperts)
    hybrid.cache, hybrid.uploader = cache, FailingUploader()
    hybrid.pool = type("Pool", (), {"slot_row": staticmethod(lambda slot: slot)})()
    hybrid.timers = Timers()
    with pytest.raises(KeyboardInterrupt):
        hybrid.prefetch(5, protected={5})
    assert 5 not in cache and len(cache.free) == 2
    assert cache.lookup(5) is None

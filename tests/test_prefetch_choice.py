"""Prefetch on by default only where the measured cost model says it pays (offload/experts/cost.py): the pure
decision, its cases at real shapes, and the load that uses it; the hit rate estimated from a profile's heat; the
review at step boundaries from the precision the prefetcher measures (on or off, with hysteresis)."""
from __future__ import annotations

import json

import pytest

import offload
from offload.chat import placement_summary
from offload.experts.builder import ExpertsBuilder
from offload.experts.cost import (CostModel, PrefetchChoice, PrefetchPrice, choose_prefetch, heat_reuse_rate,
                                  prefetch_outlook, prefetch_pays, review_prefetch, uniform_reuse_rate)
from offload.experts.prefetch import CopyCandidates, Prefetcher, PrefetchReview
from test_hybrid import GPU_LIKE_COSTS, plan

MB = 10**6


def test_prefetch_pays_when_the_cpu_time_a_copy_saves_exceeds_the_copy():
    on = prefetch_pays(PrefetchPrice(copy_seconds=25 * MB / 25e9, saved_seconds=0.004), hit_rate=0.5)
    assert on.on and on.reason == "it pays: a copy takes 1 ms, a hit saves 4 ms at a hit rate of 0.50"
    one_ms_copy = PrefetchPrice(25 * MB / 25e9, 0.004)
    assert not prefetch_pays(one_ms_copy, hit_rate=0.2).on  # saves 0.8 ms per copy of 1 ms
    assert not prefetch_pays(one_ms_copy, hit_rate=0.25).on  # even: the copy is not worth its risk
    assert not prefetch_pays(PrefetchPrice(250 * MB / 25e9, 0.004), hit_rate=1.0).on  # a 10 ms copy for a 4 ms expert


def test_uniform_reuse_rate_is_top_k_over_experts():
    assert uniform_reuse_rate(2, 8) == 0.25 and uniform_reuse_rate(8, 256) == 8 / 256
    assert uniform_reuse_rate(4, 2) == 1.0


# One expert's weights (gate, up, down); a copy moves them packed, as the host holds them.
DEEPSEEK_V3 = 3 * 7168 * 2048
MIXTRAL = 3 * 4096 * 14336


@pytest.mark.parametrize("params, top_k, experts, host_bytes_per_weight, cpu_GBps, copy_GBps, expected", [
    (DEEPSEEK_V3, 8, 256, 0.625, 40, 25, False),  # a 1.1 ms copy against a 0.7 ms CPU expert used 3% of the time
    (MIXTRAL, 2, 8, 0.625, 40, 25, False),  # a 4.4 ms copy against a 2.8 ms CPU expert used a quarter of the time
    (MIXTRAL, 2, 8, 2, 5, 25, True),  # bf16 on a slow CPU: a 14 ms copy against 70 ms per expert
])
def test_choose_prefetch_at_real_shapes_on_a_gpu_like_host(params, top_k, experts, host_bytes_per_weight, cpu_GBps,
                                                           copy_GBps, expected):
    cost = CostModel(cpu_bytes_per_s=cpu_GBps * 1e9, cpu_flops=200e9, copy_bytes_per_s=copy_GBps * 1e9,
                     device_flops=400e12)
    choice = choose_prefetch(None, cost, True, int(params * host_bytes_per_weight), 2 * params,
                             uniform_reuse_rate(top_k, experts))
    assert choice.on == expected
    assert choice.reason.startswith("it pays" if expected else "it does not pay")


def test_asking_wins_and_no_copy_candidates_means_off():
    cheap = CostModel(cpu_bytes_per_s=1e9, cpu_flops=1e9, copy_bytes_per_s=1e12, device_flops=1e15)
    assert choose_prefetch(False, cheap, True, MB, 1000, 1.0).reason == "as asked"
    assert not choose_prefetch(False, cheap, True, MB, 1000, 1.0).on
    assert choose_prefetch(True, None, False, MB, 1000, 0.0).on
    for cost, copies_possible in ((None, True), (cheap, False)):  # nothing measured; measured, but no slots
        no_copies = choose_prefetch(None, cost, copies_possible, MB, 1000, 1.0)
        assert not no_copies.on and no_copies.reason == "no layer has both CPU experts and cache slots"
    assert choose_prefetch(None, cheap, True, MB, 1000, 1.0, "the profile's heat").reason.endswith(
        "at a hit rate of 1.00 (the profile's heat)")
    assert prefetch_outlook(False, 2**20) == "prefetch off: no layer has both CPU experts and cache slots"
    assert prefetch_outlook(True, 3 * 2**20).startswith("prefetch decided at load: on where copying an expert "
                                                        "(3.00 MiB) costs less")


SLOW_CPU = CostModel(cpu_bytes_per_s=0.05e9, cpu_flops=1e9, copy_bytes_per_s=25e9, device_flops=400e12)


@pytest.mark.parametrize("costs, asked, on", [(GPU_LIKE_COSTS, None, False), (SLOW_CPU, None, True),
                                              (GPU_LIKE_COSTS, True, True), (SLOW_CPU, False, False)])
def test_load_runs_the_prefetcher_only_where_the_measured_costs_say_so(bf16_checkpoints, monkeypatch, costs, asked,
                                                                        on):
    """The tiny mixtral (top-2 of 4 experts: hit-rate estimate 0.5) with one slot per layer and CPU experts."""
    folder = bf16_checkpoints("mixtral")
    monkeypatch.setattr(ExpertsBuilder, "_measure_costs", lambda *args: costs)
    model = offload.load(folder, device="cpu", max_context=64, plan=plan(folder, 3, 1), prefetch=asked)
    prefetcher = model._experts.prefetcher
    assert model.prefetch.on == on and (prefetcher is not None) == (asked is not False)
    assert prefetcher is None or prefetcher.active == on  # an automatic one measures while it is off
    reason = "as asked" if asked is not None else "it pays" if on else "it does not pay"
    assert f"; prefetch {'on' if on else 'off'}: {reason}" in placement_summary(model)
    model.generate([3, 4, 5, 6], max_new_tokens=4, ignore_eos=True)
    stats = model.stats()
    assert (stats["totals"]["prefetch_precision"] is not None) == (asked is not False)
    copies = sum(layer["prefetch_copies"] for layer in stats["layers"])
    assert on or copies == 0  # none while it is off (too few steps to review the choice)


@pytest.mark.parametrize("on, precision, candidates, break_even, expected", [
    (False, 0.9, 10, 0.3, False),  # too few candidates scored: the state stands
    (True, 0.0, 10, 0.3, True),
    (False, 0.9, 64, 0.3, True),  # well above break-even: on
    (True, 0.1, 64, 0.3, False),  # well below: off
    (True, 0.25, 64, 0.3, True),  # below break-even but within the band: a running prefetcher keeps going
    (False, 0.35, 64, 0.3, False),  # above break-even but within the band: a stopped one stays stopped
    (True, 0.224, 64, 0.3, False),  # just past the band, either way
    (False, 0.376, 64, 0.3, True),
    (False, 1.0, 1000, 1.5, False),  # a copy dearer than a whole CPU expert never pays
    (True, 1.0, 1000, float("inf"), False),
])
def test_review_prefetch_turns_it_on_and_off_with_hysteresis(on, precision, candidates, break_even, expected):
    assert review_prefetch(on, precision, candidates, break_even) == expected


@pytest.mark.parametrize("heat, top_k, pinned, expected", [
    ([[1, 1, 1, 1]], 2, [set()], 0.5),  # uniform: K/E
    ([[5, 5, 5, 5, 5, 5, 5, 5]] * 3, 2, [set()] * 3, 0.25),
    ([[9, 1, 0, 0]], 1, [set()], (0.81 + 0.01) / 1.0),  # skewed routing repeats more
    ([[9, 1, 0, 0]], 1, [{0}], 0.1),  # the hot expert pinned: only the cold one is ever copied
    ([[0, 0, 0, 0], [4, 4, 0, 0]], 2, [set(), set()], (4 * 0.25 + 2 * 1.0) / (4 * 0.5 + 2 * 1.0)),  # no heat: uniform
    ([[3, 1]], 2, [{0, 1}], 0.0),  # nothing left to copy
])
def test_heat_reuse_rate(heat, top_k, pinned, expected):
    assert heat_reuse_rate(heat, top_k, pinned) == pytest.approx(expected)


class FakeLayer:
    """A prefetch target with `slots` slots that keeps every expert copied into it (never evicts)."""

    def __init__(self, slots: int):
        self.resident: set[int] = set()
        self.copies: list[int] = []
        self.slots = slots

    def is_resident(self, expert: int) -> bool:
        return expert in self.resident

    def prefetch(self, expert: int, protected: set[int], wait: bool = True) -> bool:
        self.copies.append(expert)
        self.resident.add(expert)
        return True

    @property
    def cache_slots(self) -> int:
        return self.slots


def test_an_inactive_prefetcher_scores_its_candidates_without_copying():
    layer = FakeLayer(slots=2)
    prefetcher = Prefetcher([0], {}, {0: layer}, expert_bytes=100)
    prefetcher.active = False
    for ranked in ([1, 2, 3], [2, 5], [5, 6]):
        prefetcher.after_step(0, ranked)
    assert layer.copies == []
    # candidates {1, 2} (two slots) then {2, 5}: 1 of 2 used by the next step, then 1 of 2
    assert prefetcher.outcomes == CopyCandidates(scored=4, used=2)
    prefetcher.active = True
    prefetcher.after_step(0, [6, 7])  # scores {5, 6} (1 used), copies 6 and 7
    assert layer.copies == [6, 7] and prefetcher.outcomes == CopyCandidates(scored=6, used=3)
    prefetcher.after_step(0, [6, 7, 8])  # 6, 7 resident now: the candidate is 8 alone
    assert prefetcher.candidates[0] == {8} and layer.copies == [6, 7, 8]


def test_the_review_follows_the_measured_precision_at_step_boundaries():
    price = PrefetchPrice(copy_seconds=0.001, saved_seconds=0.004)  # break-even 0.25
    layer = FakeLayer(slots=1)
    layer.prefetch = lambda expert, protected, wait=True: layer.copies.append(expert) or True  # copies, keeps none
    prefetcher = Prefetcher([0], {}, {0: layer}, expert_bytes=100)
    review = PrefetchReview(prefetcher, PrefetchChoice(False, "it does not pay: estimated"), price, min_candidates=4)
    assert not prefetcher.active

    def steps(experts: list[int]) -> PrefetchChoice:
        for expert in experts:
            prefetcher.after_step(0, [expert])
            choice = review.review()
        return choice

    assert not steps([1, 2]).on  # one candidate scored: no review yet
    choice = steps([2, 2, 2])  # the same expert again and again: precision 3/4 over 4
    assert choice.on and prefetcher.active and layer.copies == []  # copies start with the next step
    assert choice.reason == ("measured precision 0.75 over 4 predictions against a break-even of 0.25 (a copy "
                             "takes 1 ms, a hit saves 4 ms)")
    assert steps([3, 4, 5, 6]).on is False and len(layer.copies) == 4  # a new expert every step: precision 0
    assert not prefetcher.active and not steps([7, 7]).on and len(layer.copies) == 4


def write_profile(path, heat):
    path.write_text(json.dumps({"heat": heat}))
    return path


def test_a_profiles_heat_sets_the_first_estimate_and_the_run_reviews_it(bf16_checkpoints, monkeypatch, tmp_path):
    folder = bf16_checkpoints("mixtral")  # 3 MoE layers, top-2 of 6 experts, one slot per layer
    placement = plan(folder, 3, 1)
    # A copy costs half a CPU expert: uniform routing (1/3) says off, a heat on two unpinned experts says on.
    cost = CostModel(cpu_bytes_per_s=1e9, cpu_flops=1e18, copy_bytes_per_s=2e9, device_flops=1e18)
    monkeypatch.setattr(ExpertsBuilder, "_measure_costs", lambda *args: cost)
    uniform = offload.load(folder, device="cpu", max_context=64, plan=placement)
    assert not uniform.prefetch.on and uniform.prefetch.reason.endswith("at a hit rate of 0.33 (uniform routing)")
    heat = [[0] * 6 for _ in placement.layers]
    for row, layer in zip(heat, placement.layers):
        cold = [e for e in range(6) if e not in layer.pinned]
        row[cold[0]] = row[cold[1]] = 10
    model = offload.load(folder, device="cpu", max_context=64, plan=placement,
                         profile=write_profile(tmp_path / "profile.json", heat))
    assert model.prefetch.on and model.prefetch.reason.endswith("at a hit rate of 1.00 (the profile's heat)")
    assert "; prefetch on: it pays" in placement_summary(model)
    review = model._experts.prefetch_review
    review.min_candidates = 2
    model.generate([3, 4, 5, 6], max_new_tokens=6, ignore_eos=True)
    model.stats()  # the last step's boundary
    scored = model._experts.prefetcher.outcomes
    assert scored.scored >= 2 and model.prefetch.reason.startswith("measured precision ")
    assert model.prefetch is review.choice and model._experts.prefetcher.active == model.prefetch.on
    state = "on" if model.prefetch.on else "off"
    assert f"; prefetch {state}: measured precision" in placement_summary(model)


def test_a_profile_that_does_not_fit_the_model_is_refused_before_loading(bf16_checkpoints, tmp_path):
    folder = bf16_checkpoints("mixtral")
    with pytest.raises(offload.OffloadError, match="the heat is 1 MoE layers x 6 experts but the plan has 3"):
        offload.load(folder, device="cpu", max_context=64, plan=plan(folder, 3, 1),
                     profile=write_profile(tmp_path / "profile.json", [[1] * 6]))
    with pytest.raises(offload.OffloadError, match="is not a profile"):
        offload.load(folder, device="cpu", max_context=64, plan=plan(folder, 3, 1),
                     profile=write_profile(tmp_path / "other.json", [])  .with_name("other.json").write_text("{}")
                     and tmp_path / "other.json")

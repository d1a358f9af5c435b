"""Prefetch on by default only where the measured cost model says it pays (offload/experts/cost.py): the pure
decision, its cases at real shapes, and the load that uses it."""
from __future__ import annotations

import pytest

import offload
from offload.chat import placement_summary
from offload.experts.builder import ExpertsBuilder
from offload.experts.cost import CostModel, choose_prefetch, prefetch_outlook, prefetch_pays, uniform_reuse_rate
from test_hybrid import GPU_LIKE_COSTS, plan

MB = 10**6


def test_prefetch_pays_when_the_cpu_time_a_copy_saves_exceeds_the_copy():
    on = prefetch_pays(copy_bytes_per_s=25e9, cpu_expert_seconds=0.004, copied_bytes=25 * MB, hit_rate=0.5)
    assert on.on and on.reason == "it pays: a copy takes 1 ms, a hit saves 4 ms at a hit rate of 0.50"
    assert not prefetch_pays(25e9, 0.004, 25 * MB, hit_rate=0.2).on  # saves 0.8 ms per copy of 1 ms
    assert not prefetch_pays(25e9, 0.004, 25 * MB, hit_rate=0.25).on  # even: the copy is not worth its risk
    assert not prefetch_pays(25e9, 0.004, 250 * MB, hit_rate=1.0).on  # a 10 ms copy for a 4 ms expert


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

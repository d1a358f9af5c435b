"""Engine crossovers (csrc_py/crossover.py, csrc_py/dispatch.py): the pure decisions on fake timings, the on-disk
cache (round trip, a corrupt file, a changed host key), and dispatch picking its engine by them without changing
the numbers."""
from __future__ import annotations

import json
import math

import pytest
import torch

from csrc_py import crossover, dispatch, formats, oracles
from csrc_py.crossover import CrossoverCache, Crossovers, EngineClass, Timings, derive, torch_wins
from offload.errors import OffloadError

KEY = {"cpu": "test CPU", "tier": "portable", "torch": "2.13", "kernels": "abc", "torch_bf16": "native",
       "threads": "numba 2, torch 2"}
MOE = ("moe", "bf16", "f32", 2048, 768)  # Crossovers.get arguments: class moe/bf16/f32/1024x1024


def linear_timings(rows, fused, torch_fixed, torch_per_row) -> Timings:
    """A GEMV-like fused kernel (time per row) against torch with a fixed cost plus a smaller time per row."""
    return Timings(tuple(rows), tuple(fused * r for r in rows), tuple(torch_fixed + torch_per_row * r for r in rows))


def test_derive_interpolates_the_crossing():
    # fused r ms, torch 3 + 0.25 r ms: equal at r = 4, so torch wins from 4 rows (measured at 1, 2, 8, 16)
    assert derive(linear_timings((1, 2, 8, 16), 1.0, 3.0, 0.25)) == 4
    assert derive(linear_timings((1, 4, 16, 64), 1.0, 3.5, 0.25)) == 5  # equal at 4.67
    assert derive(linear_timings((1, 4, 16, 64), 1.0, 12.0, 0.5)) == 24  # equal at 24
    assert derive(linear_timings((1, 2, 4), 1.0, 0.1, 0.5)) == 1  # torch faster from the first count on


def test_derive_never_when_torch_loses_at_the_last_count():
    # the int8 kernel against dequantize + torch: torch's fixed cost and its slope are both worse
    assert derive(linear_timings((1, 4, 16, 64), 0.1, 3.0, 0.2)) is None
    # torch closing in (equal at 80 rows), but not measured to win: nothing is extrapolated
    assert derive(linear_timings((1, 4, 16, 64), 1.0, 40.0, 0.5)) is None
    assert derive(Timings((1,), (1.0,), (2.0,))) is None
    assert derive(Timings((), (), ())) is None


def test_derive_ignores_a_win_that_does_not_last():
    # torch ahead at 2 and 4 rows, behind again from 8 on: noise, no crossover
    assert derive(Timings((1, 2, 4, 8, 16), (1, 2, 4, 8, 16), (1.5, 1.9, 3.9, 9, 20))) is None
    # ahead at 4, behind at 16 (a preempted call), ahead at 64: the crossover lies past the loss
    assert derive(Timings((1, 4, 16, 64), (1, 4, 16, 64), (3, 3, 20, 30))) == 22


def test_torch_wins_counts_rows_per_used_expert():
    assert torch_wins(40 * 8, 8, 4) and not torch_wins(3 * 8, 8, 4)
    assert torch_wins(4, 1, 4) and not torch_wins(3, 1, 4)
    assert not torch_wins(0, 8, 1) and not torch_wins(1000, 8, None)
    assert torch_wins(8, 128, 1) and not torch_wins(8, 128, 2)  # a decode token: 1 row per expert


def test_engine_classes_round_shapes_to_powers_of_two():
    assert crossover.engine_class("moe", "int8", "f32", 512, 200).label == "moe/int8/f32/512x256"
    assert crossover.engine_class("linear", "int4", "bf16", 151936, 2048).dims == (1024, 1024)
    assert crossover.engine_class("linear", "int4", "bf16", 5, 40).dims == (64, 64)
    assert crossover.side_class(700) == 512 and crossover.side_class(800) == 1024


def test_time_engines_warms_up_untimed_and_stops_at_the_budget():
    now = [0.0]
    calls: list[tuple[str, int]] = []

    def engine(name: str, per_row: float):
        def run(rows: int) -> None:
            calls.append((name, rows))
            now[0] += 100.0 if len(calls) <= 2 else per_row * rows  # the first calls compile: slow
        return run

    evictions = []
    t = crossover.time_engines(engine("fused", 1.0), engine("torch", 0.5), rows=(1, 2, 4, 8, 16), budget_s=10.0,
                               repeats=2, clock=lambda: now[0], before=lambda: evictions.append(len(calls)))
    assert calls[:2] == [("fused", 1), ("torch", 1)]
    assert t.rows == (1, 2, 4)  # 1 + 0.5 + 2 + 1 ... = 21 s of timed calls passes 10 s after 4 rows
    assert t.fused == (1.0, 2.0, 4.0) and t.torch == (0.5, 1.0, 2.0)
    assert calls[2:6] == [("fused", 1), ("torch", 1), ("fused", 1), ("torch", 1)]  # interleaved
    assert evictions == list(range(2, len(calls)))  # before every timed call, not the warm-up


class FakeMeasure:
    """Timings per engine class label; counts the measurements."""

    def __init__(self, timings: Timings | Exception) -> None:
        self.timings, self.calls = timings, []

    def __call__(self, cls: EngineClass) -> Timings:
        self.calls.append(cls.label)
        if isinstance(self.timings, Exception):
            raise self.timings
        return self.timings


BF16_LIKE = linear_timings((1, 2, 4, 8), 1.0, 3.5, 0.25)  # crossover 5


def _fixed(fmt: str) -> int | None:
    return {"bf16": 4, "int8": None, "int4": None}[fmt]


def test_measured_crossovers_round_trip_through_the_cache(tmp_path):
    path = tmp_path / "crossovers.json"
    measure = FakeMeasure(BF16_LIKE)
    first = Crossovers(measure, _fixed, CrossoverCache(path, KEY))
    assert first.get(*MOE) == 5 and first.get(*MOE) == 5
    assert first.get("moe", "bf16", "f32", 2000, 1000) == 5  # same class: not measured again
    assert measure.calls == ["moe/bf16/f32/1024x1024"]
    assert first.choices == {"moe/bf16/f32/1024x1024": (5, "measured")}
    never = FakeMeasure(linear_timings((1, 2, 4), 0.1, 3.0, 0.2))
    assert Crossovers(never, _fixed, CrossoverCache(path, KEY)).get("linear", "int8", "bf16", 4096, 4096) is None

    again = FakeMeasure(RuntimeError("must not measure"))
    second = Crossovers(again, _fixed, CrossoverCache(path, KEY))
    assert second.get(*MOE) == 5 and second.get("linear", "int8", "bf16", 4096, 4096) is None
    assert again.calls == [] and second.choices["moe/bf16/f32/1024x1024"] == (5, "cached")
    stored = json.loads(path.read_text())
    assert stored["hosts"][json.dumps(KEY, sort_keys=True)]["crossovers"] == {
        "moe/bf16/f32/1024x1024": 5, "linear/int8/bf16/1024x1024": None}


def test_a_corrupt_cache_warns_once_measures_again_and_is_rewritten(tmp_path):
    path = tmp_path / "crossovers.json"
    path.write_text('{"version": 1, "hosts": {"x": ')
    measure = FakeMeasure(BF16_LIKE)
    crossovers = Crossovers(measure, _fixed, CrossoverCache(path, KEY))
    with pytest.warns(RuntimeWarning, match="crossover cache .* is unreadable .*measuring again") as caught:
        assert crossovers.get(*MOE) == 5
    assert len(caught) == 1 and measure.calls == ["moe/bf16/f32/1024x1024"]
    assert Crossovers(FakeMeasure(RuntimeError()), _fixed, CrossoverCache(path, KEY)).get(*MOE) == 5
    for wrong in ("[1, 2]", '{"version": 1, "hosts": {"k": {"crossovers": 3}}}', "\x00\xff"):
        path.write_text(wrong)
        with pytest.warns(RuntimeWarning, match="unreadable"):
            assert Crossovers(FakeMeasure(BF16_LIKE), _fixed, CrossoverCache(path, KEY)).get(*MOE) == 5


def test_a_changed_host_key_measures_again(tmp_path):
    path = tmp_path / "crossovers.json"
    Crossovers(FakeMeasure(BF16_LIKE), _fixed, CrossoverCache(path, KEY)).get(*MOE)
    for field, value in (("torch", "2.14"), ("tier", "avx2"), ("cpu", "other CPU"), ("threads", "numba 1, torch 1")):
        measure = FakeMeasure(linear_timings((1, 2, 4, 8), 1.0, 0.1, 0.5))
        assert Crossovers(measure, _fixed, CrossoverCache(path, {**KEY, field: value})).get(*MOE) == 1
        assert measure.calls == ["moe/bf16/f32/1024x1024"]
    hosts = json.loads(path.read_text())["hosts"]
    assert len(hosts) == 5  # every key keeps its own entries (tiers and thread counts alternate in one tree)
    # new kernel sources drop the entries measured with the old ones when the file is next written
    Crossovers(FakeMeasure(BF16_LIKE), _fixed, CrossoverCache(path, {**KEY, "kernels": "def"})).get(*MOE)
    assert [h["key"]["kernels"] for h in json.loads(path.read_text())["hosts"].values()] == ["def"]


def test_fixed_mode_and_failed_measurements_use_the_fixed_thresholds(tmp_path):
    measure = FakeMeasure(BF16_LIKE)
    fixed = Crossovers(measure, _fixed, CrossoverCache(tmp_path / "c.json", KEY), mode="fixed")
    assert fixed.get(*MOE) == 4 and fixed.get("moe", "int8", "f32", 2048, 768) is None
    assert measure.calls == [] and not (tmp_path / "c.json").exists()
    failing = Crossovers(FakeMeasure(MemoryError("no room")), _fixed, CrossoverCache(tmp_path / "c.json", KEY))
    with pytest.warns(RuntimeWarning, match="measuring the moe/bf16/f32/1024x1024 engine crossover failed"):
        assert failing.get(*MOE) == 4
    assert failing.choices["moe/bf16/f32/1024x1024"] == (4, "fixed (measuring failed)")
    assert not (tmp_path / "c.json").exists()  # a failure is not cached: the next process measures again
    with pytest.raises(OffloadError, match="OFFLOAD_CROSSOVERS='sometimes' is not a crossover mode"):
        Crossovers(measure, _fixed, None, mode="sometimes")


def test_an_unwritable_cache_is_a_warning(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    crossovers = Crossovers(FakeMeasure(BF16_LIKE), _fixed, CrossoverCache(blocker / "crossovers.json", KEY))
    with pytest.warns(RuntimeWarning, match="cannot write the crossover cache"):
        assert crossovers.get(*MOE) == 5


def test_the_cache_sits_next_to_numbas(monkeypatch, tmp_path):
    monkeypatch.setattr(crossover.numba.config, "CACHE_DIR", str(tmp_path))
    assert crossover.cache_path() == tmp_path / crossover.CACHE_NAME
    monkeypatch.setattr(crossover.numba.config, "CACHE_DIR", "")
    assert crossover.cache_path().parent.name == "__pycache__"
    key = crossover.host_key(True)
    assert set(key) == set(KEY) and key["torch"] == torch.__version__


@pytest.fixture
def injected():
    """dispatch with a Crossovers of fake timings; restored afterwards."""
    def use(timings: Timings) -> Crossovers:
        c = Crossovers(FakeMeasure(timings), _fixed, None)
        dispatch.set_crossovers(c)
        return c
    yield use
    dispatch.set_crossovers(None)


def _spy(monkeypatch, name: str) -> list[int]:
    """Count the calls of dispatch.<name> (an engine) and still run it."""
    calls: list[int] = []
    real = getattr(dispatch, name)

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(dispatch, name, counted)
    return calls


TORCH_FROM_ONE = linear_timings((1, 2, 4), 1.0, 0.5, 0.25)  # torch faster at every row count
NEVER = linear_timings((1, 2, 4), 0.1, 3.0, 0.2)


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_dispatch_follows_the_crossovers_and_keeps_the_numbers(injected, monkeypatch, fmt):
    gen = torch.Generator().manual_seed(0)
    E, H, I, T, K = 4, 64, 96, 6, 2
    mats = [torch.randn(E, o, k, generator=gen) / k ** 0.5 for o, k in ((I, H), (I, H), (H, I))]
    packed = [formats.pack(m, fmt) for m in mats]
    x = torch.randn(T, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=gen)
    ref = oracles.moe(x, ids, w, *mats)
    moe_calls, linear_calls = _spy(monkeypatch, "moe_torch"), _spy(monkeypatch, "_linear_torch")
    dense = formats.pack(mats[0][:1], fmt)
    results, linears = {}, {}
    for name, timings in (("torch", TORCH_FROM_ONE), ("fused", NEVER)):
        crossovers = injected(timings)
        moe_calls.clear()
        linear_calls.clear()
        results[name] = dispatch.moe(x, ids, w, *packed)
        linears[name] = dispatch.linear(x, dense)
        assert len(moe_calls) == len(linear_calls) == (name == "torch")
        assert sorted(crossovers.choices) == [f"linear/{fmt}/bf16/128x64", f"moe/{fmt}/f32/64x128"]
    error = 0.03 if fmt == "int8" else 0.012
    for y in results.values():
        assert float((y - ref).norm() / ref.norm()) < error
    ref_linear = x @ mats[0][0].T
    for y in linears.values():  # torch's path multiplies in bf16
        assert float((y - ref_linear).norm() / ref_linear.norm()) < error + 0.01


def test_the_real_measurement_runs_on_a_small_class():
    timings = dispatch.measure_engines(EngineClass("moe", "bf16", "f32", (64, 64)))
    assert timings.rows[0] == 1 and list(timings.rows) == sorted(timings.rows)
    assert all(s > 0 and math.isfinite(s) for s in (*timings.fused, *timings.torch))
    crossing = derive(timings)
    assert crossing is None or 1 <= crossing <= timings.rows[-1]
    linear = dispatch.measure_engines(EngineClass("linear", "int4", "bf16", (64, 128)))
    assert len(linear.rows) == len(linear.fused) == len(linear.torch) >= 1


def test_load_resolves_the_models_crossovers_before_its_first_reply(checkpoint_dir, monkeypatch):
    """The once-per-host measurement of a model's engine classes happens in `load`, not mid-generation."""
    import offload

    measure = FakeMeasure(NEVER)
    crossovers = Crossovers(measure, _fixed, None)
    monkeypatch.setattr(dispatch, "crossovers", lambda: crossovers)
    folder, _ = checkpoint_dir("qwen3_moe")
    model = offload.load(folder, device="cpu", experts="int8", dense="int8")
    at_load = list(measure.calls)
    assert any(label.startswith("moe/int8/f32/") for label in at_load)
    assert any(label.startswith("linear/int8/bf16/") for label in at_load)
    model.generate([1, 2, 3, 4, 5], max_new_tokens=4)  # a prefill and decode steps
    assert measure.calls == at_load

"""The CPU decode step's thread count, measured while generating (offload/decode_threads.py): the decisions as
tables, the tuner against simulated hosts whose fastest count changes, the numbers unchanged by the count (bit
for bit), and the option's checks."""
from __future__ import annotations

import random
import time

import numba
import pytest
import torch

import offload
from offload.decode_threads import (DecodeThreads, choose, drift_covers, drifted, load_eased, neighbours, parse,
                                    probe_schedule, thread_ladder)
from offload.errors import OffloadError
from offload.host_load import LoadMeter, allowed_cpus, idle_cpu_seconds, others_busy
from test_cli import assert_one_line_error, invoke

import csrc_py  # noqa: F401  (torch before numba)
from csrc_py import threads as cpu_threads

TWO_THREADS = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")


@pytest.mark.parametrize("max_threads, ladder", [(1, (1,)), (2, (2, 1)), (6, (6, 3, 1)), (16, (16, 8, 4, 2, 1))])
def test_the_ladder_halves_down_to_one_thread(max_threads, ladder):
    assert thread_ladder(max_threads) == ladder


@pytest.mark.parametrize("current, expected", [(16, (8,)), (4, (8, 2)), (1, (2,))])
def test_a_probe_tries_the_rungs_next_to_the_current_count(current, expected):
    assert neighbours((16, 8, 4, 2, 1), current) == expected


def test_a_probe_pairs_each_other_count_with_the_current_one():
    assert probe_schedule(2, (1,), 3) == [1, 2, 1, 2, 1, 2]
    assert probe_schedule(4, (8, 2), 2) == [8, 4, 8, 4, 2, 4, 2, 4]


@pytest.mark.parametrize("pairs, current, expected", [
    ({1: [(9, 11), (9, 10), (8, 10), (9, 10)]}, 2, 1),          # faster in every pair, by more than 5%
    ({1: [(10.3, 10.5), (10.2, 10.4), (10, 10.2)]}, 2, 2),      # faster in each pair, but within the margin
    ({1: [(5, 10), (12, 10), (12, 10), (5, 10)]}, 2, 2),        # median 0.85, but only half the pairs won
    ({1: [(12, 10), (11, 10), (13, 10)]}, 2, 2),                # slower
    ({8: [(7, 10)] * 3, 2: [(8, 10)] * 3}, 4, 8),               # the most favoured of several
    ({8: [], 2: []}, 4, 4),                                     # no complete pair: stay
])
def test_choose_moves_only_on_most_pairs_and_a_median_past_the_margin(pairs, current, expected):
    assert choose(pairs, current, margin=0.05) == expected


@pytest.mark.parametrize("recent, reference, expected", [([1.0, 1.1, 1.5], 1.0, False), ([1.4, 1.4, 1.0], 1.0, True),
                                                         ([0.7, 0.7, 1.0], 1.0, True), ([0.8, 0.9, 0.5], 1.0, False),
                                                         ([], 1.0, False), ([5.0], 0.0, False)])
def test_drift_is_the_recent_median_against_the_probes(recent, reference, expected):
    assert drifted(recent, reference, factor=1.3) is expected


@pytest.mark.parametrize("pairs, current, ladder, expected", [
    ({1: [(18, 10), (17, 10), (19, 10), (12, 10)]}, 2, (2, 1), True),   # the fewer-threads count 1.75x slower
    ({1: [(13, 10)] * 4}, 2, (2, 1), False),                            # 1.3x: a load under 1.5x may favour it
    ({8: [(16, 10)] * 4}, 16, (16, 8, 4, 2, 1), True),
    ({4: [(16, 10)] * 4, 16: [(16, 10)] * 4}, 8, (16, 8, 4, 2, 1), False),  # not the top: a load's end favours 16
    ({1: []}, 2, (2, 1), False),                                        # no complete pair
    ({}, 2, (2, 1), False),
])
def test_the_drift_check_covers_a_probe_at_the_top_whose_other_counts_were_much_slower(pairs, current, ladder,
                                                                                      expected):
    assert drift_covers(pairs, current, ladder, factor=1.5) is expected


def simulate(tuner: DecodeThreads, seconds_of, steps: int) -> list[int]:
    """Run `steps` decode steps on a simulated host: seconds_of(step, threads) is a step's time."""
    used = []
    for step in range(steps):
        n = tuner.next()
        tuner.record(n, seconds_of(step, n))
        used.append(n)
    return used


def test_on_a_quiet_host_all_threads_stay_and_probes_thin_out():
    quiet = lambda step, n: {2: 10.0, 1: 13.0}[n] + (step % 3) * 0.1  # noqa: E731
    used = simulate(DecodeThreads.auto(2), quiet, 600)
    assert used[-64:].count(2) >= 60  # one probe of 4 steps in the last period
    assert used.count(1) <= 4 * (600 // 64 + 2)  # probes of 4 steps, every 32 then 64 steps


def test_where_one_thread_is_much_slower_the_quiet_host_probes_every_256_steps():
    quiet = lambda step, n: {2: 10.0, 1: 18.0}[n] + (step % 3) * 0.1  # noqa: E731
    used = simulate(DecodeThreads.auto(2), quiet, 1000)
    assert used[:8] == [1, 2] * 4  # the first probe
    assert used[8:].count(1) == 4 * ((1000 - 8) // (256 + 8))  # then one probe of 4 steps every 256


def test_after_settling_a_load_still_moves_it_at_once_and_its_end_moves_it_back():
    def loaded_from_300_to_600(step, n):
        if 300 <= step < 600:  # one thread as fast as on a quiet host, two waiting for the busy core
            return {2: 40.0, 1: 18.0}[n]
        return {2: 10.0, 1: 18.0}[n]

    used = simulate(DecodeThreads.auto(2), loaded_from_300_to_600, 800)
    assert used[314:342] == [1] * 28  # the drift started a probe within a few steps of the load, not 256 later
    assert used[314:600].count(1) > 0.9 * 286  # the lower count's own probes aside
    assert used[-100:].count(2) >= 96  # back on two within the lower count's 32-64 step period, then settled


def test_under_load_the_tuner_moves_to_fewer_threads_and_back_when_the_load_goes():
    def loaded_until_300(step, n):
        if step < 300:  # another program on a core: the second thread makes every region wait
            return {2: 30.0, 1: 14.0}[n]
        return {2: 10.0, 1: 13.0}[n]

    tuner = DecodeThreads.auto(2)
    used = simulate(tuner, loaded_until_300, 700)
    assert used[10:300].count(1) > 0.9 * 290  # settled on one thread within the first probe
    assert used[-100:].count(2) >= 90  # back on two once they are faster again (probes aside)
    assert tuner.steps[1] + tuner.steps[2] == 700


def test_a_sudden_load_starts_a_probe_before_the_period_is_over():
    tuner = DecodeThreads.auto(2)
    slow_from = 200
    used = simulate(tuner, lambda step, n: {2: 10.0, 1: 13.0}[n] if step < slow_from else {2: 40.0, 1: 14.0}[n],
                    260)
    # the drift noticed it within a few steps, not at the end of the 64-step period
    assert used[slow_from + 16: slow_from + 16 + 24] == [1] * 24


def test_a_fluctuating_load_does_not_move_it_to_the_slower_count():
    rng = random.Random(0)

    def noisy_two_faster(step, n):  # two threads 15% faster; every step 1-2x as long at random (an extreme noise)
        return {2: 10.0, 1: 11.5}[n] * rng.uniform(1.0, 2.0)

    used = simulate(DecodeThreads.auto(2), noisy_two_faster, 2000)
    assert used.count(2) > 0.75 * len(used)


def test_under_a_fluctuating_load_the_faster_count_still_wins():
    rng = random.Random(1)

    def noisy_one_faster(step, n):  # one thread 25% faster, under the same noise
        return {2: 10.0, 1: 7.5}[n] * rng.uniform(1.0, 1.6)

    used = simulate(DecodeThreads.auto(2), noisy_one_faster, 1000)
    assert used[100:].count(1) > 0.85 * 900


def test_many_cores_walk_the_ladder_one_rung_a_probe():
    best = 4
    used = simulate(DecodeThreads.auto(16), lambda step, n: 10.0 + abs(n - best), 400)
    assert used[-64:].count(best) >= 56  # one probe of both neighbours, 4 steps each, in the last period
    assert set(used) <= {16, 8, 4, 2}  # one never tried: it is not next to the best count


@pytest.mark.parametrize("cpus, wall, idle, own, expected", [
    (2, 1.0, 0.0, 1.0, 1.0),  # one thread of ours, the other CPU busy all along
    (2, 1.0, 1.0, 1.0, 0.0),  # one thread of ours, the other CPU idle
    (2, 0.5, 0.0, 1.0, 0.0),  # both CPUs ours
    (16, 2.0, 8.0, 8.0, 8.0),  # 4 threads of ours, 8 cores busy with others, 4 idle
    (2, 1.0, 1.2, 1.0, 0.0),  # idle counted in 10 ms ticks can exceed the rest: never below 0
    (2, 0.0, 0.0, 0.0, 0.0),
])
def test_others_busy_is_the_cpu_time_neither_idle_nor_ours(cpus, wall, idle, own, expected):
    assert others_busy(cpus, wall, idle, own) == pytest.approx(expected)


@pytest.mark.parametrize("cores, reference, busy, threads, expected", [
    (2, 1.0, 0.0, 2, True),  # the other program on the second core is gone: two threads fit again
    (2, 1.0, 0.6, 2, False), (2, 1.0, 0.5, 2, True),  # within half a core
    (2, 0.0, 0.0, 2, False),  # two threads fitted all along and lost anyway: nothing new to try
    (2, 0.0, 1.0, 2, False), (2, 2.0, 1.0, 2, False),  # a load came; one of two programs left, one core still taken
    (16, 1.0, 0.0, 16, True),  # 16 cores, at 8 threads since one core was taken: 16 fit again
    (16, 10.0, 6.0, 8, True), (16, 10.0, 9.0, 8, False),  # at 4 threads: 8 fit again once 8 cores are left
    (8, 4.0, 0.0, 8, True),  # 8 cores behind 16 hyperthreads, another program on 4 of them
])
def test_a_load_eases_when_the_next_rung_fits_in_the_cores_others_leave(cores, reference, busy, threads, expected):
    assert load_eased(cores, reference, busy, threads) is expected


class SimulatedHost:
    """A host's clock and CPU time for a LoadMeter: each step adds its seconds, the CPU time of our threads and
    the idle time the other programs' busy cores leave."""

    def __init__(self, cpus: int = 2):
        self.cpus, self.t, self.idle, self.own = cpus, 0.0, 0.0, 0.0

    def run(self, seconds: float, threads: int, others: float) -> None:
        self.t += seconds
        self.own += threads * seconds
        self.idle += max(0.0, self.cpus - threads - others) * seconds

    def meter(self) -> LoadMeter:
        return LoadMeter(min_seconds=0.2, cpus=set(range(self.cpus)), cores=self.cpus, clock=lambda: self.t,
                         idle_seconds=lambda cpus: self.idle, own_seconds=lambda: self.own)


def simulate_on(host: SimulatedHost, tuner: DecodeThreads, others_of, seconds_of, steps: int,
                pause_at: int = -1) -> list[int]:
    """simulate() where others_of(step) cores are busy with other programs; at step `pause_at` this process
    waits 10 s first (a chat between replies)."""
    used = []
    for step in range(steps):
        if step == pause_at:
            host.run(10.0, 0, others_of(step))
        n = tuner.next()
        seconds = seconds_of(step, n)
        host.run(seconds, n, others_of(step))
        tuner.record(n, seconds)
        used.append(n)
    return used


def back_on(used: list[int], threads: int, after: int) -> int:
    """The first step from `after` on that starts 16 steps in a row at `threads`."""
    return next(i for i in range(after, len(used)) if used[i: i + 16] == [threads] * 16)


BUSY_UNTIL = 300


def busy_until(step: int) -> float:  # another program keeps one core busy until BUSY_UNTIL
    return 1.0 if step < BUSY_UNTIL else 0.0


def all_waiting_for_it(cores: int):
    """Step seconds where every thread count below `cores` decodes as fast beside the busy core as without it
    and the full count waits for it until BUSY_UNTIL (4x), then is the fastest (each halving 1.4x slower)."""
    def seconds(step: int, n: int) -> float:
        if n == cores:
            return 0.020 * (4.0 if step < BUSY_UNTIL else 1.0)
        return 0.020 * 1.4 ** (cores // n).bit_length()
    return seconds


@pytest.mark.parametrize("cores", [2, 16])
def test_with_a_load_meter_the_end_of_a_busy_spell_moves_it_back_within_a_few_steps(cores):
    host = SimulatedHost(cores)
    steps = all_waiting_for_it(cores)
    with_meter = simulate_on(host, DecodeThreads.auto(cores, load=host.meter()), busy_until, steps, 500)
    without = simulate_on(SimulatedHost(cores), DecodeThreads.auto(cores), busy_until, steps, 500)
    below = cores // 2
    assert with_meter[40:BUSY_UNTIL].count(below) > 0.85 * (BUSY_UNTIL - 40)  # one rung down during the spell
    assert back_on(with_meter, cores, BUSY_UNTIL) <= BUSY_UNTIL + 28  # two readings of 0.2 s, a probe of 8-16 steps
    assert back_on(without, cores, BUSY_UNTIL) >= BUSY_UNTIL + 30  # the periodic probe: up to 64 steps
    assert with_meter[BUSY_UNTIL + 20:].count(below) <= 8  # then probes thin out as before


def test_a_load_meter_adds_no_probe_while_the_others_keep_their_cores():
    def one_thread_wins(step, n):  # a host where one thread is faster anyway (others' load unchanged)
        return {2: 0.040, 1: 0.030}[n]

    for others in (lambda step: 0.0, lambda step: 1.0):
        host = SimulatedHost()
        with_meter = simulate_on(host, DecodeThreads.auto(2, load=host.meter()), others, one_thread_wins, 600,
                                 pause_at=200)
        without = simulate_on(SimulatedHost(), DecodeThreads.auto(2), others, one_thread_wins, 600, pause_at=200)
        assert with_meter == without  # nothing eased that two threads could use, pause included


def test_the_load_meter_reads_this_hosts_cpu_time():
    cpus = allowed_cpus()
    assert cpus and idle_cpu_seconds(cpus) > 0
    meter = LoadMeter(min_seconds=0.05)
    assert 0 < meter.cores <= len(cpus)
    assert meter.reading() is None  # the first call starts a span
    assert meter.reading() is None  # shorter than min_seconds
    deadline = time.monotonic() + 0.1
    while time.monotonic() < deadline:  # this process busy: not counted as others'
        pass
    busy = meter.reading()
    assert busy is not None and 0.0 <= busy <= len(cpus)


def test_a_host_whose_cpu_times_cannot_be_read_decodes_on_step_times_alone():
    def no_proc_stat(cpus):
        raise FileNotFoundError("/proc/stat")

    host = SimulatedHost()
    meter = host.meter()
    meter.idle_seconds = no_proc_stat
    steps = all_waiting_for_it(2)
    blind = simulate_on(host, DecodeThreads.auto(2, load=meter), busy_until, steps, 500)
    assert meter.reading() is None
    assert blind == simulate_on(SimulatedHost(), DecodeThreads.auto(2), busy_until, steps, 500)


def test_a_fixed_count_never_probes():
    tuner = DecodeThreads.fixed(1)
    assert simulate(tuner, lambda step, n: 1.0, 100) == [1] * 100
    assert tuner.describe() == "1 (fixed)"


@pytest.mark.parametrize("value, expected", [("auto", None), ("AUTO", None), (3, 3), ("2", 2)])
def test_parse(value, expected):
    assert parse(value) == expected


@pytest.mark.parametrize("value", ["0", 0, -1, "two", "", True, 1.5])
def test_parse_refuses_what_is_not_a_count(value):
    with pytest.raises(OffloadError, match="decode_threads must be 'auto' or a thread count"):
        parse(value)


# --- the model ---------------------------------------------------------------------------------------------------

def decode_logits(model, threads_per_step: list[int], prompt: list[int]) -> list[torch.Tensor]:
    """Greedy decode steps of `model` after a prefill of `prompt`, step i on threads_per_step[i] threads."""
    transformer = model.transformer
    out = []
    with torch.inference_mode():
        logits = transformer(torch.tensor(prompt), 0, last_only=True)[0]
        pos = len(prompt)
        try:
            for n in threads_per_step:
                cpu_threads.use(n)
                token = int(logits.argmax())
                logits = transformer(torch.tensor([token]), pos, last_only=True)[0].clone()
                out.append(logits)
                pos += 1
        finally:
            cpu_threads.use(cpu_threads.configured())
    return out


@TWO_THREADS
@pytest.mark.parametrize("name, experts, dense", [("qwen3_moe", "int8", "int8"), ("deepseek_v2", "int4s", "int4s"),
                                                  ("mixtral", "int4", None)])
def test_the_thread_count_never_changes_the_logits(checkpoint_dir, name, experts, dense):
    folder, _ = checkpoint_dir(name)
    model = offload.load(folder, device="cpu", experts=experts, dense=dense, max_context=64, cpu_threads=2)
    prompt = [3, 5, 7, 11, 13, 17]
    one = decode_logits(model, [1] * 6, prompt)
    two = decode_logits(model, [2] * 6, prompt)
    mixed = decode_logits(model, [2, 1, 1, 2, 1, 2], prompt)
    for a, b, c in zip(one, two, mixed):
        assert torch.equal(a, b) and torch.equal(a, c)


@TWO_THREADS
def test_generation_measures_the_counts_and_reports_its_steps(checkpoint_dir):
    folder, _ = checkpoint_dir("qwen3_moe")
    model = offload.load(folder, device="cpu", experts="int8", max_context=128, cpu_threads=2)
    assert model.decode_threads is not None and model.decode_threads.ladder == (2, 1)
    fixed = offload.load(folder, device="cpu", experts="int8", max_context=128, cpu_threads=2, decode_threads=2)
    g = model.generate([3, 5, 7], max_new_tokens=40, ignore_eos=True)
    reference = fixed.generate([3, 5, 7], max_new_tokens=40, ignore_eos=True)
    assert g.token_ids == reference.token_ids
    steps = g.stats.decode_threads
    assert sum(steps.values()) == 39 and steps.get(1, 0) >= 3  # the first probe tried one thread
    assert reference.stats.decode_threads == {2: 39}
    assert g.stats.as_dict()["decode_threads"] == {str(n): s for n, s in sorted(steps.items(), reverse=True)}
    assert numba.get_num_threads() == 2 and torch.get_num_threads() == 2  # restored after the decode


def test_no_measured_count_where_the_cpu_kernels_do_not_decode(checkpoint_dir):
    folder, _ = checkpoint_dir("qwen3_moe")
    assert offload.load(folder, device="cpu", max_context=64).decode_threads is None  # torch alone
    assert offload.load(folder, device="cpu", experts="int8", max_context=64, cpu_threads=1).decode_threads is None
    one = offload.load(folder, device="cpu", experts="int8", max_context=64, cpu_threads=2, decode_threads=1)
    assert one.decode_threads.ladder == (1,) and one.decode_threads.describe() == "1 (fixed)"


def test_a_fixed_count_with_a_device_tier_is_refused_before_any_weight_is_read(checkpoint_dir, monkeypatch):
    folder, _ = checkpoint_dir("qwen3_moe")
    from offload.weights import checkpoint as checkpoint_module

    monkeypatch.setattr(checkpoint_module.Checkpoint, "read", lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(OffloadError, match="with a device tier the CPU experts run on their workers"):
        offload.load(folder, device="cpu", gpu_memory="1GiB", decode_threads=1)
    with pytest.raises(OffloadError, match="decode_threads must be"):
        offload.load(folder, device="cpu", experts="int8", decode_threads="many")


def test_the_cli_refuses_a_bad_count_in_one_line(checkpoint_dir):
    folder, _ = checkpoint_dir("qwen3_moe")
    result = invoke("generate", folder, "--prompt-ids", "1,2,3", "--device", "cpu", "--decode-threads", "0")
    assert_one_line_error(result, "decode_threads must be 'auto' or a thread count")

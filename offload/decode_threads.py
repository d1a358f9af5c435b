"""How many threads a CPU decode step uses, chosen by timing decode steps on the host as it is now.

A decode step is memory-bound and made of many short parallel regions (csrc_py.decode_step). On a quiet host
all cores read faster than one; once another program takes a core, a region waits for its slowest thread, so
every region pays for the competitor's time slices and fewer threads decode faster (on the 2-core development
machine, under other test runs, one thread decoded 1.5-2.5x faster than two; docs/benchmarks.md, "Decode
threads under load"). Which count wins changes with whatever else runs, so it is measured, not fixed:

- the counts tried form a ladder of halvings of the configured threads (16, 8, 4, 2, 1); a probe runs pairs of
  steps, one at a neighbour of the current count on the ladder and one at the current count, so that both steps
  of a pair see the same load, and moves to the neighbour when its steps are faster by `margin` in the median of
  the pairs' ratios and in most pairs outright (a fluctuating load then does not move it on a few lucky steps);
- a probe runs at the first decode steps, then every `period` steps (doubled up to `max_period` each time a
  probe keeps the count, reset when it moves), and at once when the median of the current count's last
  `drift_window` steps is `drift` times slower or faster than at its last probe (the load changed). One thread
  decodes about as fast with a competitor as without one, so only the periodic probe finds that more threads win
  again: `max_period` bounds how long that takes (64 steps) and what probing costs (4 steps in 64 at the other
  count; 128 left a run at one thread for whole replies after a busy spell, docs/benchmarks.md);
- below the top of the ladder, where another program's load made fewer threads win, the steps cannot tell when
  that program is gone (one thread decodes about as fast beside it as without it), but the host's CPU time can:
  with a `load` meter (offload/host_load.py; the model's tuner has one) a probe also runs at once when the cores
  other programs keep busy fall so far that the next rung up fits in the cores they leave, where it did not at the
  first reading after the probe that chose the count (`load_eased`); the periodic probe stays as the safety net;
- at the top of the ladder, where every fewer-threads count ran at least `drift` times slower in the probe, the
  drift check alone notices any load under which one of them would win (a load makes no count faster, so the
  current count's steps must slow past `drift` first): probes there come every `settled_period` steps (256), a
  safety net, and cost 4 slow steps in 256 instead of 64 on a quiet host (`drift_covers`).

Thread counts never change the numbers: every parallel loop of the CPU kernels writes disjoint outputs
(tests/test_decode_threads.py checks the logits bit for bit). `load(decode_threads=N)` fixes the count instead.
"""
from __future__ import annotations

import statistics
from collections import Counter, deque
from dataclasses import dataclass, field

from .host_load import LoadMeter

AUTO = "auto"


def thread_ladder(max_threads: int) -> tuple[int, ...]:
    """The thread counts tried, most first: max_threads and its halvings down to 1."""
    ladder = [max(1, max_threads)]
    while ladder[-1] > 1:
        ladder.append(ladder[-1] // 2)
    return tuple(ladder)


def neighbours(ladder: tuple[int, ...], current: int) -> tuple[int, ...]:
    """The counts next to `current` on the ladder (one more and one fewer rung)."""
    i = ladder.index(current)
    return tuple(ladder[j] for j in (i - 1, i + 1) if 0 <= j < len(ladder))


def probe_schedule(current: int, others: tuple[int, ...], pairs: int) -> list[int]:
    """A probe's thread counts, step by step: for each other count, `pairs` pairs of a step at it and a step at
    `current`, so that the two steps of a pair see the same load."""
    return [n for other in others for _ in range(pairs) for n in (other, current)]


def choose(pairs: dict[int, list[tuple[float, float]]], current: int, margin: float) -> int:
    """The count to decode with after a probe, from (other count's step, current count's next step) seconds per
    pair: the other count whose pairs favour it most (lowest median ratio), where that median is below 1 - margin
    and it won more than half of its pairs outright; else the current count. Paired medians and the majority keep a
    fluctuating load from moving the count on a few lucky steps."""
    best, best_ratio = current, 1.0 - margin
    for n, timed in pairs.items():
        ratios = [other / cur for other, cur in timed if cur > 0]
        if not ratios or 2 * sum(r < 1.0 for r in ratios) <= len(ratios):
            continue
        ratio = statistics.median(ratios)
        if ratio < best_ratio:
            best, best_ratio = n, ratio
    return best


def drifted(recent: list[float], reference: float, factor: float) -> bool:
    """Whether recent steps (their median) are `factor` times slower or faster than the reference step time: the
    load changed, and another count may now win."""
    if not recent or reference <= 0:
        return False
    ratio = statistics.median(recent) / reference
    return ratio > factor or ratio < 1.0 / factor


def drift_covers(pairs: dict[int, list[tuple[float, float]]], current: int, ladder: tuple[int, ...],
                 factor: float) -> bool:
    """Whether the drift check alone notices every load under which a probe would move from `current`: it is the
    ladder's top (no more-threads count that a load's end could favour), and each fewer-threads count's steps took
    at least `factor` times the current count's in the median of the probe's pairs. A new load makes no count
    faster, so such a count wins only once the current count's steps have slowed past `factor` times their probe
    time, and that starts a probe at once (drifted)."""
    if current != ladder[0] or not pairs:
        return False
    for timed in pairs.values():
        ratios = [other / cur for other, cur in timed if cur > 0]
        if not ratios or statistics.median(ratios) < factor:
            return False
    return True


def load_eased(cores: float, reference: float, busy: float, threads: int) -> bool:
    """Whether `threads` (the next rung up) fit, within half a core, in the host's `cores` that other programs
    leave now that they keep `busy` of them busy, where they did not at the `reference` reading: that rung may win
    again. (A rung that already fit there lost on a host as loaded as now.)"""
    def fits(others: float) -> bool:
        return cores - others >= threads - 0.5

    return fits(busy) and not fits(reference)


@dataclass
class DecodeThreads:
    """The thread count of each decode step of a model: `next()` before a step, `record()` after it.

    A fixed count (a one-rung ladder) never probes."""

    ladder: tuple[int, ...]
    probe_pairs: int = 4
    period: int = 32
    max_period: int = 64
    settled_period: int = 256  # at the ladder's top where the drift check covers the fewer-threads counts
    margin: float = 0.05
    drift: float = 1.5
    drift_window: int = 5
    load: LoadMeter | None = None  # others' busy cores on this process's CPUs; None: step times alone
    current: int = field(init=False)
    steps: Counter = field(init=False, default_factory=Counter)  # decode steps run at each count
    _schedule: deque = field(init=False, default_factory=deque)  # the probe's remaining step counts
    _pairs: dict = field(init=False, default_factory=dict)  # other count -> [(its step, the next current step)]
    _pending: tuple = field(init=False, default=(0, 0.0))  # the probe's last step at another count, unpaired
    _until_probe: int = field(init=False, default=0)  # steps at the current count before the next probe
    _period: int = field(init=False, default=0)
    _reference: float = field(init=False, default=0.0)  # the current count's median step in the last probe
    _recent: deque = field(init=False)  # the current count's latest step seconds outside probes
    _load_reference: float | None = field(init=False, default=None)  # the first load reading at the current count

    def __post_init__(self) -> None:
        self.current = self.ladder[0]
        self._period = self.period
        self._recent = deque(maxlen=self.drift_window)

    @classmethod
    def auto(cls, max_threads: int, load: LoadMeter | None = None) -> DecodeThreads:
        return cls(thread_ladder(max_threads), load=load)

    @classmethod
    def fixed(cls, threads: int) -> DecodeThreads:
        return cls((threads,))

    @property
    def measured(self) -> bool:
        return len(self.ladder) > 1

    def next(self) -> int:
        """The thread count for the next decode step."""
        if self.measured and not self._schedule and (
                self._until_probe <= 0 or drifted(list(self._recent), self._reference, self.drift)
                or self._load_eased()):
            self._pairs = {}
            self._schedule.extend(probe_schedule(self.current, neighbours(self.ladder, self.current),
                                                 self.probe_pairs))
        return self._schedule[0] if self._schedule else self.current

    def record(self, threads: int, seconds: float) -> None:
        """The step run at `threads` took `seconds`."""
        self.steps[threads] += 1
        if not self.measured:
            return
        if self._schedule:
            self._schedule.popleft()
            if threads != self.current:
                self._pending = (threads, seconds)
            else:
                other, other_seconds = self._pending
                self._pairs.setdefault(other, []).append((other_seconds, seconds))
            if not self._schedule:
                self._end_probe()
            return
        self._until_probe -= 1
        self._recent.append(seconds)

    def describe(self) -> str:
        if not self.measured:
            return f"{self.current} (fixed)"
        return f"{self.current} (measured among {', '.join(map(str, self.ladder))} while generating)"

    def _load_eased(self) -> bool:
        """Below the ladder's top with a load meter: whether its latest reading (one every min_seconds) found
        the other programs' busy cores fallen enough since the first reading at this count (load_eased)."""
        if self.load is None or self.current == self.ladder[0]:
            return False
        busy = self.load.reading()
        if busy is None:
            return False
        if self._load_reference is None:
            self._load_reference = busy
            return False
        up = self.ladder[self.ladder.index(self.current) - 1]
        return load_eased(self.load.cores, self._load_reference, busy, up)

    def _end_probe(self) -> None:
        chosen = choose(self._pairs, self.current, self.margin)
        if chosen != self.current:
            self._period = self.period
        elif drift_covers(self._pairs, self.current, self.ladder, self.drift):
            self._period = self.settled_period
        else:
            self._period = min(self._period * 2, self.max_period)
        if chosen == self.current:
            seconds = [cur for timed in self._pairs.values() for _, cur in timed]
        else:
            seconds = [other for other, _ in self._pairs[chosen]]
        self._reference = statistics.median(seconds) if seconds else 0.0
        self.current = chosen
        self._recent.clear()  # refilled at the chosen count before a drift can start the next probe
        self._until_probe = self._period
        if self.load is not None:  # readings at the chosen count only, the first one the reference
            self.load.restart()
            self._load_reference = None


def parse(value: int | str) -> int | None:
    """`decode_threads` as given to load() or the CLI: "auto" -> None (measured), else a fixed count >= 1."""
    from .errors import OffloadError

    if isinstance(value, str) and value.strip().lower() == AUTO:
        return None
    try:
        n = int(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else 0
    except ValueError:
        n = 0
    if n < 1:
        raise OffloadError(f"decode_threads must be 'auto' or a thread count of at least 1, not {value!r}")
    return n

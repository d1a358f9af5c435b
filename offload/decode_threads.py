"""How many threads a CPU decode step uses, chosen by timing decode steps on the host as it is now.

A decode step is memory-bound and made of many short parallel regions (csrc_py.decode_step). On a quiet host
all cores read faster than one; once another program takes a core, a region waits for its slowest thread, so
every region pays for the competitor's time slices and fewer threads decode faster (on the 2-core development
machine, under other test runs, one thread decoded 1.5-2.5x faster than two; docs/benchmarks.md, "Decode
threads under load"). Which count wins changes with whatever else runs, so it is measured, not fixed:

- the counts tried form a ladder of halvings of the configured threads (16, 8, 4, 2, 1); a probe times a few
  steps at each neighbour of the current count on the ladder (after one untimed step at it) and moves to the
  neighbour whose median step beats the current count's last steps by `margin`;
- a probe runs at the first decode steps, then every `period` steps (doubled up to `max_period` each time a
  probe keeps the count, reset when it moves), and at once when the current count's recent steps are `drift`
  times slower or faster than at its last probe (the load changed). One thread decodes about as fast with a
  competitor as without one, so only the periodic probe finds that more threads win again: `max_period` bounds
  how long that takes (64 steps) and what probing costs (4 steps in 64 at the slower count).

Thread counts never change the numbers: every parallel loop of the CPU kernels writes disjoint outputs
(tests/test_decode_threads.py checks the logits bit for bit). `load(decode_threads=N)` fixes the count instead.
"""
from __future__ import annotations

import statistics
from collections import Counter, deque
from dataclasses import dataclass, field

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


def probe_schedule(others: tuple[int, ...], steps: int) -> list[tuple[int, bool]]:
    """A probe's steps as (thread count, timed): for each other count one untimed step (the first at a new count
    pays for the change: a pool waking up, caches refilled) and `steps` timed ones."""
    return [(n, i > 0) for n in others for i in range(steps + 1)]


def choose(samples: dict[int, list[float]], current: int, margin: float) -> int:
    """The count to decode with after a probe: the one with the fastest median step, where it beats the current
    count's median by more than `margin` (a fraction); else the current count."""
    medians = {n: statistics.median(s) for n, s in samples.items() if s}
    if current not in medians:
        return current
    best = min(medians, key=medians.get)
    return best if medians[best] < medians[current] * (1.0 - margin) else current


def drifted(recent: list[float], reference: float, factor: float) -> bool:
    """Whether recent steps (their median) are `factor` times slower or faster than the reference step time: the
    load changed, and another count may now win."""
    if not recent or reference <= 0:
        return False
    ratio = statistics.median(recent) / reference
    return ratio > factor or ratio < 1.0 / factor


@dataclass
class DecodeThreads:
    """The thread count of each decode step of a model: `next()` before a step, `record()` after it.

    A fixed count (a one-rung ladder) never probes."""

    ladder: tuple[int, ...]
    probe_steps: int = 3
    period: int = 32
    max_period: int = 64
    margin: float = 0.05
    drift: float = 1.3
    current: int = field(init=False)
    steps: Counter = field(init=False, default_factory=Counter)  # decode steps run at each count
    _schedule: deque = field(init=False, default_factory=deque)  # the probe's remaining (count, timed) steps
    _samples: dict = field(init=False, default_factory=dict)  # count -> timed step seconds of the probe
    _until_probe: int = field(init=False, default=0)  # steps at the current count before the next probe
    _period: int = field(init=False, default=0)
    _reference: float = field(init=False, default=0.0)  # the current count's median step at the last probe
    _recent: deque = field(init=False)  # the current count's latest step seconds

    def __post_init__(self) -> None:
        self.current = self.ladder[0]
        self._period = self.period
        self._recent = deque(maxlen=self.probe_steps)

    @classmethod
    def auto(cls, max_threads: int) -> DecodeThreads:
        return cls(thread_ladder(max_threads))

    @classmethod
    def fixed(cls, threads: int) -> DecodeThreads:
        return cls((threads,))

    @property
    def measured(self) -> bool:
        return len(self.ladder) > 1

    def next(self) -> int:
        """The thread count for the next decode step."""
        if self.measured and not self._schedule and len(self._recent) == self._recent.maxlen and (
                self._until_probe <= 0 or drifted(list(self._recent), self._reference, self.drift)):
            self._samples = {self.current: list(self._recent)}  # the steps just before, at the current count
            self._schedule.extend(probe_schedule(neighbours(self.ladder, self.current), self.probe_steps))
        return self._schedule[0][0] if self._schedule else self.current

    def record(self, threads: int, seconds: float) -> None:
        """The step run at `threads` took `seconds`."""
        self.steps[threads] += 1
        if not self.measured:
            return
        if self._schedule:
            _, timed = self._schedule.popleft()
            if timed:
                self._samples.setdefault(threads, []).append(seconds)
            if not self._schedule:
                self._end_probe()
            return
        self._until_probe -= 1
        self._recent.append(seconds)

    def describe(self) -> str:
        if not self.measured:
            return f"{self.current} (fixed)"
        return f"{self.current} (measured among {', '.join(map(str, self.ladder))} while generating)"

    def _end_probe(self) -> None:
        chosen = choose(self._samples, self.current, self.margin)
        self._period = min(self._period * 2, self.max_period) if chosen == self.current else self.period
        self.current = chosen
        self._reference = statistics.median(self._samples[chosen])
        self._recent.clear()  # refilled at the chosen count before a drift can start the next probe
        self._until_probe = self._period


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

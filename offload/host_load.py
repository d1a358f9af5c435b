"""How many cores other programs keep busy on the CPUs this process may run on, between two readings.

The decode thread count (offload/decode_threads.py) moves to fewer threads while another program takes a core. A
step at the fewer threads then runs about as fast beside that program as without it, so step times cannot tell
when it is gone; the host's CPU time can. A reading is the CPU-seconds per second that neither this process nor
idleness took on its CPUs: (CPUs x wall time - idle time - this process's CPU time) / wall time. Idle time is
/proc/stat's per-CPU idle + iowait (psutil.cpu_times), counted in clock ticks (10 ms), so a reading spans at least
`min_seconds`; this process's CPU time (all its threads) comes from time.process_time. Time this process spends
waiting (between replies of a chat) is idle on both sides and does not move a reading.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil


def others_busy(cpus: int, wall: float, idle: float, own: float) -> float:
    """Cores kept busy by other programs over `wall` seconds on `cpus` CPUs that were idle `idle` CPU-seconds
    while this process ran `own` CPU-seconds (never below 0: the tick-counted idle time is coarse)."""
    if wall <= 0:
        return 0.0
    return max(0.0, (cpus * wall - idle - own) / wall)


def allowed_cpus() -> set[int]:
    """The CPU numbers this process may run on (all of them where the OS cannot say)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(psutil.cpu_count() or 1))


def cores_of(cpus: set[int]) -> float:
    """The physical cores behind the logical CPUs `cpus` (hyperthreads share a core), as the host's ratio."""
    logical, physical = psutil.cpu_count() or 1, psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    return len(cpus) * physical / logical


def idle_cpu_seconds(cpus: set[int]) -> float:
    """Idle + iowait CPU-seconds since boot of the CPUs numbered `cpus`."""
    per_cpu = psutil.cpu_times(percpu=True)
    return sum(t.idle + getattr(t, "iowait", 0.0) for i, t in enumerate(per_cpu) if i in cpus)


@dataclass
class LoadMeter:
    """Readings of others_busy on this process's CPUs, each over at least `min_seconds` since the previous one
    (or since `restart`); `cores`, the physical cores behind those CPUs, is what the readings take from. The
    clock and the CPU-time sources are arguments so that a test can script a host. Where the CPU times cannot be
    read (no /proc/stat in a sandbox), the meter stops reading and the tuner goes on with step times alone: a
    missing hint never stops a generation."""

    min_seconds: float = 0.2
    cpus: set[int] = field(default_factory=allowed_cpus)
    cores: float | None = None  # None: cores_of(cpus)
    clock: Callable[[], float] = time.monotonic
    idle_seconds: Callable[[set[int]], float] = idle_cpu_seconds
    own_seconds: Callable[[], float] = time.process_time
    _since: tuple[float, float, float] | None = field(init=False, default=None)  # (clock, idle, own) at the start
    _unreadable: bool = field(init=False, default=False)  # the CPU times failed once: no more readings

    def __post_init__(self) -> None:
        if self.cores is None:
            self.cores = cores_of(self.cpus)

    def restart(self) -> None:
        """Start the next reading's span now."""
        self._since = self._sample(self.clock())

    def reading(self) -> float | None:
        """Cores other programs kept busy since the span started (which this starts if none has), once it is at
        least min_seconds long; else None (always None once the CPU times could not be read). Each reading starts
        the next span."""
        if self._since is None:
            self.restart()
            return None
        t0, idle0, own0 = self._since
        now = self.clock()
        if now - t0 < self.min_seconds:
            return None
        self._since = self._sample(now)
        if self._since is None:
            return None
        _, idle, own = self._since
        return others_busy(len(self.cpus), now - t0, idle - idle0, own - own0)

    def _sample(self, now: float) -> tuple[float, float, float] | None:
        if self._unreadable:
            return None
        try:
            return now, self.idle_seconds(self.cpus), self.own_seconds()
        except (OSError, psutil.Error, ValueError):
            self._unreadable = True
            return None

"""Time per runtime component (attention, router, device experts, CPU experts, copies, sampling).

On the CPU a section is wall-clock time. On a GPU, where the host only queues work, a section records a pair of
CUDA events on the current stream, and their times are read once the step's work has finished (`collect`, at
the next step boundary, or when `seconds` is read): timing never makes the host wait inside a step. In `exact`
mode (`offload profile`, which wants each section's own time) every section synchronises the device at its ends
and takes the wall clock instead.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch


class Timers:
    """Accumulates seconds per named section."""

    def __init__(self, device: torch.device | None = None, exact: bool = False):
        self.cuda = device is not None and device.type == "cuda"
        self.exact = exact
        self._seconds: dict[str, float] = {}
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []  # CUDA: read after the step
        self._spare: list[torch.cuda.Event] = []  # collected events, recorded again by later sections

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        if self.cuda and not self.exact:
            start = self._event()
            start.record()
            try:
                yield
            finally:
                end = self._event()
                end.record()
                self._pending.append((name, start, end))
            return
        if self.cuda:
            torch.cuda.synchronize()
        start_s = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.add(name, time.perf_counter() - start_s)

    def add(self, name: str, seconds: float) -> None:
        self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def collect(self, wait: bool = False) -> None:
        """Add the times of the sections whose events have completed (all of them with `wait`: the caller is
        outside a step and may wait for the device)."""
        if wait and self._pending:
            self._pending[-1][2].synchronize()  # the stream's last event: every earlier one has completed too
        still = []
        for name, start, end in self._pending:
            if end.query():
                self.add(name, start.elapsed_time(end) / 1e3)
                self._spare += (start, end)
            else:
                still.append((name, start, end))
        self._pending = still

    @property
    def seconds(self) -> dict[str, float]:
        self.collect(wait=True)
        return self._seconds

    def reset(self) -> None:
        self.collect(wait=True)
        self._seconds.clear()

    def _event(self) -> torch.cuda.Event:
        return self._spare.pop() if self._spare else torch.cuda.Event(enable_timing=True)

"""Wall time per runtime component (attention, router, device experts, CPU experts, copies, sampling)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator


class Timers:
    """Accumulates seconds per named section. With `sync` (torch.cuda.synchronize when profiling a GPU run),
    each section waits for queued device work so its time is the work's, not the launch's."""

    def __init__(self, sync: Callable[[], None] | None = None):
        self.sync = sync
        self.seconds: dict[str, float] = {}

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        if self.sync:
            self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def reset(self) -> None:
        self.seconds.clear()

"""One model, one sequence at a time: a bounded FIFO of generation jobs run by one worker thread.

The event loop never runs the model: a job iterates a GenerationRun in the worker thread and hands each text
piece to the loop (call_soon_threadsafe into an asyncio.Queue), so the server keeps answering /health, /metrics
and new requests (with a 429 once the queue is full) while a reply is generated. A client that leaves asks the
run to stop; the run ends after its current token and the next job starts.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from csrc_py import threads

from ..api import Model
from ..generate import Generation, GenerationRun


class QueueFull(Exception):
    """Every place in the queue is taken."""


@dataclass
class ServerCounters:
    """Since the server started: requests by outcome, tokens and model seconds."""
    requests: int = 0  # generations admitted
    rejected: int = 0  # answered 429: the queue was full
    completed: int = 0
    cancelled: int = 0  # the client left before its reply was complete
    failed: int = 0  # the model raised
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0  # generated tokens after each reply's first, which comes out of the prefill
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    def add(self, generation: Generation) -> None:
        s = generation.stats
        self.prompt_tokens += s.prompt_tokens
        self.cached_prompt_tokens += s.cached_prompt_tokens
        self.generated_tokens += s.generated_tokens
        self.decode_steps += max(s.generated_tokens - 1, 0)
        self.prefill_seconds += s.prefill_seconds
        self.decode_seconds += s.decode_seconds


@dataclass
class Job:
    """One admitted generation: the run, and the pieces the worker hands to the event loop."""
    run: GenerationRun
    pieces: asyncio.Queue = field(default_factory=asyncio.Queue)  # str pieces, then None (done) or an exception
    admitted: float = field(default_factory=time.perf_counter)
    started: float | None = None  # perf_counter when the worker took it
    first_piece: float | None = None
    expert_hit_rate: float | None = None  # this reply's share of expert uses served from the device tier

    def timings(self) -> dict[str, Any]:
        """The reply's timings (llama.cpp's server reports the same kind of object), seconds and tokens/s."""
        s, admitted = self.run.result.stats, self.admitted
        return {"queued_seconds": round((self.started or admitted) - admitted, 6),
                "time_to_first_token_seconds": round(self.first_piece - admitted, 6) if self.first_piece else None,
                "prefill_seconds": round(s.prefill_seconds, 6), "decode_seconds": round(s.decode_seconds, 6),
                "prefill_tokens_per_s": round(s.prefill_tokens_per_s, 3),
                "decode_tokens_per_s": round(s.decode_tokens_per_s, 3),
                "expert_hit_rate": self.expert_hit_rate}


class ModelWorker:
    """Runs a model's generations one at a time, first come first served; at most `max_waiting` wait behind the
    one running, and the next is refused (QueueFull) so that a client learns at once instead of timing out."""

    def __init__(self, model: Model, max_waiting: int):
        self.model, self.max_waiting = model, max_waiting
        self.counters = ServerCounters()
        self.stats_snapshot: dict[str, Any] = model.stats()  # taken by the worker between jobs: no torn reads
        self.started = time.time()
        # Thread counts are per thread (Numba's, torch's OpenMP): the generating thread takes the load's.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-generate",
                                            initializer=threads.use, initargs=(model.load_info.cpu_threads,))
        self._admitted = 0  # running + waiting; only touched on the event loop's thread
        self._busy = threading.Event()

    @property
    def waiting(self) -> int:
        return max(self._admitted - 1, 0) if self._busy.is_set() else self._admitted

    @property
    def running(self) -> int:
        return 1 if self._busy.is_set() else 0

    def admit(self, run: GenerationRun) -> Job:
        """Queue a run (QueueFull when max_waiting already wait); iterate `pieces(job)` for its text."""
        if self._admitted > self.max_waiting:  # one running plus max_waiting waiting
            self.counters.rejected += 1
            raise QueueFull
        self._admitted += 1
        self.counters.requests += 1
        job = Job(run)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._work, job, loop)
        future.add_done_callback(lambda _: self._finished(job))
        return job

    async def pieces(self, job: Job) -> AsyncIterator[str]:
        """The job's text pieces as they come; raises what the model raised. Leaving early (the client went
        away) asks the run to stop after its current token."""
        complete = False
        try:
            while True:
                item = await job.pieces.get()
                if item is None:
                    complete = True
                    return
                if isinstance(item, BaseException):
                    complete = True
                    raise item
                yield item
        finally:
            if not complete:
                job.run.request_stop()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _work(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        """In the worker thread: iterate the run, handing each piece to the loop, then None or the exception."""
        if job.run.stop_requested:  # its client left while it waited
            loop.call_soon_threadsafe(job.pieces.put_nowait, None)
            return
        self._busy.set()
        job.started = time.perf_counter()
        before = _expert_counts(self.model.stats())
        try:
            with job.run:
                for piece in job.run:
                    if job.first_piece is None:
                        job.first_piece = time.perf_counter()
                    loop.call_soon_threadsafe(job.pieces.put_nowait, piece)
            end: BaseException | None = None
        except Exception as error:  # the model failed: the client gets an error, the server keeps serving
            end = error
        self.stats_snapshot = self.model.stats()
        job.expert_hit_rate = _hit_rate(before, _expert_counts(self.stats_snapshot))
        self._busy.clear()
        loop.call_soon_threadsafe(job.pieces.put_nowait, end)

    def _finished(self, job: Job) -> None:
        self._admitted -= 1
        result = job.run.result
        if job.started is not None:  # else its client left before it ran: nothing was computed
            self.counters.add(result)
        if job.run.stop_requested:
            self.counters.cancelled += 1
        elif result.finish_reason == "interrupted":
            self.counters.failed += 1
        else:
            self.counters.completed += 1

    def metrics(self) -> dict[str, Any]:
        """The server's counters, queue and the model's runtime stats (as of the last finished job)."""
        c, stats = self.counters, self.stats_snapshot
        return {
            "uptime_seconds": round(time.time() - self.started, 3),
            "queue": {"running": self.running, "waiting": self.waiting, "max_waiting": self.max_waiting},
            "requests": {"admitted": c.requests, "completed": c.completed, "cancelled": c.cancelled,
                         "failed": c.failed, "rejected": c.rejected},
            "tokens": {"prompt": c.prompt_tokens, "cached_prompt": c.cached_prompt_tokens,
                       "computed_prompt": c.prompt_tokens - c.cached_prompt_tokens, "generated": c.generated_tokens},
            "seconds": {"prefill": round(c.prefill_seconds, 6), "decode": round(c.decode_seconds, 6)},
            "tokens_per_s": {
                "prefill": round((c.prompt_tokens - c.cached_prompt_tokens) / c.prefill_seconds, 3)
                if c.prefill_seconds else None,
                "decode": round(c.decode_steps / c.decode_seconds, 3) if c.decode_seconds else None},
            "expert_cache": stats["totals"],
            "prompt_cache": stats["prompt_cache"],
            "last_generation": stats["last_generation"],
        }


def _expert_counts(stats: dict[str, Any]) -> tuple[int, int]:
    """(expert uses, of them served on the device tier) so far."""
    layers = stats["layers"]
    return sum(layer["expert_uses"] for layer in layers), sum(layer["hits"] for layer in layers)


def _hit_rate(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    uses, hits = after[0] - before[0], after[1] - before[1]
    return round(hits / uses, 4) if uses else None

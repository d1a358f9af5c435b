"""Prefill then incremental decode for one sequence, with sampling, eos and stop strings, streamed as text."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import ContextManager, Generator, Iterator, Sequence

import numpy as np
import torch

from csrc_py import threads as cpu_threads
from csrc_py.logits import all_finite, first_argmax

from .decode_threads import DecodeThreads
from .detokenize import IncrementalDetokenizer, StopStringMatcher
from .errors import ContextLengthError, OffloadError
from .model.transformer import Transformer
from .sampling import SamplingParams, make_generator, plain_greedy, sample_next
from .tokenizer import Tokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    cached_prompt_tokens: int = 0  # the prompt's leading tokens the caches already held: reused, not computed
    decode_threads: dict[int, int] = field(default_factory=dict)  # thread count -> decode steps run with it

    @property
    def computed_prompt_tokens(self) -> int:
        return self.prompt_tokens - self.cached_prompt_tokens

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.computed_prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first generated token comes out of the prefill; the decode steps produce the rest.
        steps = self.generated_tokens - 1
        return steps / self.decode_seconds if self.decode_seconds and steps > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "computed_prompt_tokens": self.computed_prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_seconds": round(self.prefill_seconds, 6),
            "decode_seconds": round(self.decode_seconds, 6),
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "decode_threads": {str(n): steps for n, steps in sorted(self.decode_threads.items(), reverse=True)},
        }


@dataclass
class Generation:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # generated tokens only
    # "stop": an eos token or a stop string; "length": max_new_tokens reached; "interrupted": the run ended before
    # either (closed, abandoned, Ctrl-C or an error), so text holds what was produced until then.
    finish_reason: str = "length"
    stats: GenerationStats = field(default_factory=GenerationStats)


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # Resume from the longest prefix of the prompt the model's caches already hold (the previous turn of a chat)
    # instead of prefilling from position 0; the logits are the same either way. Off to measure a full prefill.
    reuse_cache: bool = True


@dataclass
class PromptCacheStats:
    """Prompt tokens since load (or reset_stats): reused from the caches, and computed by a prefill."""
    reused_tokens: int = 0
    computed_tokens: int = 0

    def clear(self) -> None:
        self.reused_tokens = self.computed_tokens = 0

    def as_dict(self) -> dict:
        total = self.reused_tokens + self.computed_tokens
        return {"reused_tokens": self.reused_tokens, "computed_tokens": self.computed_tokens,
                "reuse_rate": round(self.reused_tokens / total, 4) if total else None}


def common_prefix_length(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many leading tokens a and b share, at most `limit`."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def resume_position(transformer: Transformer, prompt_ids: Sequence[int]) -> int:
    """Where a prefill of prompt_ids can start: the caches' resume point within the prefix they share with what
    they hold. The last prompt token is always recomputed, since its logits pick the first new token."""
    common = common_prefix_length(transformer.cached_ids, prompt_ids, len(prompt_ids) - 1)
    return transformer.resume_point(common) if common else 0


def check_fits(prompt_tokens: int, max_new_tokens: int, max_context: int) -> None:
    if prompt_tokens == 0:
        raise OffloadError("the prompt is empty; give at least one token")
    if max_new_tokens < 1:
        raise OffloadError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if prompt_tokens + max_new_tokens > max_context:
        raise ContextLengthError(
            f"prompt of {prompt_tokens} tokens plus max_new_tokens={max_new_tokens} exceeds max_context={max_context}; "
            "shorten the prompt, lower max_new_tokens or load with a larger max_context"
        )


def check_finite(logits: np.ndarray, position: int, argmax: bool = False) -> int | None:
    """Stop at logits [V] (float32, on the host) that hold NaN or inf: no token can be chosen from them, and
    sampling would silently pick one anyway (argmax of NaN), which ends in an empty or garbage completion. One pass
    on the calling thread (csrc_py.logits), not split over the decode threads. With `argmax` (greedy sampling next),
    the logits' argmax is found in the same pass (first_argmax checks each block before taking its maximum) and
    returned; else None."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    best = first_argmax(logits) if argmax else None  # -1: NaN or inf
    if not (best >= 0 if argmax else all_finite(logits)):
        raise OffloadError(
            f"the model's logits at position {position} hold NaN or inf, so no next token can be chosen: the "
            "checkpoint's weights probably contain NaN/inf (re-export or re-download it), or the compute dtype "
            "overflowed (load with dtype='float32' or 'bfloat16' instead of float16)"
        )
    return best


class GenerationRun:
    """One generation, run once. Iterating yields text pieces as they are produced; `result` holds what was
    produced so far, and is complete once the run is exhausted.

    The run holds `lock` (its model's) from its first piece until it is exhausted, closed (`close()`, or leaving
    a `with` block) or garbage-collected, because the model keeps one sequence's cache. A run stopped early
    reports finish_reason "interrupted"."""

    def __init__(self, transformer: Transformer, tokenizer: Tokenizer | None, eos_ids: Sequence[int],
                 request: GenerationRequest, lock: ContextManager | None = None,
                 prompt_cache: PromptCacheStats | None = None, threads: DecodeThreads | None = None):
        check_fits(len(request.prompt_ids), request.max_new_tokens, transformer.max_context)
        self.transformer, self.tokenizer, self.request = transformer, tokenizer, request
        self.eos_ids = set() if request.ignore_eos else set(eos_ids)
        # "interrupted" until the run ends with a stop or at max_new_tokens.
        self.result = Generation(finish_reason="interrupted",
                                 stats=GenerationStats(prompt_tokens=len(request.prompt_ids)))
        self._lock = lock or contextlib.nullcontext()
        self._prompt_cache = prompt_cache or PromptCacheStats()
        self._threads = threads  # the CPU decode step's thread count per step; None: left as configured
        self._stop_requested = False
        self._pieces: Generator[str, None, None] | None = None  # started on the first next()

    def __iter__(self) -> GenerationRun:
        return self

    def __next__(self) -> str:
        if self._pieces is None:
            self._pieces = self._locked_pieces()
        return next(self._pieces)

    def close(self) -> None:
        """Stop the run where it is and release the model; a run never started will not start."""
        if self._pieces is None:
            self._pieces = self._locked_pieces()  # closed before its first step, it never takes the lock
        self._pieces.close()

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def request_stop(self) -> None:
        """Ask the run to end after its current token, from any thread (e.g. a server whose client left while
        another thread iterates the run); it then ends as "interrupted" and releases the model."""
        self._stop_requested = True

    def __enter__(self) -> GenerationRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _locked_pieces(self) -> Generator[str, None, None]:
        with self._lock:
            yield from self._pieces_of_text()

    def token_ids(self) -> Iterator[int]:
        """The sampled tokens, one by one: prefill, then one decode step per token."""
        req, model, stats = self.request, self.transformer, self.result.stats
        device = model.embed.device
        history = np.empty(len(req.prompt_ids) + req.max_new_tokens, np.int64)  # prompt + generated
        history[: len(req.prompt_ids)] = req.prompt_ids
        generator = make_generator(req.sampling.seed)
        start = resume_position(model, req.prompt_ids) if req.reuse_cache else 0
        t0 = time.perf_counter()
        with torch.inference_mode():
            ids = torch.tensor(req.prompt_ids[start:], device=device)
            logits = model(ids, start, last_only=True)[0].cpu().numpy()  # [V] float32
        stats.prefill_seconds = time.perf_counter() - t0
        stats.cached_prompt_tokens = start
        self._prompt_cache.reused_tokens += start
        self._prompt_cache.computed_tokens += len(req.prompt_ids) - start
        pos = len(req.prompt_ids)
        greedy = plain_greedy(req.sampling)
        best = check_finite(logits, pos - 1, greedy)  # greedy sampling's token, from the same pass
        try:
            for step in range(req.max_new_tokens):
                if greedy:
                    token = best
                else:
                    with model.timers.section("sampling"):
                        token = sample_next(torch.from_numpy(logits), req.sampling, generator,
                                            torch.from_numpy(history[:pos]))
                stats.generated_tokens += 1
                yield token
                if token in self.eos_ids or step == req.max_new_tokens - 1:
                    break
                history[pos] = token
                threads = self._use_decode_threads()
                t0 = time.perf_counter()  # model time only: the consumer's time between tokens is not counted
                logits = model.step_logits(token, pos)
                seconds = time.perf_counter() - t0
                stats.decode_seconds += seconds
                self._record_decode_threads(threads, seconds)
                best = check_finite(logits, pos, greedy)
                pos += 1
        finally:
            if self._threads is not None:
                cpu_threads.use(cpu_threads.configured())  # the prefill and everything else: every thread

    def _use_decode_threads(self) -> int | None:
        if self._threads is None:
            return None
        n = self._threads.next()
        cpu_threads.use(n)
        return n

    def _record_decode_threads(self, threads: int | None, seconds: float) -> None:
        if threads is not None:
            self._threads.record(threads, seconds)
            counts = self.result.stats.decode_threads
            counts[threads] = counts.get(threads, 0) + 1

    def _pieces_of_text(self) -> Iterator[str]:
        result = self.result
        detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer else None
        stops = StopStringMatcher(list(self.request.stop))
        for token in self.token_ids():
            result.token_ids.append(token)
            if token in self.eos_ids:
                result.finish_reason = "stop"
                break
            if detok is not None:
                piece, hit = stops.push(detok.push(token))
                if piece:
                    result.text += piece
                    yield piece
                if hit:
                    result.finish_reason = "stop"
                    return
            if self._stop_requested:
                return  # "interrupted", with the text yielded so far
        if result.finish_reason != "stop":
            result.finish_reason = "length"
        if detok is not None:
            piece, hit = stops.push(detok.flush())
            tail = piece if hit else piece + stops.flush()
            if hit:
                result.finish_reason = "stop"
            if tail:
                result.text += tail
                yield tail

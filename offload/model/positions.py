"""Where a forward's new tokens sit, as a host int or as device tensors for a step that a CUDA graph replays.

A forward of T tokens at positions start..start+T-1 takes `start` as
- an int (prefill, the CPU path): attention reads the cache up to start+T, a slice whose size grows every token;
- `Positions` (a device decode step): the position is a 0-d tensor on the model's device, written in place between
  steps, and attention reads a fixed-size prefix of the cache, the context bucket, with later positions masked.
  Every step in one bucket then issues the same kernels with the same shapes and no host read, so the step can be
  captured once per bucket and replayed.

Buckets are powers of two from MIN_BUCKET to POW2_BUCKETS_UP_TO, then multiples of it (capped at max_context): few
graphs for short contexts, and at most POW2_BUCKETS_UP_TO (or 2x) masked positions read per step past them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_BUCKET = 256
POW2_BUCKETS_UP_TO = 4096


def context_bucket(end: int, max_context: int) -> int:
    """The cache length a step reads when its last token sits at position end-1: the smallest bucket >= end."""
    if end > max_context:
        raise ValueError(f"position {end - 1} is past max_context={max_context}")
    if end <= POW2_BUCKETS_UP_TO:
        bucket = max(MIN_BUCKET, 1 << (end - 1).bit_length())
    else:
        bucket = -(-end // POW2_BUCKETS_UP_TO) * POW2_BUCKETS_UP_TO
    return min(bucket, max_context)


@dataclass(frozen=True)
class Positions:
    """A forward's positions on the device: tokens at start..start+T-1, attention over the first `length` cached
    positions (start+T <= length; later ones are masked). Nothing here is read back to the host."""

    start: torch.Tensor  # 0-d int64 on the model's device
    length: int  # the context bucket

    @classmethod
    def at(cls, start: int, T: int, max_context: int, device: torch.device) -> Positions:
        """T tokens at `start`, in the bucket that holds them (a fresh tensor; a replayed step fills its own)."""
        return cls(torch.tensor(start, dtype=torch.int64, device=device), context_bucket(start + T, max_context))

    def tokens(self, T: int) -> torch.Tensor:
        """The T new tokens' positions [T] (int64, on the device)."""
        return self.start + torch.arange(T, device=self.start.device)


def token_positions(start: int | Positions, T: int, device: torch.device) -> torch.Tensor:
    """Positions start..start+T-1 as a [T] int64 tensor on `device`."""
    if isinstance(start, Positions):
        return start.tokens(T)
    return torch.arange(start, start + T, device=device)


def attended_length(start: int | Positions, T: int) -> int:
    """How many cached positions the T queries' attention reads: start+T, or the whole context bucket."""
    return start.length if isinstance(start, Positions) else start + T


class StepPositions:
    """The decode steps' device positions: one start tensor, written in place each step (a fill, no host read and
    no copy), so that every step in a context bucket hands attention the same tensor and the same bucket length,
    which a captured graph reads from where it was captured."""

    def __init__(self, max_context: int, device: torch.device):
        self.max_context = max_context
        self.start = torch.zeros((), dtype=torch.int64, device=device)

    def at(self, start: int, T: int = 1) -> Positions:
        """T tokens at host position `start`, written into the step's tensor; the bucket holds start+T."""
        bucket = context_bucket(start + T, self.max_context)
        self.start.fill_(start)
        return Positions(self.start, bucket)

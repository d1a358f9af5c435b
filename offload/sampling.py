"""Picking the next token from a logits vector: repetition penalty, then greedy or temperature / top-k / top-p.

Each step matches the transformers logits processor of the same name, so a seeded run here and a
`model.generate(do_sample=True, ...)` run filter the vocabulary identically.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from csrc_py.logits import first_argmax, float32_vector
from offload.errors import OffloadError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters; repetition_penalty 1.0 is off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise OffloadError(f"temperature must be a finite number >= 0, got {self.temperature}; use 0 for greedy")
        if not (0 < self.top_p <= 1):
            raise OffloadError(f"top_p must be in (0, 1], got {self.top_p}; use 1.0 to disable it")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise OffloadError(f"top_k must be an integer >= 0, got {self.top_k}; use 0 to disable it")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise OffloadError(
                f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}; use 1.0 to disable it"
            )


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator | None:
    """A generator seeded with `seed` on `device`, or None (the global RNG) when no seed is given."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def plain_greedy(params: SamplingParams) -> bool:
    """Whether the next token is the logits' own argmax (greedy, no repetition penalty)."""
    return params.temperature == 0 and params.repetition_penalty == 1.0


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    seen_ids: torch.Tensor,
) -> int:
    """The next token id from `logits` [V] float32; `seen_ids` [N] int64 are the prompt and generated ids so far.
    (Generate takes a `plain_greedy` token from its finiteness pass instead.)"""
    scores = logits
    if params.repetition_penalty != 1.0 and seen_ids.numel() > 0:
        scores = apply_repetition_penalty(scores, seen_ids, params.repetition_penalty)
    if params.temperature == 0:
        return greedy(scores)

    scores = warp_logits(scores, params)
    probs = torch.softmax(scores, dim=-1)
    if generator is not None and probs.device != generator.device:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))


def greedy(scores: torch.Tensor) -> int:
    """torch.argmax(scores) for scores [V]; a CPU float32 vector goes through csrc_py.logits.first_argmax (the same
    index, ~4x faster over a 151,936-token vocabulary), anything else, and NaN or inf, through torch."""
    vector = float32_vector(scores)
    index = first_argmax(vector) if vector is not None else -1
    return index if index >= 0 else int(torch.argmax(scores))


def warp_logits(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature (> 0), then top-k, then top-p (transformers' warper order); filtered tokens get -inf."""
    scores = scores / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        # Everything below the k-th largest score goes; ties with it stay, as in TopKLogitsWarper.
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if params.top_p < 1.0:
        scores = _top_p(scores, params.top_p)
    return scores


def apply_repetition_penalty(scores: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative scores of every seen id by `penalty` (RepetitionPenaltyLogitsProcessor)."""
    # Ids past the logits (an embedding larger than lm_head) cannot be generated, so they need no penalty: they are
    # sent to one padding slot that is dropped afterwards (no boolean indexing, so no device sync on a GPU).
    vocab = scores.shape[-1]
    ids = seen_ids.to(scores.device).clamp(max=vocab)
    padded = torch.nn.functional.pad(scores, (0, 1))
    seen = padded.gather(0, ids)
    return padded.scatter(0, ids, torch.where(seen < 0, seen * penalty, seen / penalty))[:vocab]


def _top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of top tokens whose probability reaches top_p (TopPLogitsWarper, keeping >= 1 token)."""
    sorted_scores, sorted_ids = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[-1] = False
    remove = remove_sorted.scatter(0, sorted_ids, remove_sorted)
    return scores.masked_fill(remove, -math.inf)

"""Next-token sampling, checked against transformers' logits processors."""
from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from offload.errors import OffloadError
from offload.sampling import SamplingParams, apply_repetition_penalty, make_generator, sample_next, warp_logits

V = 64
NO_IDS = torch.empty(0, dtype=torch.int64)


def _logits(seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * scale


def _draw(logits: torch.Tensor, params: SamplingParams, n: int, seed: int | None = 0) -> list[int]:
    generator = make_generator(seed)
    return [sample_next(logits, params, generator, NO_IDS) for _ in range(n)]


def test_greedy_is_argmax():
    for seed in range(20):
        logits = _logits(seed)
        assert sample_next(logits, SamplingParams(), None, NO_IDS) == int(logits.argmax())


def test_seeded_sampling_is_reproducible():
    logits = _logits(1, scale=0.5)
    params = SamplingParams(temperature=1.0, seed=123)
    first = _draw(logits, params, 50, seed=params.seed)
    assert first == _draw(logits, params, 50, seed=params.seed)
    assert first != _draw(logits, params, 50, seed=124)
    assert len(set(first)) > 5  # really sampling, not collapsing to one token


def test_top_k_one_is_greedy():
    for seed in range(10):
        logits = _logits(seed, scale=0.1)
        params = SamplingParams(temperature=1.5, top_k=1)
        assert set(_draw(logits, params, 20, seed=seed)) == {int(logits.argmax())}


def test_top_k_never_samples_outside_top_k():
    logits = _logits(2, scale=0.1)  # nearly flat, so a broken filter would show within a few draws
    allowed = set(torch.topk(logits, 5).indices.tolist())
    drawn = _draw(logits, SamplingParams(temperature=1.0, top_k=5), 300)
    assert set(drawn) <= allowed and len(set(drawn)) > 1


def test_top_p_never_samples_outside_nucleus():
    logits = _logits(3, scale=2.0)
    probs = torch.softmax(logits, -1)
    order = torch.argsort(probs, descending=True)
    cumulative = torch.cumsum(probs[order], 0)
    nucleus = set(order[: int((cumulative < 0.6).sum()) + 1].tolist())  # smallest top set reaching 0.6
    drawn = _draw(logits, SamplingParams(temperature=1.0, top_p=0.6), 400)
    assert set(drawn) <= nucleus and len(set(drawn)) > 1


def test_tiny_top_p_keeps_the_best_token():
    logits = _logits(4)
    assert set(_draw(logits, SamplingParams(temperature=1.0, top_p=1e-9), 20)) == {int(logits.argmax())}


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=10),
        SamplingParams(temperature=0.9, top_p=0.8),
        SamplingParams(temperature=1.0, top_k=20, top_p=0.5),
        SamplingParams(temperature=0.5, top_k=V + 10, top_p=0.95),
    ],
)
def test_warpers_match_transformers(params):
    warpers = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    for seed in range(5):
        logits = _logits(seed)
        logits[7] = logits[8]  # a tie, which top-k keeps together
        expected = LogitsProcessorList(warpers)(torch.zeros(1, 1, dtype=torch.int64), logits[None])[0]
        assert torch.equal(warp_logits(logits, params), expected)


def test_repetition_penalty_matches_transformers():
    seen = torch.tensor([3, 5, 5, 9, 0, 63], dtype=torch.int64)  # repeats included
    for penalty in (1.3, 0.7):
        logits = _logits(5)
        logits[5] = -abs(logits[5])
        logits[9] = abs(logits[9])
        expected = RepetitionPenaltyLogitsProcessor(penalty)(seen[None], logits[None].clone())[0]
        got = apply_repetition_penalty(logits, seen, penalty)
        assert torch.equal(got, expected)
        assert not torch.equal(got, logits)
        # an id past the logits (a tokenizer's added tokens) is ignored, not an error
        past_the_end = torch.cat([seen, torch.tensor([V + 4])])
        assert torch.equal(apply_repetition_penalty(logits, past_the_end, penalty), expected)


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.zeros(V)
    logits[10], logits[11] = 2.0, 1.5
    seen = torch.tensor([10], dtype=torch.int64)
    assert sample_next(logits, SamplingParams(), None, seen) == 10
    assert sample_next(logits, SamplingParams(repetition_penalty=2.0), None, seen) == 11


def test_sample_next_does_not_modify_logits():
    logits = _logits(6)
    before = logits.clone()
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.9, repetition_penalty=1.5)
    sample_next(logits, params, make_generator(0), torch.tensor([1, 2, 3]))
    assert torch.equal(logits, before)


def test_make_generator():
    assert make_generator(None) is None
    a, b = make_generator(7), make_generator(7)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"top_p": 0.0},
        {"top_p": 1.01},
        {"top_p": -0.5},
        {"top_k": -1},
        {"top_k": 2.5},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": -1.0},
    ],
)
def test_bad_params_raise(kwargs):
    with pytest.raises(OffloadError):
        SamplingParams(**kwargs)


def test_params_are_frozen():
    params = SamplingParams(temperature=0.5, top_k=3, top_p=0.9, repetition_penalty=1.1, seed=1)
    with pytest.raises(AttributeError):
        params.temperature = 1.0  # type: ignore[misc]

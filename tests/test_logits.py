"""The per-token passes over the logits (csrc_py.logits): the same answers as torch, which they replace."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from csrc_py.logits import BLOCK, all_finite, first_argmax
from offload.sampling import SamplingParams, greedy, sample_next


@pytest.mark.parametrize("size", [1, 7, 8, 9, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 151_936])
def test_first_argmax_is_torchs_argmax(size):
    g = torch.Generator().manual_seed(size)
    for _ in range(5):
        x = torch.randn(size, generator=g) * 10
        assert first_argmax(x.numpy()) == int(torch.argmax(x))


@pytest.mark.parametrize("case", ["ties across blocks", "ties in a block", "all equal", "signed zeros",
                                  "max at the end", "large values"])
def test_first_argmax_takes_the_first_of_equal_maxima(case):
    x = torch.full((3 * BLOCK + 11,), -1.0)
    if case == "ties across blocks":
        x[[BLOCK + 3, 2 * BLOCK + 1, 3 * BLOCK + 10]] = 5.0
    elif case == "ties in a block":
        x[[17, 18, 900]] = 2.5
    elif case == "all equal":
        x[:] = 0.25
    elif case == "signed zeros":
        x[40], x[41], x[BLOCK + 2] = -0.0, 0.0, 0.0
    elif case == "max at the end":
        x[-1] = 3.0
    else:
        x[:] = 3e38
        x[BLOCK * 2] = 3.1e38
    assert first_argmax(x.numpy()) == int(torch.argmax(x))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_first_argmax_leaves_nan_and_inf_to_the_caller(bad):
    x = torch.randn(5000)
    x[1234] = bad
    assert first_argmax(x.numpy()) == -1
    assert first_argmax(np.empty(0, np.float32)) == -1


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), float("-inf"), "overflowing sum"])
def test_all_finite_is_torchs_isfinite_all(bad):
    x = torch.randn(151_936)
    if bad == "overflowing sum":  # every value finite, their float32 sum is not
        x[:] = 3e38
    elif bad is not None:
        x[77_777] = bad
    assert all_finite(x.numpy()) == bool(torch.isfinite(x).all())


def test_greedy_sampling_picks_torchs_argmax_for_any_tensor():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32_000, generator=g)
    assert greedy(x) == int(torch.argmax(x))
    assert greedy(x.to(torch.bfloat16)) == int(torch.argmax(x.to(torch.bfloat16)))  # through torch
    assert greedy(x[::2]) == int(torch.argmax(x[::2]))  # not contiguous: through torch
    x[5] = float("nan")
    assert greedy(x) == int(torch.argmax(x))  # NaN: torch's answer (the generate loop refuses such logits first)
    y = torch.randn(1000, generator=g)
    assert sample_next(y, SamplingParams(), None, torch.empty(0, dtype=torch.long)) == int(torch.argmax(y))


def test_the_finiteness_pass_gives_greedy_sampling_its_argmax():
    from offload.errors import OffloadError
    from offload.generate import check_finite

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(151_936, generator=g)
    best = check_finite(logits.numpy(), 7, argmax=True)
    assert best == int(torch.argmax(logits))
    assert check_finite(logits.numpy(), 7) is None  # sampling with a temperature: no argmax pass
    assert check_finite(logits.double().numpy()[::-1], 7, argmax=True) == len(logits) - 1 - best  # made float32
    logits[5] = float("nan")
    for argmax in (True, False):
        with pytest.raises(OffloadError, match="position 7 hold NaN or inf"):
            check_finite(logits.numpy(), 7, argmax=argmax)

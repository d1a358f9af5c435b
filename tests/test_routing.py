"""Routing variants as pure functions (offload/model/routing.py), checked against their definitions."""
from __future__ import annotations

import torch

from offload.config import RouterConfig
from offload.model.routing import route


def logits(T: int = 32, E: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(T, E, generator=torch.Generator().manual_seed(seed))


def test_softmax_selection_bias_steers_choice_not_weights():
    """ERNIE-4.5: top-k of softmax + bias, weights the chosen experts' unbiased probabilities, renormalised."""
    cfg = RouterConfig(num_experts=8, top_k=3, has_correction_bias=True, norm_min=1e-12)
    x = logits()
    bias = torch.zeros(8)
    bias[5] = 1.0  # expert 5 wins every token's selection
    ids, weights = route(x, cfg, bias)
    probs = x.softmax(-1)
    assert (ids == 5).any(dim=-1).all()
    expected_ids = (probs + bias).topk(3, dim=-1).indices
    assert torch.equal(ids.sort(-1).values, expected_ids.sort(-1).values)
    chosen = probs.gather(1, ids)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True))
    plain_ids, _ = route(x, cfg)
    assert not torch.equal(plain_ids.sort(-1).values, ids.sort(-1).values)  # the bias changed some choices


def test_norm_min_floors_the_renormalising_sum():
    cfg = RouterConfig(num_experts=4, top_k=2, norm_min=0.5)
    x = torch.tensor([[10.0, 9.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    _, weights = route(x, cfg)
    probs = x.softmax(-1)
    top = probs.topk(2, dim=-1).values
    torch.testing.assert_close(weights[0], top[0] / top[0].sum())  # sum ~1 > 0.5: plain renormalisation
    torch.testing.assert_close(weights[1], top[1] / 0.5)  # sum 0.5: at the floor
    low = RouterConfig(num_experts=4, top_k=1, norm_min=0.5)
    _, weights = route(torch.zeros(1, 4), low)
    torch.testing.assert_close(weights, torch.tensor([[0.25 / 0.5]]))  # 0.25 < 0.5: divided by the floor

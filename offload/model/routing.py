"""Routing decisions as pure functions: router logits -> top-k expert ids and combine weights."""
from __future__ import annotations

import torch

from ..config import RouterConfig


def _group_mask(scores: torch.Tensor, cfg: RouterConfig, group_score: str) -> torch.Tensor:
    """Keep experts of the best `topk_group` of `n_group` groups: [T, E] bool."""
    T, E = scores.shape
    grouped = scores.view(T, cfg.n_group, E // cfg.n_group)
    if group_score == "max":  # DeepSeek-V2 group_limited_greedy
        ranks = grouped.max(dim=-1).values
    else:  # DeepSeek-V3 noaux_tc: sum of each group's two best
        ranks = grouped.topk(2, dim=-1).values.sum(dim=-1)
    best = ranks.topk(cfg.topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
    keep = torch.zeros_like(ranks, dtype=torch.bool).scatter_(1, best, True)
    return keep[:, :, None].expand(T, cfg.n_group, E // cfg.n_group).reshape(T, E)


def route(logits: torch.Tensor, cfg: RouterConfig, correction_bias: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (float32) -> (topk_ids [T, K] int64, topk_weights [T, K] float32).

    A correction bias [E] (DeepSeek-V3's e_score_correction_bias, ERNIE-4.5's moe_statics) is added to the scores
    for choosing experts only; the weights are always the unbiased scores of the chosen ones."""
    logits = logits.float()
    if cfg.scoring == "sigmoid":
        scores = logits.sigmoid()
        choice = scores + correction_bias if correction_bias is not None else scores
        if cfg.n_group > 1:
            choice = choice.masked_fill(~_group_mask(choice, cfg, "top2sum"), float("-inf"))
        ids = choice.topk(cfg.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        scores = logits.softmax(dim=-1)
        if cfg.topk_method == "group_limited_greedy" and cfg.n_group > 1:
            scores = scores.masked_fill(~_group_mask(scores, cfg, "max"), 0.0)
        if correction_bias is not None:
            ids = (scores + correction_bias).topk(cfg.top_k, dim=-1).indices
            weights = scores.gather(1, ids)
        else:
            weights, ids = scores.topk(cfg.top_k, dim=-1)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=cfg.norm_min)
    return ids, weights * cfg.routed_scaling_factor

"""Routed SwiGLU experts over stacked weights in torch: the device-tier compute of every backend.

    y [T, H] = sum_k weights[t, k] * down_r(silu(gate_r x[t]) * up_r x[t]),  r = rows[t, k]  (-1: skipped)

gate/up are [R, I, H] and down [R, H, I]: a layer's experts (reference backend) or a pool's rows (hybrid).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# On a GPU, up to this many (token, choice) pairs gather their experts' weights and run three batched matmuls:
# no host synchronisation and a fixed handful of kernels, where the grouped loop needs the per-expert counts on
# the host. The gather copies the weights, so on the CPU (bandwidth-bound) the grouped loop stays.
GATHER_MAX_PAIRS = 16


def swiglu_experts(x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                   down: torch.Tensor) -> torch.Tensor:
    if x.is_cuda and rows.numel() <= GATHER_MAX_PAIRS:
        return _gathered(x, rows, weights, gate, up, down)
    return _grouped(x, rows, weights, gate, up, down)


def _gathered(x, rows, weights, gate, up, down) -> torch.Tensor:
    T, K = rows.shape
    flat = rows.reshape(-1)
    keep = (flat >= 0).to(x.dtype)  # skipped pairs compute row 0 and get weight 0
    flat = flat.clamp(min=0)
    xs = x.repeat_interleave(K, dim=0).unsqueeze(1)  # [T*K, 1, H]
    h = F.silu(torch.bmm(xs, gate[flat].transpose(1, 2))) * torch.bmm(xs, up[flat].transpose(1, 2))  # [T*K, 1, I]
    out = torch.bmm(h, down[flat].transpose(1, 2)).view(T, K, -1)  # [T, K, H]
    combine = (weights.reshape(-1).to(x.dtype) * keep).view(T, K, 1)
    return (out * combine).sum(dim=1)


def _grouped(x, rows, weights, gate, up, down) -> torch.Tensor:
    y = torch.zeros_like(x)  # [T, H]
    flat = rows.reshape(-1)
    chosen = (flat >= 0).nonzero().squeeze(1)
    if chosen.numel() == 0:
        return y
    order = chosen[flat[chosen].argsort(stable=True)]  # pairs grouped by row
    used, counts = torch.unique_consecutive(flat[order], return_counts=True)
    token_of = order // rows.shape[1]
    combine = weights.reshape(-1)[order]
    begin = 0
    for row, count in zip(used.tolist(), counts.tolist()):
        tokens = token_of[begin : begin + count]
        h = x[tokens]  # [n, H]
        out = F.linear(F.silu(F.linear(h, gate[row])) * F.linear(h, up[row]), down[row])
        y.index_add_(0, tokens, out * combine[begin : begin + count, None].to(out.dtype))
        begin += count
    return y

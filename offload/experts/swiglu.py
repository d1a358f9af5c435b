"""Routed gated-MLP experts over stacked weights in torch: the device-tier compute of every backend.

    y [T, H] = sum_k weights[t, k] * down_r(act(gate_r x[t], up_r x[t])),  r = rows[t, k]  (-1: skipped)

gate/up are [R, I, H] and down [R, H, I]: a layer's experts (reference backend) or a pool's rows (hybrid); act is
the experts' ExpertActivation, and each projection adds its row's bias when the experts have biases.
`swiglu_experts` is the reference backend's and the host tier's; `swiglu_rows` the hybrid pool's, which reads the
rows in place with no host read (grouped matmuls).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..config import ExpertActivation
from .base import SILU, ExpertBiases

# On a GPU without the in-place grouped kernel (`reads_rows_in_place`), up to this many (token, choice) pairs
# gather their experts' weights and run three batched matmuls: no host synchronisation and a fixed handful of
# kernels, where the grouped loop needs the per-expert counts on the host. The gather copies the weights, so on
# the CPU (bandwidth-bound) the grouped loop stays.
GATHER_MAX_PAIRS = 16
# Compute capabilities whose grouped bf16 matmul is torch's CUTLASS kernel; elsewhere torch's grouped_mm is a
# loop that reads the group offsets back to the host.
GROUPED_MM_CAPABILITIES = (9, 10)


def gated(gate: torch.Tensor, up: torch.Tensor, activation: ExpertActivation) -> torch.Tensor:
    """The experts' activation on gate/up projections [..., I] -> [..., I]."""
    if activation.kind == "silu":
        return F.silu(gate) * up
    if activation.kind == "clamped_swiglu":
        gate = gate.clamp(max=activation.limit)
        up = up.clamp(-activation.limit, activation.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * activation.alpha))
    raise ValueError(f"unknown expert activation {activation.kind!r}")


def swiglu_experts(x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                   down: torch.Tensor, biases: ExpertBiases | None = None, activation: ExpertActivation = SILU
                   ) -> torch.Tensor:
    if x.is_cuda and rows.numel() <= GATHER_MAX_PAIRS:
        return _gathered(x, rows, weights, gate, up, down, biases, activation)
    return _grouped(x, rows, weights, gate, up, down, biases, activation)


def reads_rows_in_place(device: torch.device, dtype: torch.dtype, hidden: int, intermediate: int) -> bool:
    """Whether `swiglu_rows` runs on this device tier without a host read: always on the CPU (the simulated
    tier); on CUDA where torch's grouped matmul is its bf16 kernel (Hopper, Blackwell) and the rows are 16-byte
    aligned."""
    if device.type == "cpu":
        return True
    if device.type != "cuda" or dtype != torch.bfloat16 or hidden % 8 or intermediate % 8:
        return False
    return torch.cuda.get_device_capability(device)[0] in GROUPED_MM_CAPABILITIES


def swiglu_rows(x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                down: torch.Tensor, biases: ExpertBiases | None = None, activation: ExpertActivation = SILU
                ) -> torch.Tensor:
    """The sum of `swiglu_experts`, reading each used row's weights where they lie: the (token, choice) pairs
    are sorted by row and three grouped matmuls run over the rows' groups, so a row no pair uses is not read and
    no weight is copied. Pairs marked -1 sort after every row, past the last group, and are masked out of the
    combine. Fixed shapes and no host read: the group ends are computed on the device."""
    T, K = rows.shape
    R = gate.shape[0]
    key = torch.where(rows.reshape(-1) < 0, R, rows.reshape(-1))  # [P]: the pair's row, R for skipped pairs
    key, order = key.sort(stable=True)  # pairs grouped by row
    ends = torch.searchsorted(key, torch.arange(R, device=x.device), right=True, out_int32=True)  # [R]
    xs = x[order // K]  # [P, H]
    g = F.grouped_mm(xs, gate.transpose(1, 2), offs=ends)  # [P, I]
    u = F.grouped_mm(xs, up.transpose(1, 2), offs=ends)
    row_of_pair = key.clamp(max=R - 1)  # skipped pairs read row R-1's biases: masked below
    if biases is not None:
        g, u = g + biases.gate[row_of_pair], u + biases.up[row_of_pair]
    out = F.grouped_mm(gated(g, u, activation), down.transpose(1, 2), offs=ends)  # [P, H]
    if biases is not None:
        out = out + biases.down[row_of_pair]
    kept = key < R  # [P]
    combine = weights.reshape(-1)[order].to(out.dtype)  # [P]
    # Rows past the last group hold whatever the kernel left there (maybe NaN): where, not a product, drops them.
    out = torch.where(kept[:, None], out * combine[:, None], 0)
    by_pair = torch.empty_like(out).index_copy_(0, order, out)  # [P, H] back in (token, choice) order
    return by_pair.view(T, K, -1).sum(dim=1)


def _gathered(x, rows, weights, gate, up, down, biases, activation) -> torch.Tensor:
    T, K = rows.shape
    flat = rows.reshape(-1)
    keep = (flat >= 0).to(x.dtype)  # skipped pairs compute row 0 and get weight 0
    flat = flat.clamp(min=0)
    xs = x.repeat_interleave(K, dim=0).unsqueeze(1)  # [T*K, 1, H]
    g, u = torch.bmm(xs, gate[flat].transpose(1, 2)), torch.bmm(xs, up[flat].transpose(1, 2))  # [T*K, 1, I]
    if biases is not None:
        g, u = g + biases.gate[flat, None], u + biases.up[flat, None]
    out = torch.bmm(gated(g, u, activation), down[flat].transpose(1, 2))  # [T*K, 1, H]
    if biases is not None:
        out = out + biases.down[flat, None]
    out = out.view(T, K, -1)  # [T, K, H]
    combine = (weights.reshape(-1).to(x.dtype) * keep).view(T, K, 1)
    return (out * combine).sum(dim=1)


def _grouped(x, rows, weights, gate, up, down, biases, activation) -> torch.Tensor:
    def run_row(row: int, h: torch.Tensor) -> torch.Tensor:
        bias = biases.expert(row) if biases is not None else (None, None, None)
        return F.linear(gated(F.linear(h, gate[row], bias[0]), F.linear(h, up[row], bias[1]), activation), down[row],
                        bias[2])

    return grouped_rows(x, rows, weights, run_row)


def grouped_rows(x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor,
                 run_row: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """y [T, H] = sum over pairs with rows[t, k] >= 0 of weights[t, k] * run_row(rows[t, k], x[t]): one call of
    run_row (tokens [n, H] -> [n, H]) per used row, with the used rows and their counts read back to the host
    (one read of both: on a GPU each read waits for the device)."""
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
    used_rows, row_counts = torch.stack((used, counts)).tolist()
    for row, count in zip(used_rows, row_counts):
        tokens = token_of[begin : begin + count]
        out = run_row(row, x[tokens])  # [n, H]
        y.index_add_(0, tokens, out * combine[begin : begin + count, None].to(out.dtype))
        begin += count
    return y

"""The MoE layer through torch's bf16 matmul (oneDNN, AVX512-BF16 here): the prefill engine for formats and CPUs
where it beats the Numba kernels. int8/int4 experts are dequantized once per call into a scratch buffer."""
from __future__ import annotations

import numpy as np
import torch

from csrc_py import quant_kernels as qk
from csrc_py.expert_ffn import route
from csrc_py.formats import PackedMatrix


def expert_bf16(pm: PackedMatrix, e: int, scratch: np.ndarray | None = None) -> torch.Tensor:
    """Expert e of a packed stack as a bf16 tensor [O, K]: a view for bf16, a dequantized copy otherwise."""
    if pm.fmt == "bf16":
        return torch.from_numpy(pm.q[e].view(np.int16)).view(torch.bfloat16)
    out = scratch if scratch is not None else np.empty(pm.shape[1:], np.float32)
    if pm.fmt == "int8":
        qk.dequantize_q8(pm.q[e], pm.d[e].view(np.uint16), out)
    else:  # int4, or int4s (no offsets)
        qk.dequantize_q4(pm.q[e], pm.d[e].view(np.uint16), None if pm.m is None else pm.m[e].view(np.uint16), out)
    return torch.from_numpy(out).to(torch.bfloat16)


def moe_torch(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate: PackedMatrix,
              up: PackedMatrix, down: PackedMatrix) -> torch.Tensor:
    """x [T, H] -> float32 [T, H]; tokens grouped by expert, one matmul per used expert and matrix.
    Pairs with id -1 are skipped. The matmuls run in bf16 for bf16 activations; float32 activations keep float32
    (the weights are widened per expert), so a float32 model stays exact to its bf16 weights."""
    T, K = topk_ids.shape
    seg_expert, seg_start, row_of_pair, token_of_row = route(topk_ids.contiguous().numpy(), gate.shape[0])
    compute = torch.float32 if x.dtype == torch.float32 else torch.bfloat16
    xs = x.to(compute)[torch.from_numpy(token_of_row)]  # [R, H] rows sorted by expert
    out = torch.empty(xs.shape, dtype=torch.float32)
    scratch = {pm.shape[1:]: np.empty(pm.shape[1:], np.float32) for pm in (gate, down) if pm.fmt != "bf16"}
    for s, e in enumerate(seg_expert.tolist()):
        rows = slice(int(seg_start[s]), int(seg_start[s + 1]))
        g, u, d = (expert_bf16(pm, e, scratch.get(pm.shape[1:])).to(compute) for pm in (gate, up, down))
        h = torch.nn.functional.silu(xs[rows] @ g.T) * (xs[rows] @ u.T)
        out[rows] = (h @ d.T).float()
    rows = torch.from_numpy(row_of_pair)
    if len(token_of_row) == 0:  # every pair is computed elsewhere
        return torch.zeros(x.shape, dtype=torch.float32)
    picked = out[rows.clamp(min=0)].view(T, K, -1)  # [T, K, H]; skipped pairs get weight 0 below
    return torch.einsum("tkh,tk->th", picked, topk_weights.float() * (rows >= 0).view(T, K))

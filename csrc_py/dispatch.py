"""torch tensors in, torch tensors out: the entry points the runtime calls, each picking its engine per call.

Few tokens go to the fused Numba kernels (memory-bound: each weight byte is read once); from a measured number
of rows per expert on, formats for which torch's bf16 matmul is the faster engine go through csrc_py.torch_path.
"""
from __future__ import annotations

import numpy as np
import torch

from csrc_py.expert_ffn import NO_BIAS, SILU_ACT, moe_bf16, moe_q4, moe_q8
from csrc_py.formats import PackedMatrix
from csrc_py.linear import linear_bf16, linear_q4, linear_q8
from csrc_py.torch_path import expert_bf16, moe_torch

# Rows per expert (token-expert pairs / experts used) from which torch's bf16 matmul beats the fused kernel;
# None: never. Keyed by whether torch's bf16 matmul has native bf16 dot products (below): the fused int8/int4
# kernels won against torch on every ISA tier measured, so the kernel tier does not enter the choice.
# Measured with tools/bench_kernels.py (docs/benchmarks.md, "CPU expert kernels" and "ISA tiers"):
# - native bf16 (2-core Zen4, AVX512-BF16): the bf16 kernel is a GEMV at heart and loses from a few rows per expert
#   (crossover ~6 on a Qwen3 layer, ~2-3 on Mixtral); the int8/int4 kernels beat torch bf16 itself at 512 tokens
#   (1.4-2.5x), so dequantizing for torch never pays, and the portable microkernel still beat dequantize + torch 2x.
# - no native bf16 (AVX2 hosts: torch converts bf16 in software): torch lost to the fused kernel at every size
#   (a Qwen3 bf16 layer at 512 tokens: 6150 ms against 1536 ms on a Zen3), so every format stays fused.
_TORCH_MIN_ROWS: dict[bool, dict[str, int | None]] = {
    True: {"bf16": 4, "int8": None, "int4": None},
    False: {"bf16": None, "int8": None, "int4": None},
}


def torch_has_native_bf16() -> bool:
    """Whether torch's CPU bf16 matmul runs on oneDNN's native bf16 kernels (AVX512-BF16, AMX), as opposed to a
    software conversion (AVX2 hosts, or oneDNN switched off)."""
    return bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def torch_min_rows(native_bf16: bool) -> dict[str, int | None]:
    """Rows per expert from which each format goes to torch, next to a torch with or without native bf16."""
    return dict(_TORCH_MIN_ROWS[native_bf16])


TORCH_MIN_ROWS: dict[str, int | None] = torch_min_rows(torch_has_native_bf16())


def use_torch(fmt: str, rows: int, experts: int, thresholds: dict[str, int | None] | None = None) -> bool:
    """Whether `rows` token-expert pairs over at most `experts` experts run faster through torch's bf16 matmul
    (by this host's TORCH_MIN_ROWS unless `thresholds` are given)."""
    threshold = (TORCH_MIN_ROWS if thresholds is None else thresholds)[fmt]
    return threshold is not None and rows > 0 and rows >= threshold * min(experts, rows)


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


def moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate: PackedMatrix, up: PackedMatrix,
        down: PackedMatrix, biases: tuple[np.ndarray, ...] | None = None, act: np.ndarray = SILU_ACT
        ) -> torch.Tensor:
    """One MoE layer's routed experts (the experts contract of offload/experts/base.py); y has x's dtype.
    Pairs whose id is -1 are left out (a hybrid backend computes them elsewhere). `biases` (gate [E, I], up [E, I],
    down [E, H] float32) and `act` ([kind, alpha, limit], csrc_py.expert_ffn) describe experts other than plain
    SwiGLU; those always take the fused kernel."""
    plain = biases is None and act is SILU_ACT
    if plain and TORCH_MIN_ROWS[gate.fmt] is not None and \
            use_torch(gate.fmt, int((topk_ids >= 0).sum()), gate.shape[0]):
        _check_call(x, topk_ids, topk_weights, gate)
        return moe_torch(x, topk_ids.to(torch.int64), topk_weights, gate, up, down).to(x.dtype)
    return moe_fused(x, topk_ids, topk_weights, gate, up, down, biases, act)


def moe_fused(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate: PackedMatrix,
              up: PackedMatrix, down: PackedMatrix, biases: tuple[np.ndarray, ...] | None = None,
              act: np.ndarray = SILU_ACT) -> torch.Tensor:
    """As `moe`, always through the fused Numba kernel."""
    _check_call(x, topk_ids, topk_weights, gate)
    y = np.empty(x.shape, np.float32)
    kernel = {"bf16": moe_bf16, "int8": moe_q8, "int4": moe_q4}[gate.fmt]
    ids = topk_ids.detach().to("cpu", torch.int64).contiguous().numpy()
    bias = biases if biases is not None else (NO_BIAS,) * 3
    kernel(_f32(x), ids, _f32(topk_weights), *gate.bits(), *up.bits(), *down.bits(), *bias, act, y)
    return torch.from_numpy(y).to(x.dtype)


def _check_call(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate: PackedMatrix) -> None:
    if x.dim() != 2 or x.shape[1] != gate.shape[2] or topk_ids.shape != topk_weights.shape or \
            topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"expected x [T, {gate.shape[2]}] and topk ids/weights [T, K], got x {list(x.shape)}, "
                         f"ids {list(topk_ids.shape)}, weights {list(topk_weights.shape)}")


def linear(x: torch.Tensor, w: PackedMatrix) -> torch.Tensor:
    """y = x @ W.T for one packed matrix (a [1, O, K] stack); x [..., K] -> y [..., O] in x's dtype."""
    _, O, K = w.shape
    if w.shape[0] != 1 or x.shape[-1] != K:
        raise ValueError(f"expected one matrix [1, O, {x.shape[-1]}], got a stack {list(w.shape)}")
    rows = x.reshape(-1, K)
    if use_torch(w.fmt, rows.shape[0], 1):
        y = rows.to(torch.bfloat16) @ expert_bf16(w, 0).T
        return y.reshape(*x.shape[:-1], O).to(x.dtype)
    xf = _f32(rows)
    y = np.empty((xf.shape[0], w.padded_shape[1]), np.float32)
    if w.fmt == "bf16":
        linear_bf16(xf, w.q, y)
    elif w.fmt == "int8":
        linear_q8(xf, *w.bits(), y)
    else:
        linear_q4(xf, *w.bits(), y)
    return torch.from_numpy(y[:, :O]).reshape(*x.shape[:-1], O).to(x.dtype)

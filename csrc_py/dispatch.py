"""torch tensors in, torch tensors out: the entry points the runtime calls, each picking its engine per call.

Few tokens go to the fused Numba kernels (memory-bound: each weight byte is read once); from a crossover number of
rows per expert on, torch's matmul (csrc_py.torch_path) is the faster engine. The crossovers are measured on the
host at the first call of each engine class and cached on disk (csrc_py.crossover); OFFLOAD_CROSSOVERS=fixed, or a
failed measurement, uses the fixed thresholds below instead.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

from csrc_py import crossover, simd
from csrc_py.expert_ffn import NO_BIAS, SILU_ACT, moe_bf16, moe_q4, moe_q8
from csrc_py.formats import PackedMatrix, pack
from csrc_py.linear import linear_bf16, linear_q4, linear_q8
from csrc_py.torch_path import expert_bf16, moe_torch

# The fixed thresholds (OFFLOAD_CROSSOVERS=fixed, and the fallback when measuring fails): rows per expert (token-
# expert pairs / experts used) from which torch's matmul beats the fused kernel; None: never. Keyed by whether
# torch's bf16 matmul has native bf16 dot products (below). Measured with tools/bench_kernels.py
# (docs/benchmarks.md, "CPU expert kernels" and "ISA tiers"):
# - native bf16 (2-core Zen4, AVX512-BF16): the bf16 kernel is a GEMV at heart and loses from a few rows per expert
#   (crossover ~6 on a Qwen3 layer, ~2-3 on Mixtral); the int8/int4 kernels beat torch bf16 itself at 512 tokens
#   (1.4-2.5x), so dequantizing for torch never pays, and the portable microkernel still beat dequantize + torch 2x.
# - no native bf16 (AVX2 hosts: torch converts bf16 in software): torch lost to the fused kernel at every size
#   (a Qwen3 bf16 layer at 512 tokens: 6150 ms against 1536 ms on a Zen3), so every format stays fused.
_TORCH_MIN_ROWS: dict[bool, dict[str, int | None]] = {
    True: {"bf16": 4, "int8": None, "int4": None, "int4s": None},
    False: {"bf16": None, "int8": None, "int4": None, "int4s": None},
}


def torch_has_native_bf16() -> bool:
    """Whether torch's CPU bf16 matmul runs on oneDNN's native bf16 kernels (AVX512-BF16, AMX), as opposed to a
    software conversion (AVX2 hosts, or oneDNN switched off)."""
    return bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def torch_min_rows(native_bf16: bool) -> dict[str, int | None]:
    """The fixed rows per expert from which each format goes to torch, next to a torch with or without native
    bf16."""
    return dict(_TORCH_MIN_ROWS[native_bf16])


TORCH_MIN_ROWS: dict[str, int | None] = torch_min_rows(torch_has_native_bf16())


def use_torch(fmt: str, rows: int, experts: int, thresholds: dict[str, int | None] | None = None) -> bool:
    """Whether `rows` token-expert pairs over at most `experts` experts go to torch by the fixed thresholds
    (this host's TORCH_MIN_ROWS unless `thresholds` are given). The runtime's calls use the measured crossovers:
    `moe_uses_torch`, `linear_uses_torch`."""
    return crossover.torch_wins(rows, experts, (TORCH_MIN_ROWS if thresholds is None else thresholds)[fmt])


EVICT_BYTES = 64 << 20  # more than the last-level cache of a workstation CPU (32 MiB per Zen4 CCD)

_crossovers: crossover.Crossovers | None = None
_crossovers_state: tuple | None = None


def _host_state() -> tuple:
    """What the measured crossovers depend on that can change while a process runs (cheap to read per call)."""
    return numba.get_num_threads(), torch.get_num_threads(), torch.backends.mkldnn.enabled, simd.TIER


def crossovers() -> crossover.Crossovers:
    """This process's engine crossovers, made again when the thread counts or torch's bf16 path change."""
    global _crossovers, _crossovers_state
    state = _host_state()
    if _crossovers is None or state != _crossovers_state:
        key = crossover.host_key(torch_has_native_bf16())
        _crossovers = crossover.Crossovers(measure_engines, lambda fmt: TORCH_MIN_ROWS[fmt],
                                           crossover.CrossoverCache(crossover.cache_path(), key), crossover.mode())
        _crossovers_state = state
    return _crossovers


def set_crossovers(value: crossover.Crossovers | None) -> None:
    """Use `value` for the following calls (tests inject fake timings); None: make a new one at the next call."""
    global _crossovers, _crossovers_state
    _crossovers, _crossovers_state = value, (_host_state() if value is not None else None)


def _dtype_class(dtype: torch.dtype) -> str:
    """What torch computes in for activations of this dtype (moe_torch keeps float32, else bf16)."""
    return "f32" if dtype == torch.float32 else "bf16"


def moe_uses_torch(gate: PackedMatrix, pairs: int, dtype: torch.dtype = torch.float32) -> bool:
    """Whether a MoE layer call with `pairs` token-expert pairs over `gate`'s experts goes to torch (plain SwiGLU
    experts; others always take the fused kernel)."""
    E, I, H = gate.shape
    return crossover.torch_wins(pairs, E, crossovers().get("moe", gate.fmt, _dtype_class(dtype), H, I))


def linear_uses_torch(w: PackedMatrix, rows: int) -> bool:
    """Whether a dense linear over `rows` rows goes to torch (its torch path runs in bf16)."""
    _, O, K = w.shape
    return crossover.torch_wins(rows, 1, crossovers().get("linear", w.fmt, "bf16", O, K))


def prepare(moe_gates: list[PackedMatrix], linears: list[PackedMatrix], dtype: torch.dtype) -> None:
    """Resolve the crossovers of these matrices' classes now (from the cache, or measured and stored): a model's
    load pays the once-per-host measurement, not its first reply. `dtype`: the experts' activations."""
    for gate in moe_gates:
        moe_uses_torch(gate, 1, dtype)
    for w in linears:
        linear_uses_torch(w, 1)


def measure_engines(cls: crossover.EngineClass) -> crossover.Timings:
    """Time the fused kernel against torch on random weights of `cls`'s shape (crossover.time_engines): a MoE
    layer of one expert with top-1 routing (rows = rows per expert), or one dense matrix."""
    gen = torch.Generator().manual_seed(0)
    dtype = torch.float32 if cls.dtype == "f32" else torch.bfloat16
    flush = torch.ones(EVICT_BYTES // 4)  # read before every timed call: the weights then come from DRAM

    def matrix(o: int, k: int) -> PackedMatrix:
        return pack(torch.randn(1, o, k, generator=gen) / k ** 0.5, cls.fmt)

    if cls.kind == "moe":
        H, I = cls.dims
        mats = (matrix(I, H), matrix(I, H), matrix(H, I))
        x = torch.randn(max(crossover.ROWS), H, generator=gen).to(dtype)
        ids, weights = torch.zeros(len(x), 1, dtype=torch.int64), torch.ones(len(x), 1)
        return crossover.time_engines(lambda r: moe_fused(x[:r], ids[:r], weights[:r], *mats),
                                      lambda r: moe_torch(x[:r], ids[:r], weights[:r], *mats).to(dtype),
                                      before=flush.sum)
    O, K = cls.dims
    w = matrix(O, K)
    x = torch.randn(max(crossover.ROWS), K, generator=gen)
    return crossover.time_engines(lambda r: _linear_fused(x[:r], w), lambda r: _linear_torch(x[:r], w),
                                  before=flush.sum)


def describe_crossovers() -> str:
    """One line per engine class dispatched so far: the crossover, where it came from, and the kernels' tier."""
    lines = [f"{label}: {'never' if value is None else f'from {value} rows per expert'} to torch ({source})"
             for label, (value, source) in sorted(crossovers().choices.items())]
    mode = crossover.mode()
    return f"engine crossovers (tier {simd.TIER}, {mode}; fixed {TORCH_MIN_ROWS}):" + \
        "".join(f"\n  {line}" for line in lines or ["none dispatched yet"])


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
    # every pair first (no torch op): only a call that could go to torch counts its computed pairs
    if plain and moe_uses_torch(gate, topk_ids.numel(), x.dtype) and \
            moe_uses_torch(gate, int((topk_ids >= 0).sum()), x.dtype):
        _check_call(x, topk_ids, topk_weights, gate)
        return moe_torch(x, topk_ids.to(torch.int64), topk_weights, gate, up, down).to(x.dtype)
    return moe_fused(x, topk_ids, topk_weights, gate, up, down, biases, act)


def moe_fused(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate: PackedMatrix,
              up: PackedMatrix, down: PackedMatrix, biases: tuple[np.ndarray, ...] | None = None,
              act: np.ndarray = SILU_ACT) -> torch.Tensor:
    """As `moe`, always through the fused Numba kernel."""
    _check_call(x, topk_ids, topk_weights, gate)
    y = np.empty(x.shape, np.float32)
    kernel = {"bf16": moe_bf16, "int8": moe_q8, "int4": moe_q4, "int4s": moe_q4}[gate.fmt]  # int4s: m is None
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
    y = _linear_torch(rows, w) if linear_uses_torch(w, rows.shape[0]) else _linear_fused(rows, w)
    return y.reshape(*x.shape[:-1], O).to(x.dtype)


def _linear_torch(rows: torch.Tensor, w: PackedMatrix) -> torch.Tensor:
    """rows [N, K] @ W.T through torch's bf16 matmul (int8/int4 dequantized first) -> bf16 [N, O]."""
    return rows.to(torch.bfloat16) @ expert_bf16(w, 0).T


def _linear_fused(rows: torch.Tensor, w: PackedMatrix) -> torch.Tensor:
    """rows [E*N, K] through the Numba kernels -> float32 [E*N, O], rows e*N.. through matrix e of the stack (a
    dense linear's stack is one matrix)."""
    xf = _f32(rows)
    y = np.empty((xf.shape[0], w.padded_shape[1]), np.float32)
    if w.fmt == "bf16":
        linear_bf16(xf, w.q, y)
    elif w.fmt == "int8":
        linear_q8(xf, *w.bits(), y)
    else:  # int4, int4s (bits' m is None)
        linear_q4(xf, *w.bits(), y)
    return torch.from_numpy(y[:, :w.shape[1]])


def heads_linear(x: torch.Tensor, w: PackedMatrix) -> torch.Tensor:
    """y[h] = x[h] @ W[h].T for a stack of matrices [heads, O, K]: x [heads, N, K] -> [heads, N, O] in x's dtype,
    every head in one grouped kernel call (MLA's absorbed W_UK and W_UV)."""
    heads, O, K = w.shape
    if x.dim() != 3 or x.shape[0] != heads or x.shape[2] != K:
        raise ValueError(f"expected x [{heads}, N, {K}] for a stack of {heads} matrices [{O}, {K}], "
                         f"got {list(x.shape)}")
    N = x.shape[1]
    return _linear_fused(x.reshape(heads * N, K), w).reshape(heads, N, O).to(x.dtype)

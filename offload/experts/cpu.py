"""One MoE layer's routed experts held in host RAM and computed by the Numba kernels of csrc_py.

    experts = CpuExperts(weights, "int8")        # quantizes at construction
    y = experts(x, topk_ids, topk_weights)       # blocking
    handle = experts.submit(x, topk_ids, topk_weights)
    ...                                          # other work while the kernel runs (it releases the GIL)
    y = experts.wait(handle)
"""
from __future__ import annotations

import time
from concurrent.futures import Future
from typing import NamedTuple

import numpy as np
import torch

from csrc_py import dispatch, threads
from csrc_py.expert_ffn import CLAMPED_SWIGLU, NO_BIAS, SILU, SILU_ACT, moe_from_block
from csrc_py.formats import FORMATS, PackedMatrix, arrays_per_matrix, check_format, expert_arrays, pack, unpack_arrays
from offload.config import ExpertActivation
from offload.errors import FormatError
from offload.experts.base import SILU as SILU_ACTIVATION
from offload.experts.base import ExpertBiases, ExpertWeights, HostStacks
from offload.experts.worker import background

ACTIVATION_KINDS = {"silu": SILU, "clamped_swiglu": CLAMPED_SWIGLU}


def kernel_activation(activation: ExpertActivation) -> np.ndarray:
    """An ExpertActivation as the kernels' act argument [kind, alpha, limit]."""
    if activation == SILU_ACTIVATION:
        return SILU_ACT
    return np.array([ACTIVATION_KINDS[activation.kind], activation.alpha, activation.limit], np.float32)


class KernelArguments(NamedTuple):
    """One layer's experts as compiled callers take them (csrc_py.expert_ffn.packed_experts)."""

    gate: tuple  # (q, d, m): csrc_py.formats.PackedMatrix.kernel_tuple
    up: tuple
    down: tuple
    biases: tuple  # (gate [E, I], up [E, I], down [E, H]) float32; [0, 0] arrays for none
    act: np.ndarray  # [kind, alpha, limit]


class CpuExperts(HostStacks):
    """Routed experts of one MoE layer in format "bf16", "int8", "int4" or "int4s" (docs/formats.md)."""

    def __init__(self, weights: ExpertWeights, fmt: str = "int8") -> None:
        check_format(fmt)
        E, I, H = weights.gate.shape
        if weights.up.shape != (E, I, H) or weights.down.shape != (E, H, I):
            raise FormatError(f"expert weights must be gate/up [E, I, H] and down [E, H, I], got gate "
                              f"{list(weights.gate.shape)}, up {list(weights.up.shape)}, down "
                              f"{list(weights.down.shape)}")
        self._set(pack(weights.gate, fmt), pack(weights.up, fmt), pack(weights.down, fmt), weights.biases,
                  weights.activation)

    @classmethod
    def from_packed(cls, gate: PackedMatrix, up: PackedMatrix, down: PackedMatrix, biases: ExpertBiases | None = None,
                    activation: ExpertActivation = SILU_ACTIVATION) -> CpuExperts:
        """Wrap already packed matrices (e.g. a pre-quantized store) without copying them. Writable arrays
        reuse the kernels `warmup` compiled; read-only ones (a read-only mmap) compile one more signature."""
        experts = cls.__new__(cls)
        experts._set(gate, up, down, biases, activation)
        return experts

    def _set(self, gate: PackedMatrix, up: PackedMatrix, down: PackedMatrix, biases: ExpertBiases | None,
             activation: ExpertActivation) -> None:
        E, I, H = gate.shape
        if {gate.fmt, up.fmt, down.fmt} != {gate.fmt} or up.shape != (E, I, H) or down.shape != (E, H, I):
            raise FormatError(f"packed experts disagree: gate {gate.fmt}{list(gate.shape)}, up {up.fmt}"
                              f"{list(up.shape)}, down {down.fmt}{list(down.shape)}; pack all three from one layer")
        self.gate, self.up, self.down = gate, up, down
        self.biases = biases.to(device="cpu", dtype=torch.float32) if biases is not None else None
        self.activation = activation
        self._act = kernel_activation(activation)
        self._bias_arrays = tuple(b.numpy() for b in self.biases.stacks()) if self.biases is not None else None
        self.kernel_arguments = KernelArguments(gate.kernel_tuple(), up.kernel_tuple(), down.kernel_tuple(),
                                                self._bias_arrays or (NO_BIAS,) * 3, self._act)

    @property
    def fmt(self) -> str:
        return self.gate.fmt

    def packed_expert(self, expert: int) -> tuple[torch.Tensor, ...]:
        """One expert's packed arrays (gate's, up's, down's: csrc_py.formats.expert_arrays) and its float32
        biases, sharing host memory."""
        biases = self.biases.expert(expert) if self.biases is not None else ()
        return (*(a for pm in (self.gate, self.up, self.down) for a in expert_arrays(pm, expert)), *biases)

    def unpacked(self, packed: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """gate, up, down dequantized by torch where the arrays lie (bf16 stays bf16; int8/int4 become float32,
        bit for bit the CPU side's `unpack`), then the biases."""
        n = arrays_per_matrix(self.fmt)
        matrices = tuple(unpack_arrays(self.fmt, *pm.shape[1:], *packed[i * n : (i + 1) * n])
                         if self.fmt != "bf16" else packed[i]
                         for i, pm in enumerate((self.gate, self.up, self.down)))
        return (*matrices, *packed[3 * n :])

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """y [T, H] = sum_k topk_weights[:, k] * expert_{topk_ids[:, k]}(x), in x's dtype and on x's device.
        An id of -1 leaves its pair out (a hybrid backend computes those elsewhere)."""
        y = dispatch.moe(x.to("cpu"), topk_ids, topk_weights, self.gate, self.up, self.down, self._bias_arrays,
                         self._act)
        return y.to(x.device)

    def run_block(self, block: np.ndarray, y: np.ndarray) -> bool:
        """y [T, H] = the experts of a block of inputs [T, H + 2K] float32 (x, the ids, the weights: the layout of
        csrc_py.expert_ffn.moe_from_block), in one compiled call, where the fused kernel is the engine `__call__`
        would take on float32 inputs; False, with nothing done, where torch may be (plain experts on many rows:
        `__call__` decides)."""
        T, H = y.shape
        if not self.fused_engine(T * ((block.shape[1] - H) // 2), torch.float32):
            return False
        moe_from_block(block, *self.kernel_arguments, y)
        return True

    def fused_engine(self, pairs: int, dtype: torch.dtype) -> bool:
        """Whether a call of `pairs` token-expert pairs on `dtype` activations takes the fused kernel: experts with
        biases or another activation always do, plain ones up to the crossover measured on this host (the first
        check of csrc_py.dispatch.moe, which also counts the pairs marked -1 before choosing torch)."""
        plain = self._bias_arrays is None and self._act is SILU_ACT  # dispatch.moe's test
        return not plain or not dispatch.moe_uses_torch(self.gate, pairs, dtype)

    def submit(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Future[torch.Tensor]:
        """Start the layer on the background thread; the inputs must stay unchanged until `wait`."""
        return background().submit(self._run, x, topk_ids, topk_weights)

    def wait(self, handle: Future[torch.Tensor]) -> torch.Tensor:
        """The result of a `submit` (re-raises its exception)."""
        return handle.result()

    def _run(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        threads.apply()  # Numba's thread count is per calling thread
        return self(x, topk_ids, topk_weights)


def warmup(fmt: str, host_link: bool = False) -> float:
    """Compile, or load from Numba's on-disk cache, every kernel a CpuExperts and a dense linear of format `fmt`
    run (both the few-token and the many-token engines), and with `host_link` the block entry a hybrid layer's CPU
    side calls (offload.experts.link); returns the seconds spent."""
    check_format(fmt)
    start = time.perf_counter()
    threads.threading_layer()
    E, H, I, K = 4, 64, 32, 2
    gen = torch.Generator().manual_seed(0)
    weights = ExpertWeights(*(torch.randn(shape, generator=gen) for shape in ((E, I, H), (E, I, H), (E, H, I))))
    experts = CpuExperts(weights, fmt)
    dense = pack(weights.gate[:1], fmt)
    # One token takes the fused kernels; 4 rows per expert take the torch path where a format has one.
    for T in (1, 2 * E):
        x = torch.randn(T, H, generator=gen)
        experts(x, torch.randint(0, E, (T, K), generator=gen), torch.rand(T, K, generator=gen))
        dispatch.linear(x, dense)
    if host_link:
        experts.run_block(np.zeros((1, H + 2 * K), np.float32), np.empty((1, H), np.float32))
    return time.perf_counter() - start


__all__ = ["FORMATS", "CpuExperts", "warmup"]

"""Host-tier experts kept in the model's own float dtype and computed by torch on the CPU.

The CPU workers' formats are bf16, int8 and int4. A float32 (or float16) model offloaded to them would change
its numbers with its placement: an expert on the device tier computes with the checkpoint's weights, the same
expert on the host with bf16-rounded ones. Unless the user asks for a host format, the host tier holds experts
as the device tier does, and for a float dtype other than bf16 that is this backend: the device tier's own
grouped SwiGLU, run on the CPU, so each expert's output is the one the device tier computes.
"""
from __future__ import annotations

from concurrent.futures import Future

import torch

from .base import ExpertWeights, HostStacks
from .swiglu import swiglu_experts
from .worker import background

FLOAT_FORMATS = {"float32": torch.float32, "float16": torch.float16}  # host format -> dtype kept in host RAM


class TorchHostExperts(HostStacks):
    """Routed experts of one MoE layer in host RAM as float32 or float16, behind the CpuExperts interface."""

    def __init__(self, weights: ExpertWeights, fmt: str) -> None:
        dtype = FLOAT_FORMATS[fmt]
        self.fmt = fmt
        self.gate, self.up, self.down = (w.to(device="cpu", dtype=dtype).contiguous()
                                         for w in (weights.gate, weights.up, weights.down))
        self.biases = weights.biases.to(device="cpu", dtype=dtype) if weights.biases is not None else None
        self.activation = weights.activation

    def packed_expert(self, expert: int) -> tuple[torch.Tensor, ...]:
        """One expert's gate [I, H], up [I, H], down [H, I] (and its biases [I], [I], [H]): views of host RAM."""
        biases = self.biases.expert(expert) if self.biases is not None else ()
        return self.gate[expert], self.up[expert], self.down[expert], *biases

    def unpacked(self, packed: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return packed  # float weights need no unpacking

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """y [T, H] in x's dtype and on x's device; an id of -1 leaves its pair out (computed elsewhere)."""
        h = x.to(device="cpu", dtype=self.gate.dtype)
        y = swiglu_experts(h, topk_ids.cpu(), topk_weights.cpu(), self.gate, self.up, self.down, self.biases,
                           self.activation)
        return y.to(device=x.device, dtype=x.dtype)

    def submit(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Future[torch.Tensor]:
        """Start the layer on the background thread (torch releases the GIL in its kernels)."""
        return background().submit(self, x, topk_ids, topk_weights)

    def wait(self, handle: Future[torch.Tensor]) -> torch.Tensor:
        return handle.result()

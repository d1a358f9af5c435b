"""HostLink: one MoE layer's traffic between the device tier and the CPU workers, one copy each way.

    handle = link.submit(experts, x, host_ids, weights)   # packs, copies down, starts the CPU workers
    ...                                                   # device work queued meanwhile (shared, resident experts)
    link.add_result(y, handle)                            # y += the CPU part, copied up

x [T, H], the pairs' host expert ids [T, K] (-1: the device's pair) and their weights [T, K] are packed on the
device into one float32 block [T, H + 2K] (ids below 2**24 are exact in float32) and go down in one copy into a
pinned host buffer, non-blocking; the worker thread waits for that copy's event, not the host's launch thread.
The result [T, H] float32 comes back the same way from a second pinned buffer. Experts on the CPU kernels
(CpuExperts.run_block) read the block where it lies and write the result buffer in one compiled call; others get
x, ids and weights as tensors. On the CPU tier the buffers are plain tensors and the copies plain copies: the same
code and the same numbers.
"""
from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import torch

from csrc_py import threads as cpu_threads

from .base import Experts
from .worker import background


class HostLink:
    """One per model, shared by its MoE layers: they run one after the other, and a layer's CPU result is read
    (and its copy up ordered by `uploaded`) before the next layer writes the buffers."""

    def __init__(self, hidden: int, device: torch.device):
        self.hidden, self.device = hidden, device
        self.cuda = device.type == "cuda"
        self.inputs = self.results = torch.empty(0, 0)  # grown by the first call
        self._views: tuple[torch.Tensor, np.ndarray, np.ndarray] | None = None  # _host_views'
        self.uploaded: torch.cuda.Event | None = None  # the last copy up, which reads `results`

    def submit(self, experts: Experts, x: torch.Tensor, host_ids: torch.Tensor, weights: torch.Tensor
               ) -> Future[torch.Tensor]:
        """Start experts(x, host_ids, weights) on the CPU workers; the device tensors may change afterwards."""
        T = x.shape[0]
        packed = torch.cat((x.float(), host_ids.float(), weights.float()), dim=1)  # [T, H + 2K]
        self._reserve(T, packed.shape[1])
        inputs = self.down(packed, self.inputs[:T])
        ready = None
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record()
        return background().submit(self._compute, experts, inputs, ready)

    def add_result(self, y: torch.Tensor, handle: Future[torch.Tensor]) -> None:
        """y [T, H] += the CPU workers' result (re-raises their exception)."""
        y += self.up(handle.result()).to(y.dtype)

    def down(self, packed: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
        """The one copy down of a layer's CPU inputs."""
        return host.copy_(packed, non_blocking=True)

    def up(self, result: torch.Tensor) -> torch.Tensor:
        """The one copy up of a layer's CPU result."""
        on_device = result.to(self.device, non_blocking=True)
        if self.cuda:
            self.uploaded = torch.cuda.Event()
            self.uploaded.record()
        return on_device

    def _compute(self, experts: Experts, inputs: torch.Tensor, ready: torch.cuda.Event | None) -> torch.Tensor:
        """On the worker thread: wait for the inputs to land, run the experts, leave the result in `results`.
        Experts with a `run_block` (CpuExperts) take the block as it lies and write `results` themselves, in one
        compiled call; others get x, ids and weights as tensors."""
        cpu_threads.apply()  # Numba's thread count is per calling thread: the configured one, not all CPUs
        if ready is not None:
            ready.synchronize()
        if self.uploaded is not None:
            self.uploaded.synchronize()  # the previous result's copy up has read the buffer
        T = inputs.shape[0]
        run_block = getattr(experts, "run_block", None)
        if run_block is not None:
            inputs_np, results_np = self._host_views()
            if run_block(inputs_np[:T], results_np[:T]):
                return self.results[:T]
        H = self.hidden
        K = (inputs.shape[1] - H) // 2
        x, ids, weights = inputs.split((H, K, K), dim=1)
        return self.results[:T].copy_(experts(x.contiguous(), ids.long(), weights.contiguous()))

    def _host_views(self) -> tuple[np.ndarray, np.ndarray]:
        """The two buffers as numpy arrays, made on the worker thread after `_reserve` replaced them."""
        if self._views is None or self._views[0] is not self.inputs:
            self._views = (self.inputs, self.inputs.numpy(), self.results.numpy())
        return self._views[1:]

    @staticmethod
    def buffer_bytes(hidden: int, top_k: int, tokens: int) -> int:
        """The pinned buffers' size once a forward of `tokens` tokens has run: inputs [T, H + 2K] and results
        [T, H], float32."""
        return tokens * (2 * hidden + 2 * top_k) * 4

    def _reserve(self, tokens: int, width: int) -> None:
        """Host buffers for `tokens` rows of `width` inputs (grown, never shrunk: a prefill's size is kept for the
        next one)."""
        if self.inputs.shape[0] >= tokens and self.inputs.shape[1] == width:
            return
        with torch.inference_mode(False):  # plain tensors: the worker thread, outside inference mode, writes them
            self.inputs = torch.empty(tokens, width, pin_memory=self.cuda)
            self.results = torch.empty(tokens, self.hidden, pin_memory=self.cuda)

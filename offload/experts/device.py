"""Routed experts on the device tier: one layer's pinned experts and cache slots in one preallocated stack,
the copy engine that fills slots from host storage, and the grouped SwiGLU over resident experts."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..config import ExpertActivation
from .base import SILU, ExpertBiases
from .swiglu import swiglu_experts

# expert -> CPU gate, up, down (then its gate, up, down biases when the experts have them)
HostReader = Callable[[int], tuple[torch.Tensor, ...]]


class DeviceExpertPool:
    """Rows 0..P-1 hold the pinned experts, rows P..P+S-1 the cache slots: gate/up [P+S, I, H], down [P+S, H, I],
    and biases [P+S, I], [P+S, I], [P+S, H] for experts that have them."""

    def __init__(self, pinned: Sequence[int], num_slots: int, hidden: int, intermediate: int, dtype: torch.dtype,
                 device: torch.device, biased: bool = False, activation: ExpertActivation = SILU):
        rows = len(pinned) + num_slots
        self.gate = torch.empty(rows, intermediate, hidden, dtype=dtype, device=device)
        self.up = torch.empty(rows, intermediate, hidden, dtype=dtype, device=device)
        self.down = torch.empty(rows, hidden, intermediate, dtype=dtype, device=device)
        self.biases = ExpertBiases(*(torch.empty(rows, width, dtype=dtype, device=device)
                                     for width in (intermediate, intermediate, hidden))) if biased else None
        self.activation = activation
        self.pinned_row = {expert: row for row, expert in enumerate(pinned)}
        self.num_pinned = len(pinned)
        self.num_slots = num_slots

    def slot_row(self, slot: int) -> int:
        return self.num_pinned + slot

    @property
    def stacks(self) -> list[torch.Tensor]:
        """Every per-row tensor, in HostReader order: gate, up, down (and their biases)."""
        return [self.gate, self.up, self.down, *(self.biases.stacks() if self.biases is not None else ())]

    @property
    def expert_bytes(self) -> int:
        return sum(stack[0].nbytes for stack in self.stacks) if len(self.gate) else 0

    @property
    def nbytes(self) -> int:
        return sum(stack.nbytes for stack in self.stacks)

    def compute(self, x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """y [T, H] = sum over (t, k) with rows[t, k] >= 0 of weights[t, k] * expert_row(x[t]).
        rows [T, K] are pool rows, -1 where the pair is computed elsewhere."""
        return swiglu_experts(x, rows, weights, self.gate, self.up, self.down, self.biases, self.activation)


class ExpertUploader:
    """Copies experts from host storage into pool rows.

    On CUDA the host tensors go through pinned staging buffers and a side stream, and each row records an event
    that compute waits on only when it uses that row. On the CPU tier the copy is a plain (real) copy, so the
    behaviour and the byte counts are the same."""

    def __init__(self, pool: DeviceExpertPool, read_host: HostReader, device: torch.device):
        self.pool, self.read_host, self.device = pool, read_host, device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.stream = torch.cuda.Stream(device)
            self.events: dict[int, torch.cuda.Event] = {}
            shapes = [stack.shape[1:] for stack in pool.stacks]
            # Two staging sets: the CPU fills one while the previous copy drains from the other.
            self.staging = [[torch.empty(s, dtype=pool.gate.dtype, pin_memory=True) for s in shapes] for _ in range(2)]
            self.staging_done: list[torch.cuda.Event | None] = [None, None]
            self.turn = 0

    def copy(self, expert: int, row: int) -> None:
        host = self.read_host(expert)
        if not self.cuda:
            for stack, src in zip(self.pool.stacks, host, strict=True):
                stack[row].copy_(src)
            return
        turn, self.turn = self.turn, 1 - self.turn
        if self.staging_done[turn] is not None:
            self.staging_done[turn].synchronize()  # the copy that last used this staging set has finished
        staged = self.staging[turn]
        for buffer, src in zip(staged, host, strict=True):
            buffer.copy_(src)
        # The row may still be read by compute queued on the main stream (an evicted expert): wait for it.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for stack, buffer in zip(self.pool.stacks, staged):
                stack[row].copy_(buffer, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.events[row] = event
        self.staging_done[turn] = event

    def wait(self, row: int) -> None:
        """Make the compute stream wait until `row` holds its expert (no-op on the CPU tier)."""
        if self.cuda:
            event = self.events.pop(row, None)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)

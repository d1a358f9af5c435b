"""Routed experts on the device tier: one layer's pinned experts and cache slots in one preallocated stack,
the copy engine that fills slots from host storage, and the grouped SwiGLU over resident experts."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..config import ExpertActivation
from .base import SILU, ExpertBiases
from .swiglu import reads_rows_in_place, swiglu_experts, swiglu_rows

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
        self.in_place = reads_rows_in_place(self.gate.device, dtype, hidden, intermediate)

    @property
    def num_rows(self) -> int:
        return self.num_pinned + self.num_slots

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
        rows [T, K] are pool rows, -1 where the pair is computed elsewhere. The rows are read in place by grouped
        matmuls where the device has them (no host read); elsewhere (a GPU without the grouped kernel) a decode
        step gathers its pairs' rows."""
        compute = swiglu_rows if self.in_place else swiglu_experts
        return compute(x, rows, weights, self.gate, self.up, self.down, self.biases, self.activation)


STAGING_RING_ENTRIES = 8  # experts the shared ring stages at once (counted in the plan's host budget)


class StagingRing:
    """Pinned host buffers, each one expert in the device format, and the side stream that copies them up, shared
    by every layer's uploads to a GPU (not two buffers per layer: DeepSeek-V3's 58 MoE layers would pin 9.5 GiB).
    Copies leave in order, so entries are taken in turn; an entry is reused once the copy that last read it has
    finished. On the CPU tier there are no buffers and every entry is always free."""

    def __init__(self, shapes: Sequence[torch.Size], dtype: torch.dtype, device: torch.device,
                 entries: int = STAGING_RING_ENTRIES):
        self.cuda = device.type == "cuda"
        self.entries = entries
        self.buffers = [[torch.empty(s, dtype=dtype, pin_memory=True) for s in shapes] for _ in range(entries)] \
            if self.cuda else []
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.done: list[torch.cuda.Event | None] = [None] * entries  # the last copy out of each entry
        self.turn = 0

    def ready(self) -> bool:
        """Whether the entry next in turn is free now (queried, never waited for)."""
        event = self.done[self.turn]
        return event is None or event.query()

    def take(self) -> int:
        """The next entry in turn, once the copy that last read it has finished."""
        entry = self.turn
        if not self.ready():
            self.done[entry].synchronize()
        self.turn = (entry + 1) % self.entries
        return entry


class ExpertUploader:
    """Copies experts from host storage into pool rows.

    On CUDA the host tensors go through an entry of the shared staging ring and a side stream; the row records an
    event that the compute stream waits on (on the device, not the host) before the layer reads its rows. On the
    CPU tier the copy is a plain (real) copy, so the behaviour and the byte counts are the same."""

    def __init__(self, pool: DeviceExpertPool, read_host: HostReader, device: torch.device, ring: StagingRing):
        self.pool, self.read_host, self.device, self.ring = pool, read_host, device, ring
        self.cuda = device.type == "cuda"
        self.events: dict[int, torch.cuda.Event] = {}  # CUDA: row -> its copy, not yet waited for

    def copy(self, expert: int, row: int) -> None:
        """Start copying `expert` into `row` (waiting for a staging entry if none is free)."""
        if not self.cuda:
            for stack, src in zip(self.pool.stacks, self.read_host(expert), strict=True):
                stack[row].copy_(src)
            return
        entry = self.ring.take()
        staged = self.ring.buffers[entry]
        for buffer, src in zip(staged, self.read_host(expert), strict=True):
            buffer.copy_(src)
        # The row may still be read by compute queued on the main stream (an evicted expert): wait for it.
        stream = self.ring.stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for stack, buffer in zip(self.pool.stacks, staged):
                stack[row].copy_(buffer, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        self.events[row] = event
        self.ring.done[entry] = event

    def wait(self) -> None:
        """Make the compute stream wait until every row copied into holds its expert (no-op on the CPU tier)."""
        if self.events:
            stream = torch.cuda.current_stream(self.device)
            for event in self.events.values():
                stream.wait_event(event)
            self.events.clear()

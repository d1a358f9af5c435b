"""Routed experts on the device tier: one layer's pinned experts and cache slots in one preallocated stack,
the copy engine that fills slots from host storage, and the grouped SwiGLU over resident experts."""
from __future__ import annotations

from typing import Callable, Iterable, Protocol, Sequence

import torch

from ..config import ExpertActivation
from .base import SILU, ExpertBiases, ExpertWeights
from .swiglu import reads_rows_in_place, swiglu_experts, swiglu_rows

class ExpertRows:
    """A layer's device rows for routed experts: rows 0..P-1 hold the pinned experts, rows P..P+S-1 the cache
    slots. What every pool shares, whatever the format its rows hold."""

    def __init__(self, pinned: Sequence[int], num_slots: int, device: torch.device):
        self.pinned_row = {expert: row for row, expert in enumerate(pinned)}
        self.num_pinned = len(pinned)
        self.num_slots = num_slots
        self.device = device

    @property
    def num_rows(self) -> int:
        return self.num_pinned + self.num_slots

    def slot_row(self, slot: int) -> int:
        return self.num_pinned + slot


class DeviceExpertPool(ExpertRows):
    """Rows in the device dtype: gate/up [P+S, I, H], down [P+S, H, I], and biases [P+S, I], [P+S, I], [P+S, H]
    for experts that have them."""

    def __init__(self, pinned: Sequence[int], num_slots: int, hidden: int, intermediate: int, dtype: torch.dtype,
                 device: torch.device, biased: bool = False, activation: ExpertActivation = SILU):
        super().__init__(pinned, num_slots, device)
        rows = len(pinned) + num_slots
        self.gate = torch.empty(rows, intermediate, hidden, dtype=dtype, device=device)
        self.up = torch.empty(rows, intermediate, hidden, dtype=dtype, device=device)
        self.down = torch.empty(rows, hidden, intermediate, dtype=dtype, device=device)
        self.biases = ExpertBiases(*(torch.empty(rows, width, dtype=dtype, device=device)
                                     for width in (intermediate, intermediate, hidden))) if biased else None
        self.activation = activation
        self.in_place = reads_rows_in_place(self.gate.device, dtype, hidden, intermediate)

    @property
    def stacks(self) -> list[torch.Tensor]:
        """Every per-row tensor, in `packed_expert`'s order: gate, up, down (and their biases)."""
        return [self.gate, self.up, self.down, *(self.biases.stacks() if self.biases is not None else ())]

    @property
    def expert_bytes(self) -> int:
        return sum(stack[0].nbytes for stack in self.stacks) if len(self.gate) else 0

    @property
    def nbytes(self) -> int:
        return sum(stack.nbytes for stack in self.stacks)

    def fill(self, first: int, experts: ExpertWeights) -> None:
        """Rows first.. hold `experts` (float weights, one row each, in order)."""
        for stack, src in zip(self.stacks, experts.stacks, strict=True):
            stack[first : first + len(src)].copy_(src)

    def land(self, row: int, host: PackedHost, packed: Sequence[torch.Tensor]) -> None:
        """Row `row` holds the expert whose host arrays `packed` lie on the device: dequantized there."""
        for stack, weights in zip(self.stacks, host.unpacked(tuple(packed)), strict=True):
            stack[row].copy_(weights)

    def compute(self, x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """y [T, H] = sum over (t, k) with rows[t, k] >= 0 of weights[t, k] * expert_row(x[t]).
        rows [T, K] are pool rows, -1 where the pair is computed elsewhere. The rows are read in place by grouped
        matmuls where the device has them (no host read); elsewhere (a GPU without the grouped kernel) a decode
        step gathers its pairs' rows."""
        compute = swiglu_rows if self.in_place else swiglu_experts
        return compute(x, rows, weights, self.gate, self.up, self.down, self.biases, self.activation)


class PackedHost(Protocol):
    """A host backend's experts as uploads see them (offload/experts/base.py HostStacks)."""

    fmt: str  # the host format: "bf16" | "int8" | "int4" | "int4s" | "float32" | "float16"

    def packed_expert(self, expert: int) -> tuple[torch.Tensor, ...]: ...
    def unpacked(self, packed: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]: ...


class ExpertPool(Protocol):
    """What the hybrid layer, the uploader and the builder use of a pool: DeviceExpertPool (the device dtype) or
    QuantExpertPool (int8 / int4 rows, offload/experts/quant_pool.py)."""

    pinned_row: dict[int, int]
    num_pinned: int
    num_slots: int
    device: torch.device
    in_place: bool  # whether compute reads no value back to the host, however many pairs a call has

    @property
    def num_rows(self) -> int: ...
    def slot_row(self, slot: int) -> int: ...
    def fill(self, first: int, experts: ExpertWeights) -> None: ...
    def land(self, row: int, host: PackedHost, packed: Sequence[torch.Tensor]) -> None: ...
    def compute(self, x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor: ...


STAGING_RING_ENTRIES = 8  # experts the shared ring stages at once (counted in the plan's host budget)


class StagingRing:
    """Where uploads land, shared by every layer (not two buffers per layer: DeepSeek-V3's 58 MoE layers would pin
    9.5 GiB): each entry holds one expert's packed bytes (int8/int4 tiles and scales, bf16 bits or float weights,
    as the host holds them) in a device buffer, and on CUDA also in a pinned host buffer that the side stream
    copies up from. Copies leave in order, so entries are taken in turn; an entry is reused once the work that
    last read it (the copy up and the dequantization on the device) has finished. On the CPU tier nothing is
    asynchronous and every entry is always free."""

    def __init__(self, packed: Sequence[torch.Tensor], device: torch.device,
                 entries: int = STAGING_RING_ENTRIES):
        self.cuda = device.type == "cuda"
        self.entries = entries
        self.buffers = [[torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in packed]
                        for _ in range(entries)] if self.cuda else []
        self.landing = [[torch.empty(t.shape, dtype=t.dtype, device=device) for t in packed] for _ in range(entries)]
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.done: list[torch.cuda.Event | None] = [None] * entries  # the last work out of each entry
        self.turn = 0
        self.bytes_copied = 0  # host -> device, by every upload through the ring

    def ready(self) -> bool:
        """Whether the entry next in turn is free now (queried, never waited for)."""
        event = self.done[self.turn]
        return event is None or event.query()

    def take(self) -> int:
        """The next entry in turn, once the work that last read it has finished."""
        entry = self.turn
        if not self.ready():
            self.done[entry].synchronize()
        self.turn = (entry + 1) % self.entries
        return entry


class ExpertUploader:
    """Copies experts from host storage into pool rows as the host holds them (packed int8/int4 bytes, not
    dequantized weights) and turns them on the device into the row's format (`pool.land`): dequantized into
    device-dtype rows, laid out again or quantized into int8 / int4 rows (experts/quant_pool.py).

    On CUDA the packed tensors go through an entry of the shared staging ring: a pinned buffer, then on the side
    stream the copy up and the dequantization into the row; the row records an event that the compute stream
    waits on (on the device, not the host) before the layer reads it. On the CPU tier the same copies and the
    same dequantization run in line, so the behaviour, the numbers and the byte counts are the same."""

    def __init__(self, pool: ExpertPool, host: PackedHost | None, local: Callable[[int], int],
                 device: torch.device, ring: StagingRing | None):  # None, None: a layer with no host experts
        self.pool, self.host, self.local, self.device, self.ring = pool, host, local, device, ring
        self.cuda = device.type == "cuda"
        self.events: dict[int, torch.cuda.Event] = {}  # CUDA: row -> its copy, not yet waited for

    def copy(self, expert: int, row: int, after: torch.cuda.Event | None = None) -> None:
        """Start copying `expert` into `row` (waiting for a staging entry if none is free). On CUDA the row is
        written once the compute stream has passed `after` (the last work that read the row), or without it
        everything queued there so far."""
        packed = self.host.packed_expert(self.local(expert))
        entry = self.ring.take()
        landing = self.ring.landing[entry]
        self.ring.bytes_copied += sum(t.nbytes for t in packed)
        if not self.cuda:
            self._land(packed, landing, row)
            return
        staged = self.ring.buffers[entry]
        for buffer, src in zip(staged, packed, strict=True):
            buffer.copy_(src)
        # The row may still be read by compute queued on the main stream (an evicted expert): wait for it.
        stream = self.ring.stream
        if after is not None:
            stream.wait_event(after)
        else:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._land(staged, landing, row)
            event = torch.cuda.Event()
            event.record(stream)
        self.events[row] = event
        self.ring.done[entry] = event

    def _land(self, packed: Sequence[torch.Tensor], landing: list[torch.Tensor], row: int) -> None:
        """Copy the packed tensors into the device buffers, then turn them there into the pool row's format."""
        for buffer, src in zip(landing, packed, strict=True):
            buffer.copy_(src, non_blocking=True)
        self.pool.land(row, self.host, landing)

    def wait(self, rows: Iterable[int] | None = None) -> None:
        """Make the compute stream wait until the rows copied into (all, or `rows`) hold their experts (no-op
        on the CPU tier)."""
        if not self.events:
            return
        stream = torch.cuda.current_stream(self.device)
        for row in list(self.events) if rows is None else [r for r in rows if r in self.events]:
            stream.wait_event(self.events.pop(row))

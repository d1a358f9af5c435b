"""The step boundary: where a decode step's expert routing reaches the host, once.

While a step runs, each hybrid layer only records its routed expert ids (device tensors) here. At the boundary
(before the next forward, or when statistics are read) they are concatenated and read back in one copy; then each
layer, in order, counts its hits and misses and lets the prefetcher choose admissions into its cache, whose copies
start on the side stream and are mapped into the layer's device table before the next step. A prefill chunk that
streams every non-resident expert of a layer records its ids here too (through the layer's `StreamedCalls`), so
that nothing inside the forward waits for the device.
"""
from __future__ import annotations

from typing import Protocol

import torch


class SettlingLayer(Protocol):
    layer: int

    def settle(self, calls: list[list[int]]) -> None: ...  # each call's flat expert ids, in the step's order


class StepRecorder:
    def __init__(self) -> None:
        self.calls: list[tuple[SettlingLayer, torch.Tensor]] = []

    def record(self, layer: SettlingLayer, topk_ids: torch.Tensor) -> None:
        """Keep one call's ids [T, K] until the boundary (a reference, not a read)."""
        self.calls.append((layer, topk_ids))

    def settle(self) -> None:
        """Read the recorded ids back (one copy for the whole step) and hand each layer its calls."""
        if not self.calls:
            return
        calls, self.calls = self.calls, []
        flat = torch.cat([ids.reshape(-1) for _, ids in calls]).tolist()  # the step's one readback
        by_recipient: dict[int, tuple[SettlingLayer, list[list[int]]]] = {}  # id(recipient) -> its calls
        begin = 0
        for layer, ids in calls:
            end = begin + ids.numel()
            by_recipient.setdefault(id(layer), (layer, []))[1].append(flat[begin:end])
            begin = end
        for layer, layer_calls in sorted(by_recipient.values(), key=lambda entry: entry[0].layer):
            layer.settle(layer_calls)

"""Whole-layer streaming for long prefill chunks: a layer's used experts that are not resident go to the device
as the host holds them (packed int8/int4 bytes) and run there, instead of on the CPU workers or through the
slot-capped copies of the cache.

One double buffer serves every layer: two halves of `half` pool rows, in the device dtype or in the plan's slot
format (a QuantExpertPool of int8 / int4 rows, landed as the slots are). The experts a chunk uses are streamed in
batches of `half`, alternating halves across batches and layers; batch b+1's copies (and their dequantization or
re-layout, on the side stream on CUDA) are issued before batch b's compute, so the copy of the next batch, or of
the next layer's first one, overlaps the compute of the current one. A half is rewritten only once
the compute that last read it has run: on CUDA that compute records an event and the half's next copies wait for
it alone (not for everything queued since), so the next batch's copies overlap the current batch's compute.

A chunk long enough to use every expert (`every_expert_tokens` under uniform routing, and the layer's last
measured call used nearly all: `streams_blind`) streams all the layer's non-resident experts without reading its
ids back; the host then queues the next layer at once, and that layer's first copies overlap this layer's compute
instead of waiting behind a readback.
"""
from __future__ import annotations

import math

import torch

from .device import ExpertPool, ExpertUploader


class LayerStream:
    def __init__(self, pool: ExpertPool):
        if pool.num_pinned or pool.num_slots < 2 or pool.num_slots % 2:
            raise ValueError(f"a stream buffer needs an even number of rows and no pinned ones, got "
                             f"{pool.num_pinned} pinned and {pool.num_slots} slots")
        self.pool = pool
        self.half = pool.num_slots // 2  # experts per batch
        self.turn = 0  # the half the next batch goes to
        self.cuda = pool.device.type == "cuda"
        self.read_done: list[torch.cuda.Event | None] = [None, None]  # CUDA: the last compute that read each half

    def run(self, uploader: ExpertUploader, experts: list[int], num_experts: int, x: torch.Tensor,
            topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """y [T, H] = the sum over the pairs whose expert is in `experts` (the rest give 0), each streamed
        through the buffer by `uploader` (one layer's, writing into this buffer's rows)."""
        batches = [experts[i : i + self.half] for i in range(0, len(experts), self.half)]
        y = torch.zeros_like(x)
        pending = self._upload(uploader, batches[0]) if batches else []
        for b, batch in enumerate(batches):
            rows = pending
            if b + 1 < len(batches):
                pending = self._upload(uploader, batches[b + 1])  # overlaps the compute below on CUDA
            uploader.wait(rows)
            table = torch.full((num_experts,), -1, dtype=torch.long)  # expert -> its row in this batch
            table[batch] = torch.tensor(rows)
            # non_blocking: from pageable memory the host stages the table at once, waiting for no queued work
            y += self.pool.compute(x, table.to(x.device, non_blocking=True)[topk_ids], topk_weights)
            if self.cuda:
                self.read_done[rows[0] // self.half] = torch.cuda.Event()
                self.read_done[rows[0] // self.half].record()
        return y

    def _upload(self, uploader: ExpertUploader, batch: list[int]) -> list[int]:
        """Start copying `batch` into the next half, once the compute that last read the half has run; its rows,
        in batch order."""
        half = self.turn
        rows = [half * self.half + j for j in range(len(batch))]
        self.turn ^= 1
        for expert, row in zip(batch, rows):
            uploader.copy(expert, row, after=self.read_done[half])
        return rows


BLIND_MIN_COVERAGE = 0.9  # streaming blind needs the layer's last measured call to have used this share


def streams_blind(tokens: int, blind_tokens: int | None, coverage: float | None) -> bool:
    """Whether a streamed call of `tokens` streams every non-resident expert without reading its ids back: from
    `blind_tokens` on (every_expert_tokens, the uniform-routing bound), and only once the layer's last measured
    streamed call used at least BLIND_MIN_COVERAGE of the experts it could have streamed (`coverage`; None: not
    measured yet, so the ids are read back). Skewed routing that leaves many experts unused turns it off, and a
    call that reads its ids back measures the coverage again, so it comes back once the routing spreads."""
    if blind_tokens is None or tokens < blind_tokens or coverage is None:
        return False
    return coverage >= BLIND_MIN_COVERAGE


def every_expert_tokens(top_k: int, num_experts: int, waste: float = 0.01) -> int:
    """The fewest tokens per call from which streaming every non-resident expert of a layer, without reading its
    ids back, is expected to copy at most `waste` of them in vain: with T tokens each picking K of E experts
    uniformly, an expert goes unused with chance (1 - K/E)^T. Skewed routing leaves more experts unused, so the
    margin is small; the byte counts (`bytes_streamed`) show what was copied."""
    if top_k >= num_experts:
        return 1
    return max(1, math.ceil(math.log(waste) / math.log(1 - top_k / num_experts)))

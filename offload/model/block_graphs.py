"""A decode step's attention + post-attention norm + router block, captured once per layer and context bucket and
replayed at every later step of that bucket (CUDA graphs).

A step at device Positions (model/positions.py) issues the same kernels with the same shapes at every position of
its bucket and reads nothing back, so the block can be recorded once: its input is a static [1, H] buffer that the
step copies its hidden state into, the position is the decode steps' one device tensor (written in place), and its
outputs (x after attention, the normed h, and on a MoE layer the top-k ids and weights) are the same tensors at
every replay. The experts stay outside: their placement changes between steps and the CPU workers join them.

Only layers whose cache a repeated write leaves unchanged are captured: a capture first runs the block once eagerly
(warm-up), and a KV or latent cache written twice at one position holds the same rows, while a recurrent state
(Gated DeltaNet) would advance twice. Layers that share an indexer's selection (GLM-5) stay eager too, since their
input is another layer's output.

`capture` is injected: CUDA graphs on a GPU (`cuda_capture`); a test replaces it on the CPU with one that reruns
the recorded function into the static outputs, which exercises the same buffers, keys and fallback.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .positions import Positions

BlockOutputs = tuple[torch.Tensor, ...]  # x [1, H], h [1, H], then topk ids [1, K] and weights [1, K] on MoE layers
Capture = Callable[[Callable[[], BlockOutputs]], tuple[BlockOutputs, Callable[[], None]]]


def cuda_capture(pool: object) -> Capture:
    """CUDA graph capture in a memory pool shared by every graph of the model: fn runs once on a side stream (the
    warm-up torch asks for), is recorded, and the graph's replay is returned with its output tensors."""

    def capture(fn: Callable[[], BlockOutputs]) -> tuple[BlockOutputs, Callable[[], None]]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = fn()
        return outputs, graph.replay

    return capture


@dataclass
class CapturedBlock:
    x_in: torch.Tensor  # [1, H]: the static input the graph reads
    start: torch.Tensor  # the position tensor it was captured with
    outputs: BlockOutputs
    replay: Callable[[], None]


class BlockGraphs:
    """One layer's captured blocks, by context bucket. `block(x, at)` returns the block's outputs for x at `at`:
    replayed where a graph of the bucket exists, captured first where not, and eager (with one warning for the
    model) when a capture fails."""

    def __init__(self, run_block: Callable[[torch.Tensor, Positions], BlockOutputs], capture: Capture,
                 on_failure: Callable[[Exception], None]):
        self.run_block = run_block
        self.capture = capture
        self.on_failure = on_failure
        self.by_bucket: dict[int, CapturedBlock] = {}
        self.failed = False

    def block(self, x: torch.Tensor, at: Positions) -> BlockOutputs:
        if self.failed or x.shape[0] != 1:
            return self.run_block(x, at)
        captured = self.by_bucket.get(at.length)
        if captured is None or captured.start is not at.start:
            try:
                captured = self._capture(x, at)
            except Exception as error:  # a kernel that cannot be captured: this layer steps eagerly from now on
                self.failed = True
                self.on_failure(error)
                return self.run_block(x, at)
            self.by_bucket[at.length] = captured
        captured.x_in.copy_(x)
        captured.replay()
        return captured.outputs

    def _capture(self, x: torch.Tensor, at: Positions) -> CapturedBlock:
        x_in = x.clone()
        outputs, replay = self.capture(lambda: self.run_block(x_in, at))
        return CapturedBlock(x_in, at.start, outputs, replay)


def warn_once() -> Callable[[int], Callable[[Exception], None]]:
    """Failure callbacks, one per layer, that together warn once: at the first layer whose capture fails."""
    warned = []

    def for_layer(layer: int) -> Callable[[Exception], None]:
        def on_failure(error: Exception) -> None:
            if not warned:
                warned.append(layer)
                warnings.warn(f"CUDA graph capture failed at layer {layer} ({type(error).__name__}: {error}); "
                              "decode steps run eagerly there (load with cuda_graphs=False to skip capturing)",
                              RuntimeWarning, stacklevel=2)
        return on_failure

    return for_layer

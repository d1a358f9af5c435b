"""What a decode step makes the host wait for or move across the bus, counted on the simulated device tier.

On the CPU nothing waits, so the ledger counts the operations that on a GPU would: every host read of a tensor's
values (aten._local_scalar_dense or aten.item: item(), bool(), int(); Tensor.tolist / numpy / cpu), every op
whose output shape depends on the data (nonzero, unique, bincount, masked_select, boolean indexing: each reads a
size back), device synchronisations, explicit device moves (Tensor.to with a device), and the copies the hybrid
layers make on purpose: the CPU workers' packed inputs and results (HostLink.down / up) and expert uploads. Only
the thread that opens the ledger is counted: the CPU workers' own thread computes on the host by design.

`OpCounter` counts non-view aten ops per block of each decoder layer.
"""
from __future__ import annotations

import threading
from collections import Counter
from contextlib import ExitStack
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from offload.experts.device import ExpertUploader
from offload.experts.link import HostLink


# A scalar read: _local_scalar_dense, or item itself under inference mode (the mode then sees only the outer op).
SCALAR_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)


def _is_data_dependent(func, args) -> bool:
    if torch.Tag.dynamic_output_shape not in func.tags:
        return False
    if func is torch.ops.aten.index.Tensor:  # integer indexing has a fixed shape; a boolean mask does not
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return True


class SyncLedger(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.host_reads: Counter[str] = Counter()  # what read values back, by name
        self.data_dependent: Counter[str] = Counter()  # ops whose output size needs the data
        self.syncs = 0
        self.device_moves = 0
        self.link_copies = 0  # HostLink.down + HostLink.up
        self.uploads = 0  # experts copied into pool rows
        self._thread = threading.get_ident()
        self._patches = ExitStack()
        self._inside = False  # within a purposeful copy (HostLink.down/up, an expert upload)

    @property
    def total_host_reads(self) -> int:
        return sum(self.host_reads.values())

    def _here(self) -> bool:
        return threading.get_ident() == self._thread

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SCALAR_READS:
            self.host_reads["item"] += 1
        elif _is_data_dependent(func, args):
            self.data_dependent[str(func)] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> SyncLedger:
        self._thread = threading.get_ident()

        def counting(owner, name, tally, purposeful: bool = False):
            """Count calls of owner.name; what a purposeful copy does inside is its own business."""
            original = getattr(owner, name)

            def wrapper(*args, **kwargs):
                if not self._here() or self._inside:
                    return original(*args, **kwargs)
                tally(args, kwargs)
                self._inside = purposeful
                try:
                    return original(*args, **kwargs)
                finally:
                    self._inside = False

            self._patches.enter_context(mock.patch.object(owner, name, wrapper))

        def read(name):
            return lambda args, kwargs: self.host_reads.update([name])

        for name in ("tolist", "numpy", "cpu"):
            counting(torch.Tensor, name, read(name))
        counting(torch.Tensor, "to", lambda args, kwargs: self._count_move(args, kwargs))
        counting(torch.cuda, "synchronize", lambda args, kwargs: self._add("syncs"))
        counting(HostLink, "down", lambda args, kwargs: self._add("link_copies"), purposeful=True)
        counting(HostLink, "up", lambda args, kwargs: self._add("link_copies"), purposeful=True)
        counting(ExpertUploader, "copy", lambda args, kwargs: self._add("uploads"), purposeful=True)
        super().__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        super().__exit__(*exc_info)
        self._patches.close()

    def _add(self, name: str) -> None:
        setattr(self, name, getattr(self, name) + 1)

    def _count_move(self, args, kwargs) -> None:
        if "device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args[1:]):
            self.device_moves += 1


class OpCounter(TorchDispatchMode):
    """Non-view aten ops of one forward, by (decoder layer, block): "attention" from the input norm to the
    attention residual, "mlp" from the post-attention norm to the layer's end; ops before the first layer are
    "before" (the step boundary, the embedding)."""

    def __init__(self, transformer) -> None:
        super().__init__()
        self.transformer = transformer
        self.ops: dict[tuple[int, str], list[str]] = {}
        self.where: tuple[int, str] = (-1, "before")
        self._hooks = []

    def __enter__(self) -> OpCounter:
        t = self.transformer
        for i, layer in enumerate(t.layers):
            for module, block in ((layer.input_norm, "attention"), (layer.post_attn_norm, "mlp")):
                self._hooks.append(module.register_forward_pre_hook(self._entering(i, block)))
        self._hooks.append(t.norm.register_forward_pre_hook(self._entering(len(t.layers), "head")))
        return super().__enter__()

    def _entering(self, layer: int, block: str):
        def hook(module, args) -> None:
            self.where = (layer, block)
        return hook

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.setdefault(self.where, []).append(str(func))
        return func(*args, **(kwargs or {}))

    def __exit__(self, *exc_info) -> None:
        super().__exit__(*exc_info)
        for hook in self._hooks:
            hook.remove()

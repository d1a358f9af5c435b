"""WeightSource: hands each module the tensors it asks for, checking names and shapes, and reports leftovers."""
from __future__ import annotations

import logging
import re
from typing import Callable

import torch

from ..errors import CheckpointError
from .checkpoint import Checkpoint

log = logging.getLogger("offload")


class WeightSource:
    """Reads named tensors from a Checkpoint into one dtype and device, remembering which were taken."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device, prefix: str = "",
                 on_read: Callable[[str, int], None] | None = None):
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.device = device
        self.prefix = prefix
        self.on_read = on_read  # (file name, bytes just read): drives progress bars
        self.taken: set[str] = set()

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        full = self.prefix + name
        info = self.checkpoint.tensors.get(full)
        if info is None:
            raise CheckpointError(
                f"tensor {full!r} (shape {list(shape)}) is missing from {self.checkpoint.folder}; "
                "the checkpoint is incomplete or does not match config.json"
            )
        if tuple(info.shape) != tuple(shape):
            raise CheckpointError(
                f"tensor {full!r} in {info.file.name} has shape {list(info.shape)}, config.json implies {list(shape)}"
            )
        self.taken.add(full)
        stored = self.checkpoint.read(full)
        if self.on_read is not None:
            self.on_read(info.file.name, stored.nbytes)
        return stored.to(device=self.device, dtype=dtype or self.dtype)

    def has(self, name: str) -> bool:
        return self.prefix + name in self.checkpoint.tensors

    def finish(self, is_known_extra: Callable[[str], bool]) -> list[str]:
        """Fail on tensors nobody took; skip known extras (returned, and logged as a notice)."""
        left = sorted(set(self.checkpoint.tensors) - self.taken)
        extras = [name for name in left if is_known_extra(name)]
        unexpected = [name for name in left if not is_known_extra(name)]
        if unexpected:
            shown = ", ".join(f"{n!r} ({self.checkpoint.tensors[n].file.name})" for n in unexpected[:3])
            more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
            raise CheckpointError(f"unexpected tensors {shown}{more}: the checkpoint does not match config.json")
        if extras:
            log.warning("skipped %d tensors the runtime does not use (e.g. %s)", len(extras), extras[0])
        return extras


class InventedSource(WeightSource):
    """A WeightSource without a checkpoint: `make(name, shape)` invents each tensor; names and shapes are recorded.

    Building a model against it lists exactly the tensors `load` would read — synthetic checkpoints (random
    tensors) and placement inventories (meta tensors, no memory) both come from it, so neither can drift from
    the loader.
    """

    def __init__(self, make: Callable[[str, tuple[int, ...]], torch.Tensor], dtype: torch.dtype = torch.float32,
                 device: torch.device = torch.device("cpu")):
        super().__init__(checkpoint=None, dtype=dtype, device=device)
        self.make = make
        self.tensors: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = self.tensors[name] = self.make(name, tuple(shape))
        return tensor.to(device=self.device, dtype=dtype or self.dtype)

    def has(self, name: str) -> bool:
        return False


def known_extras(num_layers: int, num_extra_layers: int) -> Callable[[str], bool]:
    """Tensors real checkpoints ship that inference does not use: DeepSeek-V3's multi-token-prediction layers
    (`model.layers.{num_hidden_layers}...`) and rotary `inv_freq` buffers saved by old exporters."""
    layer = re.compile(r"^model\.layers\.(\d+)\.")

    def is_extra(name: str) -> bool:
        if name.endswith("rotary_emb.inv_freq"):
            return True
        match = layer.match(name)
        return bool(match) and num_layers <= int(match.group(1)) < num_layers + num_extra_layers

    return is_extra

"""WeightSource: hands each module the tensors it asks for, checking names and shapes, and reports leftovers."""
from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Callable, Union

import torch

from ..errors import CheckpointError
from .checkpoint import Checkpoint
from .fused import ExpertSlice, FusedExperts, pack_slice_exact, read_slice, stored_shape

if TYPE_CHECKING:
    from csrc_py.formats import PackedMatrix

    from ..experts.base import ExpertWeights, PackedExperts

PACKED_FORMATS = ("bf16", "int8", "int4", "int4s")  # csrc_py.formats.FORMATS, without importing the kernels
DenseWeight = Union[torch.Tensor, "PackedMatrix"]  # a Linear's weight [out, in], or packed as a [1, out, in] stack

log = logging.getLogger("offload")


class WeightSource:
    """Reads named tensors from a Checkpoint into one dtype and device, remembering which were taken."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device,
                 rename: Callable[[str], str] = str,
                 on_read: Callable[[str, int], None] | None = None, dense_format: str | None = None,
                 expert_format: str | None = None, dense_on_device: bool | None = None, huge_pages: bool = False):
        from .store import packed_entries, store_formats

        self.checkpoint = checkpoint
        self.dtype = dtype
        self.device = device
        self.rename = rename  # a module's tensor name -> its name in the checkpoint (a multimodal text model's)
        self.on_read = on_read  # (file name, bytes just read): drives progress bars
        # "int8" | "int4" | "int4s": quantize dense Linear weights at load; None / "bf16": keep them in the model dtype
        self.dense_format = None if dense_format == "bf16" else dense_format
        # Where dense weights run: the device tier's torch matmuls (a GPU, or a simulated budget: model/device_quant.py
        # for int8 / int4) or, on a CPU-only run, the CPU kernels in offload's packed formats.
        self.dense_on_device = device.type != "cpu" if dense_on_device is None else dense_on_device
        # The host format of routed experts: a quantized checkpoint's experts are packed in it as they are read.
        self.expert_format = expert_format
        self.packed = packed_entries(checkpoint) if checkpoint is not None else {}  # a store's packed matrices
        formats = store_formats(checkpoint) if checkpoint is not None else None
        # The format a store's dense matrices were rounded to when it was written (None: not a store, or bf16)
        self.store_dense_format = formats.dense if formats is not None and formats.dense != "bf16" else None
        self.taken: set[str] = set()
        self.huge_pages = huge_pages  # a store's large packed arrays are read into huge pages, not memory-mapped

    @property
    def packs_dense(self) -> bool:
        """Whether dense weights are quantized for the CPU kernels: a CPU-only run with an int8 / int4 / int4s
        dense format."""
        return self.dense_format is not None and not self.dense_on_device

    @property
    def absorbed_format(self) -> str | None:
        """The format MLA's W_UK / W_UV take their values in (None: the model dtype): a store's dense format, as its
        other dense matrices; else the dense format a CPU-only run packs them in. A store keeps kv_b_proj in the
        model dtype and a CPU-only run packs its halves, so the device tier rounds them the same way: a store's
        dense weights then hold the same values wherever they run."""
        if self.store_dense_format is not None:
            return self.store_dense_format
        return self.dense_format if self.packs_dense else None

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        full = self._check(name, shape)
        return self._read(full).to(device=self.device, dtype=dtype or self.dtype)

    def _check(self, name: str, shape: tuple[int, ...]) -> str:
        """The full name of logical tensor `name`, checked against the shape config.json implies."""
        full = self.rename(name)
        info = self.checkpoint.logical.get(full)
        if info is None:
            raise CheckpointError(
                f"tensor {full!r} (shape {list(shape)}) is missing from {self.checkpoint.folder}; "
                "the checkpoint is incomplete or does not match config.json"
            )
        if tuple(info.shape) != tuple(shape):
            file = self.checkpoint.tensors[info.parts[0]].file.name
            raise CheckpointError(
                f"tensor {full!r} in {file} has shape {list(info.shape)}, config.json implies {list(shape)}"
            )
        return full

    def _read(self, full: str) -> torch.Tensor:
        """A logical tensor as stored, or float32 when the checkpoint stores it quantized."""
        self._mark_read(full)
        return self.checkpoint.read_logical(full)

    def _mark_read(self, full: str) -> None:
        parts = self.checkpoint.logical[full].parts
        self.taken.update(parts)
        if self.on_read is not None:
            self.on_read(self.checkpoint.tensors[parts[0]].file.name, self.checkpoint.stored_nbytes(full))

    def _pack_into(self, full: str, out: PackedMatrix, e: int) -> None:
        """Quantized matrix `full` into expert slot e of `out`: from its own integer grid where the format holds
        it exactly, else dequantized and quantized again."""
        from csrc_py.formats import pack_expert

        if self.checkpoint.pack_exact(full, out, e):
            self._mark_read(full)
        else:
            pack_expert(out, e, self._read(full))

    def has(self, name: str) -> bool:
        full = self.rename(name)
        return full in self.checkpoint.logical or full in self.packed

    def is_quantized(self, name: str) -> bool:
        """Whether the checkpoint stores logical tensor `name` in a quantization scheme (weights.quant)."""
        t = self.checkpoint.logical.get(self.rename(name))
        return t is not None and t.quantized

    def linear_weight(self, name: str, shape: tuple[int, int], quantize: bool = True) -> DenseWeight:
        """A dense Linear's weight [out, in]. On the device tier: a tensor in the model dtype, or quantized for the
        device's kernels when dense_format asks for it and `quantize` allows it. On a CPU-only run: packed when the
        checkpoint stores it packed or dense_format asks for it, else a tensor."""
        if self.dense_on_device:
            if quantize and self.dense_format is not None:
                from ..model.device_quant import quantize as device_quantize

                return device_quantize(self._device_matrix(name, shape, torch.float32), self.dense_format, self.dtype)
            return self._device_matrix(name, shape, self.dtype)
        if self.rename(name) in self.packed:
            return self._read_packed(name, (1, *shape))
        if quantize and self.dense_format is not None and self.is_quantized(name):
            from csrc_py.formats import empty

            matrix = empty(self.dense_format, 1, *shape)
            self._pack_into(self._check(name, shape), matrix, 0)
            return matrix
        weight = self.take(name, shape)
        if quantize and self.dense_format is not None:
            from csrc_py.formats import pack

            return pack(weight[None], self.dense_format)
        return weight

    def _device_matrix(self, name: str, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """A dense weight [out, in] on the device in `dtype`; a store's packed matrix is dequantized."""
        if self.rename(name) not in self.packed:
            return self.take(name, shape, dtype)
        from csrc_py.formats import unpack

        return torch.from_numpy(unpack(self._read_packed(name, (1, *shape)))[0]).to(self.device, dtype)

    def tied_linear_weight(self, embed_name: str, embed: torch.Tensor) -> DenseWeight:
        """The LM head of a model with tied embeddings: the embedding table itself, or packed from it for the CPU
        kernels. The device tier keeps it tied: a quantized copy would add bytes beside the table it must keep."""
        if self.dense_format is not None and not self.dense_on_device:
            from csrc_py.formats import pack

            return pack(embed[None], self.dense_format)
        return embed

    def expert_weights(self, prefix: str, proj: tuple[str, str, str], E: int, I: int, H: int
                       ) -> ExpertWeights | PackedExperts:
        """One MoE layer's routed experts: stacked from the per-expert matrices (gate/up [E, I, H], down [E, H, I]),
        or a store's packed stacks as they are."""
        from ..experts.base import ExpertWeights, PackedExperts

        shapes = ((E, I, H), (E, I, H), (E, H, I))
        if self.rename(f"{prefix}.{proj[0]}") in self.packed:
            return PackedExperts(*(self._read_packed(f"{prefix}.{p}", s) for p, s in zip(proj, shapes)))
        if self.expert_format in PACKED_FORMATS and self.is_quantized(f"{prefix}.0.{proj[0]}.weight"):
            # A quantized checkpoint's experts are packed one matrix at a time, never a layer in float32.
            return PackedExperts(*(self._pack_experts(prefix, p, s) for p, s in zip(proj, shapes)))
        return ExpertWeights(*(torch.stack([self.take(f"{prefix}.{j}.{p}.weight", s[1:]) for j in range(E)])
                               for p, s in zip(proj, shapes)))

    def fused_expert_weights(self, prefix: str, layout: str, E: int, I: int, H: int, biased: bool
                             ) -> ExpertWeights | PackedExperts:
        """One MoE layer's routed experts stored as whole-layer tensors (weights.fused: `{prefix}.gate_up_proj`,
        `{prefix}.down_proj`, gate and up "interleaved" or as "halves", biases beside them when `biased`), cut
        expert by expert: packed one matrix at a time in expert_format when it is a packed one, else stacked in
        the source's dtype; a store's packed stacks as they are. No whole layer is ever decoded to float."""
        from ..experts.base import ExpertBiases, ExpertWeights, PackedExperts

        fused = FusedExperts(prefix, layout, E, I, H)
        biases = None
        if biased:
            (gate_up_name, gate_up_shape), (down_name, down_shape) = fused.biases.items()
            biases = ExpertBiases(*fused.split_bias(self.take(gate_up_name, gate_up_shape)),
                                  self.take(down_name, down_shape))
        stacks = fused.stacks()
        if self.rename(stacks[0][0]) in self.packed:
            return PackedExperts(*(self._read_packed(name, shape) for name, shape, _ in stacks), biases)
        self._take_fused(fused)
        if self.expert_format in PACKED_FORMATS:
            return PackedExperts(*(self._pack_slices(slices, shape) for _, shape, slices in stacks), biases)
        return ExpertWeights(*(self._stack_slices(slices, shape) for _, shape, slices in stacks), biases)

    def _take_fused(self, fused: FusedExperts) -> None:
        """Check the shapes of a fused layer's whole-layer tensors and count them as read."""
        for name, stacked in fused.tensors.items():
            self._mark_read(self._check(name, stored_shape(stacked, self.is_quantized(name))))

    def _read_slice(self, s: ExpertSlice) -> torch.Tensor:
        """One expert's matrix [O, K] of a whole-layer tensor (float32 where quantized, else as stored)."""
        return read_slice(self.checkpoint, s.renamed(self.rename))

    def _stack_slices(self, slices: list[ExpertSlice], shape: tuple[int, int, int]) -> torch.Tensor:
        """[E, O, K] in the source's dtype and device, filled one expert at a time."""
        stack = torch.empty(shape, dtype=self.dtype, device=self.device)
        for j, s in enumerate(slices):
            stack[j] = self._read_slice(s)
        return stack

    def _pack_slices(self, slices: list[ExpertSlice], shape: tuple[int, int, int]) -> PackedMatrix:
        """[E, O, K] packed in expert_format, one expert at a time: from its integer grid where the format holds
        it exactly, else quantized from its floats."""
        from csrc_py.formats import empty, pack_expert

        stack = empty(self.expert_format, *shape)
        for j, s in enumerate(slices):
            if not pack_slice_exact(self.checkpoint, s.renamed(self.rename), stack, j):
                pack_expert(stack, j, self._read_slice(s))
        return stack

    def _pack_experts(self, prefix: str, proj: str, shape: tuple[int, int, int]) -> PackedMatrix:
        """Experts `{prefix}.{j}.{proj}.weight` stacked as one packed [E, O, K] matrix in expert_format."""
        from csrc_py.formats import empty

        E, O, K = shape
        stack = empty(self.expert_format, E, O, K)
        for j in range(E):
            self._pack_into(self._check(f"{prefix}.{j}.{proj}.weight", (O, K)), stack, j)
        return stack

    def _read_packed(self, name: str, shape: tuple[int, int, int]) -> PackedMatrix:
        from .store import read_packed

        full = self.rename(name)
        entry = self.packed[full]
        if tuple(entry.shape) != tuple(shape):
            raise CheckpointError(f"packed matrix {full!r} has shape {list(entry.shape)}, config.json implies "
                                  f"{list(shape)}")
        matrix = read_packed(self.checkpoint, full, entry, self.huge_pages)
        self.taken.update(f"{full}.{part}" for part in ("q", "d", "m"))
        if self.on_read is not None:
            self.on_read(self.checkpoint.tensors[f"{full}.q"].file.name, matrix.nbytes)
        return matrix

    def finish(self, is_known_extra: Callable[[str], bool]) -> list[str]:
        """Fail on tensors nobody took; skip known extras (returned, and logged as a notice)."""
        left = sorted(set(self.checkpoint.tensors) - self.taken)
        extras = [name for name in left if is_known_extra(name)]
        unexpected = [name for name in left if not is_known_extra(name)]
        if unexpected:
            raise unexpected_tensors_error(self.checkpoint, unexpected)
        if extras:
            log.warning("skipped %d tensors the runtime does not use (e.g. %s)", len(extras), extras[0])
        return extras


def unexpected_tensors_error(checkpoint: Checkpoint, names: list[str]) -> CheckpointError:
    shown = ", ".join(f"{n!r} ({checkpoint.tensors[n].file.name})" for n in names[:3])
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return CheckpointError(f"unexpected tensors {shown}{more}: the checkpoint does not match config.json")


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

    def is_quantized(self, name: str) -> bool:
        return False

    def _take_fused(self, fused: FusedExperts) -> None:
        for name, stacked in fused.tensors.items():
            self.take(name, stacked)

    def _read_slice(self, s: ExpertSlice) -> torch.Tensor:
        return self.tensors[s.tensor][s.expert].T[s.row_slice]


def known_extras(num_layers: int, num_extra_layers: int, runtime_name: Callable[[str], str | None] = str,
                 skipped: tuple[str, ...] = ()) -> Callable[[str], bool]:
    """Tensors real checkpoints ship that inference does not use: DeepSeek-V3's multi-token-prediction layers
    (`model.layers.{num_hidden_layers}...`), rotary `inv_freq` buffers saved by old exporters, a multimodal
    checkpoint's other towers and unused modules (names starting with one of `skipped`). `runtime_name` maps a
    stored name to the text model's own (None outside it)."""
    layer = re.compile(r"^model\.layers\.(\d+)\.")

    def is_extra(name: str) -> bool:
        if name.endswith("rotary_emb.inv_freq") or name.startswith(skipped):
            return True
        match = layer.match(runtime_name(name) or "")
        return bool(match) and num_layers <= int(match.group(1)) < num_layers + num_extra_layers

    return is_extra

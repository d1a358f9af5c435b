"""Quantization schemes of published checkpoints, chosen from `quantization_config` before any weight is read.

A scheme says how a checkpoint stores a logical weight (`X.weight` [O, K], the tensor the loader asks for):

    fp8                FP8 e4m3 `X.weight` x fp32 (or ue8m0) `X.weight_scale_inv` per 128x128 tile
                       (DeepSeek-V3/R1/V3.1, Kimi-K2-Instruct, MiniMax-M2, Qwen3-FP8, GLM-4.5-FP8)
    compressed-tensors pack-quantized int4: `X.weight_packed` int32, `X.weight_scale` per 32, `X.weight_shape`
                       (Kimi-K2-Thinking, K2.5, K2.6 experts)
    mxfp4              e2m1 `T_blocks` with an e8m0 `T_scales` per 32 (gpt-oss, DeepSeek-V4-Flash experts)
    gptq / awq         4-bit `X.qweight`, `X.qzeros`, `X.scales` (`X.g_idx`) (community Qwen3 / DeepSeek quants)

Each scheme groups a checkpoint's stored tensors into logical ones (`LogicalTensor`: the stored parts it is read
from) and reads one logical tensor either as float32 or, where its values sit on an integer grid that offload's
packed formats can hold, as that grid (`IntGroups`: packed without requantizing). Tensors a scheme does not cover
(norms, routers, embeddings, modules the checkpoint left unquantized) are plain. Byte layouts: docs/formats.md.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from ..errors import CheckpointError

if TYPE_CHECKING:
    from .checkpoint import TensorInfo
    from .codecs import IntGroups

ReadStored = Callable[[str], torch.Tensor]  # stored tensor name -> the tensor as stored
QUANT_CONFIG_FILES = ("quantization_config.json", "hf_quant_config.json")
SUPPORTED = ("fp8 (e4m3, block scales)", "compressed-tensors (pack-quantized int4)", "mxfp4", "gptq (4-bit)",
             "awq (4-bit gemm)")


@dataclass(frozen=True)
class LogicalTensor:
    """A tensor the loader asks for, and the stored tensors it is read from (just itself when plain)."""

    name: str
    shape: tuple[int, ...]
    parts: tuple[str, ...]
    quantized: bool = False


@dataclass(frozen=True)
class QuantScheme:
    """How a quantized checkpoint stores its weights, and what offload turns them into.

    expert_format: the offload format the quantized matrices map onto (the default for routed experts);
    lossless: whether that mapping keeps every value exactly; mapping: how, in words (docs/formats.md has the
    measured errors)."""

    method: str  # quant_method as the checkpoint names it
    label: str  # human description for `inspect`
    bits_per_weight: float  # stored bits per quantized weight, scales included
    expert_format: str
    lossless: bool
    group: Callable[[dict[str, TensorInfo]], dict[str, LogicalTensor]]
    floats: Callable[[ReadStored, LogicalTensor], torch.Tensor]  # float32, the logical shape
    grid: Callable[[ReadStored, LogicalTensor], "IntGroups | None"]  # the integer grid, where there is one
    round_scales: bool = False  # the grid's scales/offsets take fp16 rounding (GPTQ/AWQ offsets -zero * scale)
    mapping: str = "exact"

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "label": self.label, "bits_per_weight": self.bits_per_weight,
                "expert_format": self.expert_format, "lossless": self.lossless, "mapping": self.mapping}


def read_quant_config(folder: Path, config_json: dict[str, Any]) -> dict[str, Any] | None:
    """`quantization_config` from config.json, else from the side files some checkpoints keep it in."""
    if config_json.get("quantization_config") is not None:
        return config_json["quantization_config"]
    for name in QUANT_CONFIG_FILES:
        path = folder / name
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise CheckpointError(f"{path} is not valid JSON ({err}); re-download it") from None
            return data.get("quantization_config", data) if isinstance(data, dict) else {"invalid": data}
    return None


def scheme_for(folder: Path, config_json: dict[str, Any]) -> QuantScheme | None:
    """The checkpoint's scheme, None for an unquantized one; an unknown or unsupported one is a CheckpointError."""
    qc = read_quant_config(folder, config_json)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{folder}: quantization_config is not an object; re-download config.json")
    method = qc.get("quant_method") or (qc.get("quantization") or {}).get("quant_algo")
    makers = {"fp8": _fp8, "compressed-tensors": _compressed_tensors, "mxfp4": _mxfp4, "gptq": _gptq, "awq": _awq}
    if method not in makers:
        raise CheckpointError(f"{folder}: quantization scheme {method!r} is not supported; offload reads "
                              f"{', '.join(SUPPORTED)} (or an unquantized checkpoint)")
    return makers[method](qc, folder)


def _unsupported(folder: Path, method: str, what: str) -> CheckpointError:
    return CheckpointError(f"{folder}: {method} checkpoint with {what} is not supported; offload reads "
                           f"{', '.join(SUPPORTED)}")


def logical_tensors(stored: dict[str, TensorInfo], scheme: QuantScheme | None) -> dict[str, LogicalTensor]:
    """Every logical tensor of a checkpoint: the scheme's quantized ones, every other stored tensor as itself."""
    quantized = scheme.group(stored) if scheme is not None else {}
    used = {part for t in quantized.values() for part in t.parts}
    plain = {name: LogicalTensor(name, tuple(info.shape), (name,)) for name, info in stored.items() if name not in used}
    return {**plain, **quantized}


def _with_suffix(stored: dict[str, TensorInfo], suffix: str) -> list[str]:
    """Stored names ending in `suffix`, without it: the logical names a scheme's marker tensor stands for."""
    return [name[: -len(suffix)] for name in stored if name.endswith(suffix)]


def _require(stored: dict[str, TensorInfo], name: str, of: str) -> TensorInfo:
    if name not in stored:
        raise CheckpointError(f"quantized weight {of!r} has no {name!r}; the checkpoint is incomplete, re-download it")
    return stored[name]


# --- FP8 blocks --------------------------------------------------------------------------------------------------

FP8_E4M3_SPELLINGS = ("e4m3", "float8_e4m3fn")  # DeepSeek-V3's config.json, MiniMax-M2's (torch's dtype name)


def _fp8(qc: dict[str, Any], folder: Path) -> QuantScheme:
    if qc.get("fmt", "e4m3") not in FP8_E4M3_SPELLINGS:
        raise _unsupported(folder, "fp8", f"fmt {qc.get('fmt')!r} (only e4m3)")
    block = qc.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise _unsupported(folder, "fp8", f"weight_block_size {block!r} (per-tensor or per-channel scales)")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise _unsupported(folder, "fp8", f"activation_scheme {qc.get('activation_scheme')!r} (only dynamic)")
    bo, bk = block

    def group(stored: dict[str, TensorInfo]) -> dict[str, LogicalTensor]:
        out = {}
        for name in _with_suffix(stored, ".weight_scale_inv"):
            weight = _require(stored, f"{name}.weight", f"{name}.weight")
            scale = stored[f"{name}.weight_scale_inv"]
            O, K = weight.shape
            if weight.dtype != "F8_E4M3" or tuple(scale.shape) != (-(-O // bo), -(-K // bk)):
                raise CheckpointError(f"{name}.weight is {weight.dtype}{list(weight.shape)} with scales "
                                      f"{list(scale.shape)}; quantization_config promises F8_E4M3 in {bo}x{bk} "
                                      "blocks: re-download the checkpoint")
            out[f"{name}.weight"] = LogicalTensor(f"{name}.weight", (O, K), (f"{name}.weight",
                                                                         f"{name}.weight_scale_inv"), True)
        unscaled = [n for n, info in stored.items() if info.dtype == "F8_E4M3" and n not in out]
        if unscaled:
            raise CheckpointError(f"FP8 tensor {unscaled[0]!r} has no weight_scale_inv; re-download the checkpoint")
        return out

    def floats(read: ReadStored, t: LogicalTensor) -> torch.Tensor:
        from .codecs import fp8_block

        return fp8_block(read(t.parts[0]), read(t.parts[1]), (bo, bk))

    scale_text = "ue8m0" if qc.get("scale_fmt") == "ue8m0" else "fp32"
    return QuantScheme("fp8", f"FP8 e4m3, {scale_text} scale per {bo}x{bk} block", 8 + 32 / (bo * bk), "int8",
                       False, group, floats, lambda read, t: None, mapping="dequantized, requantized per 32")


# --- compressed-tensors pack-quantized int4 ----------------------------------------------------------------------

def _compressed_tensors(qc: dict[str, Any], folder: Path) -> QuantScheme:
    fmt = qc.get("format")
    groups = list((qc.get("config_groups") or {}).values())
    weights = [g.get("weights") or {} for g in groups if isinstance(g, dict)]
    if fmt != "pack-quantized" or len(weights) != 1:
        raise _unsupported(folder, "compressed-tensors", f"format {fmt!r} and {len(weights)} weight groups "
                                                         "(only one pack-quantized int4 group)")
    w = weights[0]
    if w.get("num_bits") != 4 or w.get("type") != "int" or w.get("strategy") != "group" or not w.get("group_size"):
        raise _unsupported(folder, "compressed-tensors", f"weights {w!r} (only 4-bit int with group scales)")
    group_size, symmetric = int(w["group_size"]), bool(w.get("symmetric", True))

    def group(stored: dict[str, TensorInfo]) -> dict[str, LogicalTensor]:
        out = {}
        for name in _with_suffix(stored, ".weight_packed"):
            packed = stored[f"{name}.weight_packed"]
            parts = [f"{name}.weight_packed", f"{name}.weight_scale", f"{name}.weight_shape"]
            parts += [f"{name}.weight_zero_point"] if not symmetric else []
            for part in parts[1:]:
                _require(stored, part, f"{name}.weight")
            # 8 values per int32: the true width when K is a multiple of 8, as in every published checkpoint;
            # weight_shape is checked against it when the tensor is read.
            shape = (packed.shape[0], packed.shape[1] * 8)
            out[f"{name}.weight"] = LogicalTensor(f"{name}.weight", shape, tuple(parts), True)
        return out

    def grid(read: ReadStored, t: LogicalTensor) -> IntGroups:
        from .codecs import compressed_int4

        zero = read(t.parts[3]) if len(t.parts) > 3 else None
        groups = compressed_int4(read(t.parts[0]), read(t.parts[1]), read(t.parts[2]), group_size, zero)
        if tuple(groups.q.shape) != t.shape:
            raise CheckpointError(f"{t.name} has weight_shape {list(groups.q.shape)}, its packed tensor implies "
                                  f"{list(t.shape)}; re-download the checkpoint")
        return groups

    label = f"int4 {'symmetric' if symmetric else 'asymmetric'}, scale per {group_size} (compressed-tensors)"
    # Symmetric: the offset -8 * scale is exact in fp16; an asymmetric -zero * scale is rounded to it.
    mapping = ("dequantized, requantized per 32" if group_size % 32
               else "exact" if symmetric else "grid kept, offsets rounded to fp16")
    return QuantScheme("compressed-tensors", label, 4 + 16 / group_size * (1 if symmetric else 2), "int4",
                       mapping == "exact", group, _floats_of(grid), grid, round_scales=not symmetric,
                       mapping=mapping)


# --- MXFP4 -------------------------------------------------------------------------------------------------------

def _mxfp4(qc: dict[str, Any], folder: Path) -> QuantScheme:
    def group(stored: dict[str, TensorInfo]) -> dict[str, LogicalTensor]:
        out = {}
        for name in _with_suffix(stored, "_blocks"):
            blocks = stored[f"{name}_blocks"]
            _require(stored, f"{name}_scales", name)
            *lead, G, B = blocks.shape
            if B != 16:
                raise CheckpointError(f"{name}_blocks has shape {list(blocks.shape)}; MXFP4 blocks are 16 bytes")
            out[name] = LogicalTensor(name, (*lead, G * 32), (f"{name}_blocks", f"{name}_scales"), True)
        return out

    def grid(read: ReadStored, t: LogicalTensor) -> IntGroups | None:
        from .codecs import mxfp4

        blocks, scales = read(t.parts[0]), read(t.parts[1])
        return mxfp4(blocks, scales) if blocks.dim() == 3 else None  # a whole-layer stack has no one grid

    def floats(read: ReadStored, t: LogicalTensor) -> torch.Tensor:
        """float32 [*lead, O, K]: a matrix, or gpt-oss's whole-layer expert stacks decoded matrix by matrix."""
        from .codecs import mxfp4

        blocks, scales = read(t.parts[0]), read(t.parts[1])
        *lead, O, G, B = blocks.shape
        matrices = [mxfp4(b, s).dequantize() for b, s in zip(blocks.reshape(-1, O, G, B), scales.reshape(-1, O, G))]
        return torch.from_numpy(np.stack(matrices)).reshape(*lead, O, G * B * 2)

    return QuantScheme("mxfp4", "MXFP4: e2m1 values, e8m0 scale per 32", 4.25, "int8", True, group, floats, grid)


# --- GPTQ / AWQ ----------------------------------------------------------------------------------------------------

def _gptq(qc: dict[str, Any], folder: Path) -> QuantScheme:
    bits, group_size = qc.get("bits"), qc.get("group_size")
    if bits != 4 or not isinstance(group_size, int) or group_size <= 0:
        raise _unsupported(folder, "gptq", f"bits {bits!r}, group_size {group_size!r} (only 4-bit with groups)")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise _unsupported(folder, "gptq", f"checkpoint_format {fmt!r}")

    def group(stored: dict[str, TensorInfo]) -> dict[str, LogicalTensor]:
        out = {}
        for name in _with_suffix(stored, ".qweight"):
            qweight = stored[f"{name}.qweight"]
            parts = [f"{name}.qweight", f"{name}.qzeros", f"{name}.scales"]
            for part in parts[1:]:
                _require(stored, part, f"{name}.weight")
            parts += [f"{name}.g_idx"] if f"{name}.g_idx" in stored else []
            K8, O = qweight.shape
            out[f"{name}.weight"] = LogicalTensor(f"{name}.weight", (O, K8 * 8), tuple(parts), True)
        return out

    def grid_or_floats(read: ReadStored, t: LogicalTensor):
        from .codecs import gptq

        g_idx = read(t.parts[3]) if len(t.parts) > 3 else None
        return gptq(read(t.parts[0]), read(t.parts[1]), read(t.parts[2]), g_idx, group_size=group_size, bits=4,
                    checkpoint_format=fmt)

    label = f"GPTQ int4, scale and zero per {group_size}" + (", act-order" if qc.get("desc_act") else "")
    # A symmetric checkpoint's offset -8 * scale is exact in fp16; -zero * scale rarely is.
    exact = bool(qc.get("sym", True)) and group_size % 32 == 0
    mapping = ("dequantized, requantized per 32" if qc.get("desc_act") or group_size % 32
               else "exact" if exact else "grid kept, offsets rounded to fp16")
    return QuantScheme("gptq", label, 4 + 16 / group_size + 4 / group_size, "int4", mapping == "exact", group,
                       _floats_of(grid_or_floats), _grid_only(grid_or_floats), round_scales=True, mapping=mapping)


def _awq(qc: dict[str, Any], folder: Path) -> QuantScheme:
    bits = qc.get("bits", qc.get("w_bit"))
    group_size = qc.get("group_size", qc.get("q_group_size"))
    version = str(qc.get("version", "gemm")).lower()
    if bits != 4 or not isinstance(group_size, int) or version != "gemm" or not qc.get("zero_point", True):
        raise _unsupported(folder, "awq", f"bits {bits!r}, group_size {group_size!r}, version {version!r} "
                                          "(only 4-bit gemm with zero points)")

    def group(stored: dict[str, TensorInfo]) -> dict[str, LogicalTensor]:
        out = {}
        for name in _with_suffix(stored, ".qweight"):
            parts = (f"{name}.qweight", f"{name}.qzeros", f"{name}.scales")
            scales = _require(stored, parts[2], f"{name}.weight")
            _require(stored, parts[1], f"{name}.weight")
            K = stored[parts[0]].shape[0]
            out[f"{name}.weight"] = LogicalTensor(f"{name}.weight", (scales.shape[1], K), parts, True)
        return out

    def grid(read: ReadStored, t: LogicalTensor) -> IntGroups:
        from .codecs import awq

        return awq(read(t.parts[0]), read(t.parts[1]), read(t.parts[2]), group_size)

    return QuantScheme("awq", f"AWQ int4, scale and zero per {group_size}", 4 + 16 / group_size + 4 / group_size,
                       "int4", False, group, _floats_of(grid), grid, round_scales=True,
                       mapping="grid kept, offsets rounded to fp16")


def _floats_of(grid_or_floats: Callable[[ReadStored, LogicalTensor], Any]
               ) -> Callable[[ReadStored, LogicalTensor], torch.Tensor]:
    """float32 weights from a reader that gives IntGroups (or, GPTQ with act-order, floats directly)."""

    def floats(read: ReadStored, t: LogicalTensor) -> torch.Tensor:
        value = grid_or_floats(read, t)
        return value.float() if isinstance(value, torch.Tensor) else torch.from_numpy(value.dequantize())

    return floats


def _grid_only(grid_or_floats: Callable[[ReadStored, LogicalTensor], Any]
               ) -> Callable[[ReadStored, LogicalTensor], "IntGroups | None"]:
    def grid(read: ReadStored, t: LogicalTensor):
        value = grid_or_floats(read, t)
        return None if isinstance(value, torch.Tensor) else value

    return grid

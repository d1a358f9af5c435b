"""Small building blocks: RMSNorm, LayerNorm, Linear (and its packed twins: QuantLinear for the CPU kernels,
model/device_quant.py's DeviceQuantLinear for the device tier) and the SwiGLU MLP used for dense layers and shared
experts."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..weights.source import DenseWeight, WeightSource
from .device_quant import DeviceQuantLinear, Int4Weight, Int8Weight, concat_outputs


class RMSNorm(nn.Module):
    """x / rms(x) * weight; `zero_centred` (Qwen3-Next, Qwen3.5) stores weights around 0 and scales by
    (1 + weight) in fp32 before casting back, as their reference does."""

    def __init__(self, weight: torch.Tensor, eps: float, zero_centred: bool = False):
        super().__init__()
        self.zero_centred = zero_centred
        self.weight = 1.0 + weight.float() if zero_centred else weight  # [dim]
        self.eps = eps

    @classmethod
    def load(cls, src: WeightSource, name: str, dim: int, eps: float, zero_centred: bool = False) -> "RMSNorm":
        return cls(src.take(f"{name}.weight", (dim,)), eps, zero_centred)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centred:
            return (x32 * self.weight).to(x.dtype)
        # Normalise in fp32 and cast back before the weight, as the reference does.
        return self.weight * x32.to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (the lightning indexer's key norm), in the input's dtype as torch's."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, eps: float):
        super().__init__()
        self.weight, self.bias, self.eps = weight, bias, eps

    @classmethod
    def load(cls, src: WeightSource, name: str, dim: int, eps: float) -> "LayerNorm":
        return cls(src.take(f"{name}.weight", (dim,)), src.take(f"{name}.bias", (dim,)), eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class Linear(nn.Module):
    """y = x W^T (+ b) in torch."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = weight  # [out, in]
        self.bias = bias

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class QuantLinear(nn.Module):
    """y = x W^T (+ b) with W packed (int8 / int4 / bf16, csrc_py.formats) and run by the CPU kernels: the dense
    path of CPU-only runs (attention and MLA projections, dense MLPs, shared experts, LM head)."""

    def __init__(self, packed, bias: torch.Tensor | None = None):
        super().__init__()
        self.packed = packed  # PackedMatrix [1, out, in]
        self.bias = bias

    @property
    def out_features(self) -> int:
        return self.packed.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from csrc_py.dispatch import linear

        y = linear(x, self.packed)
        return y if self.bias is None else y + self.bias


class HeadsLinear(nn.Module):
    """y[h] = x[h] W[h]^T for a stack of per-head matrices W [heads, out, in] packed as int8 / int4 / int4s and run
    by the CPU kernels, every head in one call (MLA's absorbed W_UK and W_UV on a CPU-only run)."""

    def __init__(self, packed):
        super().__init__()
        self.packed = packed  # PackedMatrix [heads, out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [heads, N, in] -> [heads, N, out]."""
        from csrc_py.dispatch import heads_linear

        return heads_linear(x, self.packed)

    def dequantized(self) -> torch.Tensor:
        """The matrices as the kernels see them, dequantized: float32 [heads, out, in]."""
        from csrc_py.formats import unpack

        return torch.from_numpy(unpack(self.packed))


class FusedLinear(nn.Module):
    """QuantLinears that read the same input (q/k/v, gate/up) run as one packed matrix: one kernel call, the input
    quantized once. Returns each part's output, as views of the fused result."""

    def __init__(self, parts: list[QuantLinear]):
        super().__init__()
        from csrc_py.formats import concat_outputs

        self.packed, self.starts = concat_outputs([p.packed for p in parts])
        self.widths = [p.out_features for p in parts]
        self.bias = stacked_bias(parts, self.starts, self.packed.shape[1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from csrc_py.dispatch import linear

        y = linear(x, self.packed)  # [..., O of all parts, panel-aligned]
        if self.bias is not None:
            y = y + self.bias
        return tuple(y[..., start: start + width] for start, width in zip(self.starts, self.widths))


class FusedDeviceQuantLinear(nn.Module):
    """DeviceQuantLinears that read the same input run as one stacked weight (device_quant.concat_outputs): one
    kernel call on the device tier. Returns each part's output, as views of the fused result."""

    def __init__(self, parts: list[DeviceQuantLinear]):
        super().__init__()
        weight, self.starts = concat_outputs([p.weight for p in parts])
        self.widths = [p.out_features for p in parts]
        self.linear = DeviceQuantLinear(weight, stacked_bias(parts, self.starts, weight.shape[0]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.linear(x)  # [..., O of all parts]
        return tuple(y[..., start: start + width] for start, width in zip(self.starts, self.widths))


def stacked_bias(parts: list[nn.Module], starts: list[int], rows: int) -> torch.Tensor | None:
    """The biases of Linears stacked along their outputs (zeros between and for parts without one); None if none
    has a bias."""
    biases = [p.bias for p in parts]
    first = next((b for b in biases if b is not None), None)
    if first is None:
        return None
    bias = torch.zeros(rows, dtype=first.dtype, device=first.device)
    for b, start in zip(biases, starts):
        if b is not None:
            bias[start: start + b.shape[0]] = b
    return bias


class LinearGroup(nn.Module):
    """Linears that read the same input, run one after another (torch weights: nothing to gain from fusing)."""

    def __init__(self, parts: list[Linear | QuantLinear]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(part(x) for part in self.parts)


def group_linears(parts: list[Linear | QuantLinear | DeviceQuantLinear]
                  ) -> FusedLinear | FusedDeviceQuantLinear | LinearGroup:
    """parts(x) as one call: fused when all are packed (for the CPU kernels or the device tier's) in one format and
    input width."""
    packed = [p.packed for p in parts if isinstance(p, QuantLinear)]
    if len(packed) == len(parts) and len({(m.fmt, m.shape[2]) for m in packed}) == 1:
        return FusedLinear(parts)
    device = [p.weight for p in parts if isinstance(p, DeviceQuantLinear)]
    if len(device) == len(parts) and len({(w.fmt, w.shape[1]) for w in device}) == 1:
        return FusedDeviceQuantLinear(parts)
    return LinearGroup(parts)


def make_linear(weight: DenseWeight, bias: torch.Tensor | None = None) -> Linear | QuantLinear | DeviceQuantLinear:
    """The module for a weight as the source hands it: a tensor (torch), packed for the CPU kernels, or quantized
    for the device tier's torch kernels."""
    if isinstance(weight, torch.Tensor):
        return Linear(weight, bias)
    if isinstance(weight, (Int8Weight, Int4Weight)):
        return DeviceQuantLinear(weight, bias)
    return QuantLinear(weight, bias)


def load_linear(src: WeightSource, name: str, out_dim: int, in_dim: int, bias: bool = False,
                quantize: bool = True) -> Linear | QuantLinear | DeviceQuantLinear:
    """The Linear `name` (weight [out_dim, in_dim], optional bias): a QuantLinear when its weight is packed in the
    checkpoint or the source quantizes dense weights for the CPU kernels, a DeviceQuantLinear when it quantizes them
    for the device tier (`quantize=False` keeps a weight in the model dtype: a gate of one row, MLA's kv_b_proj
    whose halves the absorbed form multiplies directly)."""
    weight = src.linear_weight(f"{name}.weight", (out_dim, in_dim), quantize)
    return make_linear(weight, src.take(f"{name}.bias", (out_dim,)) if bias else None)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): dense MLP layers and shared experts."""

    def __init__(self, gate: Linear | QuantLinear, up: Linear | QuantLinear, down: Linear | QuantLinear):
        super().__init__()
        self.gate_up, self.down = group_linears([gate, up]), down

    @classmethod
    def load(cls, src: WeightSource, name: str, hidden: int, intermediate: int,
             proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"), bias: bool = False) -> "SwiGLU":
        return cls(
            load_linear(src, f"{name}.{proj[0]}", intermediate, hidden, bias),
            load_linear(src, f"{name}.{proj[1]}", intermediate, hidden, bias),
            load_linear(src, f"{name}.{proj[2]}", hidden, intermediate, bias),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down(F.silu(gate) * up)

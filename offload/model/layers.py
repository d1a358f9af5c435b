"""Small building blocks: RMSNorm, Linear (and its packed twin QuantLinear) and the SwiGLU MLP used for dense
layers and shared experts."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..weights.source import DenseWeight, WeightSource


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = weight
        self.eps = eps

    @classmethod
    def load(cls, src: WeightSource, name: str, dim: int, eps: float) -> "RMSNorm":
        return cls(src.take(f"{name}.weight", (dim,)), eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, as the reference does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


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


def make_linear(weight: DenseWeight, bias: torch.Tensor | None = None) -> Linear | QuantLinear:
    return Linear(weight, bias) if isinstance(weight, torch.Tensor) else QuantLinear(weight, bias)


def load_linear(src: WeightSource, name: str, out_dim: int, in_dim: int, bias: bool = False,
                quantize: bool = True) -> Linear | QuantLinear:
    """The Linear `name` (weight [out_dim, in_dim], optional bias): a QuantLinear when its weight is packed in the
    checkpoint or the source quantizes dense weights (`quantize=False` keeps a weight in torch: a gate of one row,
    MLA's kv_b_proj whose halves the absorbed form multiplies directly)."""
    weight = src.linear_weight(f"{name}.weight", (out_dim, in_dim), quantize)
    return make_linear(weight, src.take(f"{name}.bias", (out_dim,)) if bias else None)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): dense MLP layers and shared experts."""

    def __init__(self, gate: Linear | QuantLinear, up: Linear | QuantLinear, down: Linear | QuantLinear):
        super().__init__()
        self.gate, self.up, self.down = gate, up, down

    @classmethod
    def load(cls, src: WeightSource, name: str, hidden: int, intermediate: int,
             proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> "SwiGLU":
        return cls(
            load_linear(src, f"{name}.{proj[0]}", intermediate, hidden),
            load_linear(src, f"{name}.{proj[1]}", intermediate, hidden),
            load_linear(src, f"{name}.{proj[2]}", hidden, intermediate),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))

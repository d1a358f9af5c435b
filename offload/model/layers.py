"""Small building blocks: RMSNorm, Linear and the SwiGLU MLP used for dense layers and shared experts."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..weights.source import WeightSource


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
    """y = x W^T (+ b). A quantized linear with the same call can replace it after loading."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = weight  # [out, in]
        self.bias = bias

    @classmethod
    def load(cls, src: WeightSource, name: str, out_dim: int, in_dim: int, bias: bool = False) -> "Linear":
        return cls(
            src.take(f"{name}.weight", (out_dim, in_dim)),
            src.take(f"{name}.bias", (out_dim,)) if bias else None,
        )

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): dense MLP layers and shared experts."""

    def __init__(self, gate: Linear, up: Linear, down: Linear):
        super().__init__()
        self.gate, self.up, self.down = gate, up, down

    @classmethod
    def load(cls, src: WeightSource, name: str, hidden: int, intermediate: int,
             proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> "SwiGLU":
        return cls(
            Linear.load(src, f"{name}.{proj[0]}", intermediate, hidden),
            Linear.load(src, f"{name}.{proj[1]}", intermediate, hidden),
            Linear.load(src, f"{name}.{proj[2]}", hidden, intermediate),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))

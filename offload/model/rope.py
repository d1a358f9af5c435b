"""Rotary position embeddings: default, linear, YaRN (with DeepSeek's mscale) and Llama-3's band scaling, as a
precomputed table."""
from __future__ import annotations

import math

import torch

from ..config import RopeConfig
from .positions import Positions


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_softmax_scale(rope: RopeConfig, head_dim: int) -> float:
    """DeepSeek multiplies the attention softmax scale by mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = head_dim**-0.5
    if rope.type != "default" and rope.mscale_all_dim:
        scale *= _yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    return scale


def inverse_frequencies(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """inv_freq [dim/2] and the factor that scales cos/sin (YaRN's attention factor, else 1)."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope.type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.type == "llama3":
        return llama3_frequencies(inv_freq, rope), 1.0
    if rope.type != "yarn":
        return inv_freq, 1.0

    factor = rope.factor
    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)

    original = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1 where the frequency is kept, 0 where it is interpolated
    interpolated = inv_freq / factor
    return interpolated * (1 - extrapolation) + inv_freq * extrapolation, attention_factor


def llama3_frequencies(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama-3's scaling of inv_freq [dim/2]: wavelengths longer than original / low_freq_factor are stretched by
    `factor`, those shorter than original / high_freq_factor kept, and the band between blended linearly in
    original / wavelength (transformers' _compute_llama3_parameters)."""
    original = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = original / rope.low_freq_factor, original / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    if rope.high_freq_factor == rope.low_freq_factor:
        return scaled  # no band between the two
    smooth = (original / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(in_band, blended, scaled)


class RotaryTable:
    """cos/sin for every position up to max_positions, computed once: [P, dim/2] each."""

    def __init__(self, rope: RopeConfig, dim: int, max_positions: int, device: torch.device, dtype: torch.dtype):
        inv_freq, attention_factor = inverse_frequencies(rope, dim)
        angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]  # [P, dim/2]
        self.cos = (angles.cos() * attention_factor).to(device=device, dtype=dtype)
        self.sin = (angles.sin() * attention_factor).to(device=device, dtype=dtype)

    @property
    def dim(self) -> int:
        return 2 * self.cos.shape[-1]

    def apply(self, x: torch.Tensor, start: int | Positions, interleaved: bool = False) -> torch.Tensor:
        """Rotate x [T, heads, d] for positions start..start+T-1: its first `dim` channels, the rest (partial
        RoPE, d > dim) pass through unchanged after them, as HF's apply_rotary_pos_emb does. Device positions
        gather their rows of the table (a slice at a host offset would be baked into a captured step).

        Half layout pairs x[i] with x[i + dim/2] (HF rotate_half). Interleaved layout pairs x[2i] with x[2i+1]
        (DeepSeek); its result is returned in half layout, which changes no dot product between rotated q and k.
        """
        T = x.shape[0]
        if isinstance(start, Positions):
            rows = start.tokens(T)
            cos, sin = self.cos.index_select(0, rows)[:, None, :], self.sin.index_select(0, rows)[:, None, :]
        else:
            cos = self.cos[start : start + T, None, :]  # [T, 1, dim/2]
            sin = self.sin[start : start + T, None, :]
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        if interleaved:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
        else:
            half = self.dim // 2
            x1, x2 = rot[..., :half], rot[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)

"""Plain numpy / torch versions of every kernel, written for clarity; the tests compare the kernels to these."""
from __future__ import annotations

import numpy as np
import torch

from csrc_py.formats import PackedMatrix, padded
from csrc_py.simd import GROUP, PANEL


def _pad(w: np.ndarray) -> np.ndarray:
    """[O, K] -> zero-padded float32 [Op, Kp]."""
    out = np.zeros((padded(w.shape[0]), padded(w.shape[1])), np.float32)
    out[: w.shape[0], : w.shape[1]] = w
    return out


def _tile(v: np.ndarray) -> np.ndarray:
    """Row-major bytes [Op, n] -> [Op/16, n/4, 16, 4] tiles (4 bytes of each of 16 rows per tile)."""
    Op, n = v.shape
    return np.ascontiguousarray(v.reshape(Op // PANEL, PANEL, n // 4, 4).transpose(0, 2, 1, 3))


def _scales(s: np.ndarray) -> np.ndarray:
    """[Op, G] -> [Op/16, G, 16]."""
    return np.ascontiguousarray(s.reshape(s.shape[0] // PANEL, PANEL, s.shape[1]).transpose(0, 2, 1))


def quantize_q8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One float32 [O, K] matrix -> (q int8 tiles, d float16 scales) as csrc_py.quant_kernels.quantize_q8."""
    g = _pad(w).reshape(padded(w.shape[0]), -1, GROUP)  # [Op, G, 32]
    d = (np.abs(g).max(-1) / np.float32(127)).astype(np.float16)
    df = d.astype(np.float32)
    inv = np.divide(np.float32(1), df, out=np.zeros_like(df), where=df > 0)
    q = np.clip(np.rint(g * inv[..., None]), -127, 127).astype(np.int8)
    return _tile(q.reshape(g.shape[0], -1)), _scales(d)


def quantize_q4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One float32 [O, K] matrix -> (q uint8 nibble tiles, d, m float16) as quantize_q4."""
    O, K = w.shape
    g = _pad(w).reshape(padded(O), -1, GROUP)
    real = np.zeros(g.shape, bool)
    real.reshape(padded(O), -1)[:O, :K] = True
    lo = np.where(real, g, np.inf).min(-1)
    hi = np.where(real, g, -np.inf).max(-1)
    lo, hi = np.where(np.isfinite(lo), lo, 0).astype(np.float32), np.where(np.isfinite(hi), hi, 0).astype(np.float32)
    d = ((hi - lo) / np.float32(15)).astype(np.float16)
    m = lo.astype(np.float16)
    df, mf = d.astype(np.float32), m.astype(np.float32)
    inv = np.divide(np.float32(1), df, out=np.zeros_like(df), where=df > 0)
    q = np.clip(np.rint((g - mf[..., None]) * inv[..., None]), 0, 15).astype(np.uint8)
    q = np.where(real, q, 0).reshape(g.shape[0], -1, 2, 4)  # [Op, Kp/8, low|high, 4]
    packed = q[:, :, 0, :] | (q[:, :, 1, :] << 4)
    return _tile(packed.reshape(g.shape[0], -1)), _scales(d), _scales(m)


def quantize_q4s(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One float32 [O, K] matrix -> (q uint8 nibble tiles, d float16) as quantize_q4s: llama.cpp's Q4_0 rounding
    (gguf-py's Q4_0.quantize_blocks) per group of 32, padding q = 8 (the value 0)."""
    O, K = w.shape
    g = _pad(w).reshape(padded(O), -1, GROUP)  # [Op, G, 32]; padding 0 never has the largest magnitude
    peak = np.take_along_axis(g, np.abs(g).argmax(-1)[..., None], -1)[..., 0]
    d = (peak / np.float32(-8)).astype(np.float32)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.trunc(g * inv[..., None] + np.float32(8.5)), 0, 15).astype(np.uint8)
    real = np.zeros(g.shape, bool)
    real.reshape(padded(O), -1)[:O, :K] = True
    q = np.where(real, q, 8).reshape(g.shape[0], -1, 2, 4)  # [Op, Kp/8, low|high, 4]
    packed = q[:, :, 0, :] | (q[:, :, 1, :] << 4)
    return _tile(packed.reshape(g.shape[0], -1)), _scales(d.astype(np.float16))


def dequantize(pm: PackedMatrix) -> np.ndarray:
    """A packed stack -> float32 [E, O, K], straight from the documented layout."""
    E, O, K = pm.shape
    if pm.fmt == "bf16":
        return (pm.q.astype(np.uint32) << 16).view(np.float32)
    _, Op, Kp = pm.padded_shape
    d = pm.d.astype(np.float32).transpose(0, 1, 3, 2).reshape(E, Op, Kp // GROUP)  # [E, Op, G]
    if pm.fmt == "int8":
        q = pm.q.transpose(0, 1, 3, 2, 4).reshape(E, Op, Kp).astype(np.float32)
        w = (q.reshape(E, Op, -1, GROUP) * d[..., None]).reshape(E, Op, Kp)
    else:
        b = pm.q.transpose(0, 1, 3, 2, 4).reshape(E, Op, Kp // 8, 4)
        q = np.stack([b & 15, b >> 4], axis=-2).reshape(E, Op, Kp).astype(np.float32)
        if pm.fmt == "int4s":  # W = d * (q - 8)
            q, m = q - 8, np.zeros_like(d)
        else:
            m = pm.m.astype(np.float32).transpose(0, 1, 3, 2).reshape(E, Op, Kp // GROUP)
        w = (q.reshape(E, Op, -1, GROUP) * d[..., None] + m[..., None]).reshape(E, Op, Kp)
    return np.ascontiguousarray(w[:, :O, :K])


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 [N, K] -> (int8 [N, Kp], float32 scales [N, G], int32 sums [N, G]) as quantize_activations."""
    N, K = x.shape
    g = np.zeros((N, padded(K)), np.float32)
    g[:, :K] = x
    g = g.reshape(N, -1, GROUP)
    amax = np.abs(g).max(-1)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    q = np.rint(g * inv[..., None]).astype(np.int8)
    return q.reshape(N, -1), amax / np.float32(127), q.astype(np.int32).sum(-1, dtype=np.int32)


def dequantize_activations(x: np.ndarray) -> np.ndarray:
    """x through the activation quantizer and back: what the int8/int4 kernels actually multiply."""
    q, s, _ = quantize_activations(x)
    return (q.reshape(q.shape[0], -1, GROUP) * s[..., None]).reshape(q.shape)[:, : x.shape[1]]


def linear(x: np.ndarray, pm: PackedMatrix, expert: int = 0) -> np.ndarray:
    """y = x @ W.T in float64 with the format's weights; activations as the kernel sees them."""
    w = dequantize(pm)[expert].astype(np.float64)
    xa = x if pm.fmt == "bf16" else dequantize_activations(x)
    return (xa.astype(np.float64) @ w.T).astype(np.float32)


def moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
        down: torch.Tensor) -> torch.Tensor:
    """The experts contract in float64, one token and one choice at a time: the ground truth (id -1: skipped)."""
    x64, y = x.double(), torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            if e < 0:
                continue
            h = torch.nn.functional.silu(gate[e].double() @ x64[t]) * (up[e].double() @ x64[t])
            y[t] += float(topk_weights[t, k]) * (down[e].double() @ h)
    return y.float()


def moe_packed(x: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray, gate: PackedMatrix, up: PackedMatrix,
               down: PackedMatrix) -> np.ndarray:
    """The fused layer kernel's arithmetic: packed weights, and for int8/int4 the activations quantized where
    the kernel quantizes them (x per token, the SiLU product per row). Differences are float rounding only."""
    wg, wu, wd = (dequantize(pm).astype(np.float64) for pm in (gate, up, down))
    quant = (lambda a: a) if gate.fmt == "bf16" else dequantize_activations
    xa = quant(x).astype(np.float64)
    y = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = topk_ids[t, k]
            if e < 0:
                continue
            g, u = wg[e] @ xa[t], wu[e] @ xa[t]
            h = (g / (1 + np.exp(-g)) * u).astype(np.float32)
            y[t] += topk_weights[t, k] * (wd[e] @ quant(h[None])[0].astype(np.float64))
    return y.astype(np.float32)

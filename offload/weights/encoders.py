"""Quantizers that write a float matrix [O, K] (HF Linear layout) as published checkpoints store it: the inverse
of offload.weights.codecs, for tests and for synthetic quantized checkpoints (tools/make_checkpoint.py).

Each returns torch tensors with the dtypes and shapes of the published files, under the names the checkpoints
give them (without the module prefix). All round to nearest (ties to even) on the scheme's grid with the scales
the reference quantizers derive (max-abs or min-max per block / group); none of them is GPTQ's or AWQ's
calibrated search, so a file written here is the round-to-nearest baseline of its format.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from offload.weights.codecs import AWQ_ORDER, FP8_BLOCK, MX_BLOCK

FP8_MAX = 448.0  # largest float8_e4m3fn
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)


def _float32(w: torch.Tensor | np.ndarray) -> torch.Tensor:
    w = torch.as_tensor(w)
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a float matrix [out, in], got {w.dtype}{list(w.shape)}")
    return w.detach().to("cpu", torch.float32)


def _pow2_at_least(x: torch.Tensor) -> torch.Tensor:
    """The exponent e of the smallest power of two 2^e >= x (x > 0), exactly (no log2 rounding)."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2^exponent, mantissa in [0.5, 1)
    return torch.where(mantissa == 0.5, exponent - 1, exponent)


def _pack_bits(values: torch.Tensor, bits: int = 4, order: list[int] | None = None) -> torch.Tensor:
    """Unsigned values [R, n] (n zero-padded to a whole word) -> int32 [R, ceil(n / (32/bits))]: position
    order[j] of each run of 32/bits values goes to bits bits*j .. of its word (order None: position j)."""
    per_word = 32 // bits
    R, n = values.shape
    v = F.pad(values.to(torch.int64), (0, -n % per_word)).reshape(R, -1, per_word)
    if order is not None:
        v = v[..., order]
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (v << shifts).sum(-1)  # [R, n/per_word], each < 2^32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def encode_fp8_block(w: torch.Tensor | np.ndarray, block: tuple[int, int] = FP8_BLOCK,
                     ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (weight float8_e4m3fn [O, K], weight_scale_inv [ceil(O/bo), ceil(K/bk)]) with W ~ weight * scale_inv.

    scale_inv = max|tile| / 448 in float32 (DeepSeek-V3), or with ue8m0 that rounded up to a power of two and
    stored as float8_e8m0fnu (as transformers' FP8 quantizer writes "scale_fmt": "ue8m0"; `.float()` gives the
    float32 powers of two other checkpoints store). An all-zero tile gets scale 1."""
    wf = _float32(w)
    bo, bk = block
    O, K = wf.shape
    tiles = F.pad(wf, (0, -K % bk, 0, -O % bo)).reshape(-(-O // bo), bo, -(-K // bk), bk)
    amax = tiles.abs().amax(dim=(1, 3))  # [O/bo, K/bk]
    inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if ue8m0:
        inv = torch.ldexp(torch.ones_like(inv), _pow2_at_least(inv).clamp(-127, 127))
    per_element = inv.repeat_interleave(bo, 0)[:O].repeat_interleave(bk, 1)[:, :K]
    weight = (wf / per_element).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    if ue8m0:
        codes = (_pow2_at_least(inv) + 127).clamp(0, 254).to(torch.uint8)
        return weight, codes.view(torch.float8_e8m0fnu)
    return weight, inv


def encode_compressed_int4(w: torch.Tensor | np.ndarray, group: int = 32, *, symmetric: bool = True,
                           scale_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """compressed-tensors "pack-quantized" int4 with group strategy, as compressed-tensors' min-max observer
    computes it: symmetric scale = max|group| / 7.5 (q = clamp(round(W / scale), -8, 7)), or asymmetric
    scale = (max - min) / 15 over a range that includes 0 and zero_point = clamp(round(-8 - min / scale), -8, 7).
    A zero scale becomes the scale dtype's eps, as there. -> {"weight_packed", "weight_scale", "weight_shape"}
    (+ "weight_zero_point" when asymmetric)."""
    wf = _float32(w)
    O, K = wf.shape
    if K % group:
        raise ValueError(f"compressed-tensors needs in_features divisible by group_size: {K} % {group}")
    g = wf.reshape(O, K // group, group)
    lo = g.amin(-1).clamp(max=0)
    hi = g.amax(-1).clamp(min=0)
    raw = torch.maximum(-lo, hi) / 7.5 if symmetric else (hi - lo) / 15
    scale = raw.to(scale_dtype)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale_dtype).eps, dtype=scale_dtype), scale)
    s = scale.float()[..., None]  # [O, G, 1]
    zp = torch.zeros(O, K // group) if symmetric else (-8 - lo / scale.float()).round().clamp(-8, 7)
    q = ((g / s).round() + zp[..., None]).clamp(-8, 7).reshape(O, K)
    out = {"weight_packed": _pack_bits((q + 8).to(torch.uint8)), "weight_scale": scale,
           "weight_shape": torch.tensor([O, K])}
    if not symmetric:
        out["weight_zero_point"] = _pack_bits((zp + 8).to(torch.uint8).T).T.contiguous()
    return out


def encode_mxfp4(w: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (blocks uint8 [O, K/32, 16], scales uint8 [O, K/32]) as gpt-oss stores them. Each block of 32 gets the
    smallest power-of-two scale with max|block| <= 6 * scale (nothing saturates; an all-zero block gets code 0)
    and each value the nearest e2m1 value, ties to the even mantissa."""
    wf = _float32(w)
    O, K = wf.shape
    if K % MX_BLOCK:
        raise ValueError(f"MXFP4 needs in_features divisible by {MX_BLOCK}, got {K}")
    g = wf.reshape(O, K // MX_BLOCK, MX_BLOCK)
    amax = g.abs().amax(-1)  # [O, G]
    exponent = torch.where(amax > 0, _pow2_at_least(amax / 6), torch.full_like(amax, -127, dtype=torch.int32))
    exponent = exponent.clamp(-127, 127)
    x = (g / torch.ldexp(torch.ones_like(amax), exponent)[..., None]).abs()
    # Index into E2M1_VALUES: one step past each midpoint; on a midpoint toward the even mantissa (0, 1, 2, 4).
    index = ((x > 0.25).int() + (x >= 0.75).int() + (x > 1.25).int() + (x >= 1.75).int() + (x > 2.5).int()
             + (x >= 3.5).int() + (x > 5).int())
    nibbles = (index + 8 * ((g < 0) & (index > 0)).int()).to(torch.uint8).reshape(O, K // MX_BLOCK, 16, 2)
    blocks = nibbles[..., 0] | (nibbles[..., 1] << 4)
    return blocks.contiguous(), (exponent + 127).to(torch.uint8)


def _group_columns(K: int, group: int, order: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """g_idx [K] and each group's columns when groups take consecutive runs of `order`."""
    g_idx = np.empty(K, np.int32)
    g_idx[order] = np.arange(K) // group
    return g_idx, [order[i: i + group] for i in range(0, K, group)]


def encode_gptq(w: torch.Tensor | np.ndarray, group: int = 128, act_order: bool = False, *, bits: int = 4,
                sym: bool = True, checkpoint_format: str = "gptq",
                perm: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """GPTQ's quantizer grid with round to nearest (no Hessian updates) -> {"qweight", "qzeros", "scales",
    "g_idx"} in AutoGPTQ's layout. Per group: range [min(min, 0), max(max, 0)] (symmetric: +-max|x|),
    scale = range / (2^bits - 1) in fp16, zero = 2^(bits-1) (sym) or round(-min / scale).

    act_order groups the columns in the order `perm` (default: descending column norm, standing in for the
    Hessian diagonal GPTQ sorts by), so g_idx is permuted and qweight stays in column order, as GPTQ writes
    desc_act checkpoints. checkpoint_format "gptq" stores zero - 1; there a zero of 0 would wrap around to the
    top code (AutoGPTQ's overflow, which every v1 reader decodes as 2^bits), so v1 zeros are kept >= 1."""
    wf = _float32(w)
    O, K = wf.shape
    per_word, maxq = 32 // bits, 2**bits - 1
    if bits not in (4, 8) or K % per_word or O % per_word:
        raise ValueError(f"GPTQ packs {per_word} values per int32 along both dims: bits {bits}, shape {[O, K]}")
    if act_order:
        order = np.argsort(-np.linalg.norm(wf.numpy(), axis=0), kind="stable") if perm is None else np.asarray(perm)
    else:
        order = np.arange(K)
    g_idx, groups = _group_columns(K, group, order)
    q = torch.empty(O, K, dtype=torch.int64)
    scales = torch.empty(len(groups), O, dtype=torch.float16)
    zeros = torch.empty(len(groups), O, dtype=torch.int64)
    for gi, cols in enumerate(groups):
        x = wf[:, torch.from_numpy(cols)]  # [O, n]
        lo, hi = x.amin(1).clamp(max=0), x.amax(1).clamp(min=0)
        if sym:
            hi = torch.maximum(-lo, hi)
            lo = torch.where(lo < 0, -hi, lo)
        both_zero = (lo == 0) & (hi == 0)
        lo, hi = torch.where(both_zero, -1.0, lo), torch.where(both_zero, 1.0, hi)
        scale = ((hi - lo) / maxq).to(torch.float16)
        s = scale.float()
        zero = torch.full((O,), (maxq + 1) // 2) if sym else (-lo / s).round().to(torch.int64)
        zero = zero.clamp(1 if checkpoint_format == "gptq" else 0, maxq)
        q[:, torch.from_numpy(cols)] = ((x / s[:, None]).round().to(torch.int64) + zero[:, None]).clamp(0, maxq)
        scales[gi], zeros[gi] = scale, zero
    stored_zeros = zeros - 1 if checkpoint_format == "gptq" else zeros
    return {"qweight": _pack_bits(q, bits).T.contiguous(),  # [K/per_word, O]: packed along the input dim
            "qzeros": _pack_bits(stored_zeros, bits), "scales": scales, "g_idx": torch.from_numpy(g_idx)}


def encode_awq(w: torch.Tensor | np.ndarray, group: int = 128) -> dict[str, torch.Tensor]:
    """AutoAWQ's zero-point quantizer with round to nearest (no activation-aware scale search) -> {"qweight",
    "qzeros", "scales"} in the "gemm" layout. Per group of input columns: scale = max(max - min, 1e-5) / 15 in
    fp16, zero = clamp(-round(min / scale), 0, 15), q = clamp(round(W / scale) + zero, 0, 15)."""
    wf = _float32(w)
    O, K = wf.shape
    if K % group or O % 8:
        raise ValueError(f"AWQ needs in_features divisible by group_size and out_features by 8, got {[O, K]}, "
                         f"group {group}")
    g = wf.reshape(O, K // group, group)
    lo, hi = g.amin(-1), g.amax(-1)  # [O, G]
    scale = ((hi - lo).clamp(min=1e-5) / 15).to(torch.float16)
    s = scale.float()
    zero = (-(lo / s).round()).clamp(0, 15)
    q = ((g / s[..., None]).round() + zero[..., None]).clamp(0, 15).reshape(O, K)
    return {"qweight": _pack_bits(q.T.to(torch.uint8), 4, AWQ_ORDER),
            "qzeros": _pack_bits(zero.T.to(torch.uint8), 4, AWQ_ORDER), "scales": scale.T.contiguous()}

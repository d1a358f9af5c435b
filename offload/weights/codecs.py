"""Decoders for the quantized layouts published Hugging Face checkpoints store, from the tensors alone (no I/O).

Each decoder takes one matrix's stored tensors (torch tensors as safetensors reads them, or numpy arrays) and
returns either the matrix on its integer grid (`IntGroups`: what `csrc_py.formats.pack_groups` can move into
offload's int8/int4 layouts without requantizing) or, where the layout has no such grid (FP8, GPTQ with
act-order), the float32 matrix. Every matrix is in HF Linear layout [out, in] = [O, K].

The layouts follow these files (facts checked against them; docs/formats.md, "Published quantized layouts"):

- FP8 block: DeepSeek-V3's `inference/kernel.py` `weight_dequant` and transformers `integrations/finegrained_fp8.py`
  (`_dequantize_fp8_weight`, `Fp8Dequantize`): W = weight * weight_scale_inv per 128 x 128 tile.
- compressed-tensors "pack-quantized": `compressed_tensors/compressors/pack_quantized/helpers.py`
  (`pack_to_int32`, `unpack_from_int32`) and `quantization/lifecycle/forward_helpers.py` (`_dequantize`).
- MXFP4: transformers `integrations/mxfp4.py` (`FP4_VALUES`, `_convert_moe_packed_tensors`).
- GPTQ: AutoGPTQ `auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py` (`pack`, the torch forward), GPTQModel's
  gptq_v1 -> gptq_v2 zero-point conversion.
- AWQ: AutoAWQ `awq/modules/linear/gemm.py` (`WQLinear_GEMM.from_linear`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from offload.errors import CheckpointError

FP8_BLOCK = (128, 128)
MX_BLOCK = 32  # MXFP4: values per shared e8m0 scale
# An e2m1 nibble (sign bit 3, exponent bits 2-1, mantissa bit 0) as twice its value: 0, 0.5, 1, 1.5, 2, 3, 4, 6.
E2M1_TIMES_2 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)
E8M0_NAN = 255  # the one e8m0 code that is not a power of two


@dataclass(frozen=True)
class IntGroups:
    """A matrix on an integer grid: W[o, k] = q[o, k] * scale[o, k // group] + offset[o, k // group]."""

    q: np.ndarray               # [O, K] int8 (signed grids) or uint8 (unsigned grids)
    scale: np.ndarray           # [O, ceil(K / group)] float32
    offset: np.ndarray | None   # same shape as scale; None means 0
    group: int

    def __post_init__(self) -> None:
        O, K = self.q.shape
        G = -(-K // self.group)
        if self.q.dtype not in (np.int8, np.uint8) or self.scale.shape != (O, G) or self.scale.dtype != np.float32 \
                or (self.offset is not None and (self.offset.shape != (O, G) or self.offset.dtype != np.float32)):
            raise ValueError(f"IntGroups needs q int8/uint8 [O, K] and float32 scale/offset [O, ceil(K/group)], got "
                             f"q {self.q.dtype}{list(self.q.shape)}, scale {self.scale.dtype}{list(self.scale.shape)}"
                             f", group {self.group}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def expand(self, a: np.ndarray) -> np.ndarray:
        """A per-group array [O, G] repeated over each group's columns: [O, K]."""
        return np.repeat(a, self.group, axis=1)[:, : self.q.shape[1]]

    def dequantize(self) -> np.ndarray:
        """float32 [O, K]: q * scale, then + offset, each rounded to float32 (what offload's unpack computes)."""
        w = self.q.astype(np.float32) * self.expand(self.scale)
        if self.offset is not None:
            w += self.expand(self.offset)
        return w


def _numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """A stored tensor as numpy; bf16 (which numpy lacks) widens exactly to float32."""
    if isinstance(t, np.ndarray):
        return t
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _float32(t: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(_numpy(t), np.float32)


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise CheckpointError(message)


def _shape(t: torch.Tensor | np.ndarray) -> list[int]:
    return list(t.shape)


def _unpack_bits(words: np.ndarray, bits: int = 4, order: list[int] | None = None) -> np.ndarray:
    """int32 words [..., n] -> uint8 values [..., n * 32/bits]: value j of a word (bits bits*j .. bits*j+bits-1)
    lands at position order[j] of its word's 32/bits (order None: position j, the lowest bits first)."""
    u = np.ascontiguousarray(words).view(np.uint32)
    per_word = 32 // bits
    shifts = np.arange(per_word, dtype=np.uint32) * bits
    values = ((u[..., None] >> shifts) & ((1 << bits) - 1)).astype(np.uint8)  # [..., n, 32/bits] in bit order
    if order is not None:
        placed = np.empty_like(values)
        placed[..., order] = values
        values = placed
    return values.reshape(*u.shape[:-1], u.shape[-1] * per_word)


def e8m0_to_float32(bits: np.ndarray) -> np.ndarray:
    """e8m0 codes (uint8) -> float32 2^(code - 127) exactly (code 0 is the subnormal 2^-127)."""
    _need(not (bits == E8M0_NAN).any(), "an e8m0 scale holds 255 (NaN): the checkpoint's scales are corrupt; "
                                        "re-download it")
    return np.ldexp(np.float32(1), bits.astype(np.int32) - 127).astype(np.float32)


def _fp8_scales(scale_inv: torch.Tensor | np.ndarray) -> torch.Tensor:
    """weight_scale_inv as float32: fp32 (DeepSeek-V3 style), or e8m0 stored as uint8 or float8_e8m0fnu."""
    if isinstance(scale_inv, torch.Tensor) and scale_inv.dtype == getattr(torch, "float8_e8m0fnu", None):
        scale_inv = scale_inv.view(torch.uint8)
    s = _numpy(scale_inv)
    if s.dtype == np.uint8:
        return torch.from_numpy(e8m0_to_float32(s))
    return torch.from_numpy(_float32(s))


def fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor | np.ndarray,
              block: tuple[int, int] = FP8_BLOCK) -> torch.Tensor:
    """Block-scaled FP8 (DeepSeek-V3, Qwen3-FP8, Kimi-K2, MiniMax-M2, GLM-4.5-FP8): weight float8_e4m3fn [O, K],
    scale_inv [ceil(O/bo), ceil(K/bk)] -> float32 [O, K] = weight * scale_inv of its tile (edge tiles may be
    ragged). One tile-row at a time: the only [O, K] array is the output."""
    _need(weight.dtype == torch.float8_e4m3fn and weight.dim() == 2,
          f"an FP8 block weight must be float8_e4m3fn [out, in], got {weight.dtype}{_shape(weight)}")
    bo, bk = block
    O, K = weight.shape
    tiles = (-(-O // bo), -(-K // bk))
    _need(tuple(scale_inv.shape) == tiles,
          f"weight_scale_inv {_shape(scale_inv)} does not cover weight {[O, K]} in {bo}x{bk} tiles: expected "
          f"{list(tiles)}; check weight_block_size in quantization_config")
    s = _fp8_scales(scale_inv)  # [O/bo, K/bk]
    out = torch.empty(O, K, dtype=torch.float32)
    for t in range(tiles[0]):
        rows = slice(t * bo, min(O, t * bo + bo))
        per_column = s[t].repeat_interleave(bk)[:K]  # [K]
        torch.mul(weight[rows].to(torch.float32), per_column, out=out[rows])
    return out


def compressed_int4(weight_packed: torch.Tensor | np.ndarray, weight_scale: torch.Tensor | np.ndarray,
                    weight_shape: torch.Tensor | np.ndarray | tuple[int, int], group_size: int | None = 32,
                    weight_zero_point: torch.Tensor | np.ndarray | None = None) -> IntGroups:
    """compressed-tensors "pack-quantized" 4-bit (Kimi-K2-Thinking / K2.5 experts): weight_packed int32
    [O, ceil(K/8)] holds q + 8 (q in -8..7), column 8i + j in bits 4j..4j+3 of word i; weight_scale [O, K/group]
    (bf16 / fp16 / fp32); weight_shape = (O, K); group_size None means one group per row (channel strategy).
    An asymmetric scheme adds weight_zero_point int32 [ceil(O/8), K/group], packed the same way but along the
    output dimension (row 8i + j in word i). W = (q - zero_point) * scale, a signed grid."""
    O, K = (int(v) for v in _numpy(torch.as_tensor(weight_shape)).reshape(-1))
    packed, scale = _numpy(weight_packed), _float32(weight_scale)
    group = K if group_size is None or group_size < 0 else int(group_size)
    _need(packed.dtype == np.int32 and packed.shape == (O, -(-K // 8)),
          f"weight_packed must be int32 [{O}, {-(-K // 8)}] for weight_shape {[O, K]}, got "
          f"{packed.dtype}{list(packed.shape)}")
    _need(K % group == 0 and scale.shape == (O, K // group),
          f"weight_scale {list(scale.shape)} does not match weight_shape {[O, K]} with group_size {group}: "
          f"expected [{O}, {K // group}] (compressed-tensors needs in_features divisible by group_size)")
    q = (_unpack_bits(packed)[:, :K].astype(np.int16) - 8).astype(np.int8)  # [O, K]
    offset = None
    if weight_zero_point is not None:
        zp_packed = _numpy(weight_zero_point)
        _need(zp_packed.dtype == np.int32 and zp_packed.shape == (-(-O // 8), K // group),
              f"weight_zero_point must be int32 [{-(-O // 8)}, {K // group}] (packed along the output dim), got "
              f"{zp_packed.dtype}{list(zp_packed.shape)}")
        zp = _unpack_bits(zp_packed.T)[:, :O].T.astype(np.float32) - 8  # [O, G]
        offset = -zp * scale
    return IntGroups(np.ascontiguousarray(q), scale, offset, group)


def mxfp4(blocks: torch.Tensor | np.ndarray, scales: torch.Tensor | np.ndarray) -> IntGroups:
    """MXFP4 (gpt-oss, DeepSeek-V4-Flash): blocks uint8 [O, K/32, 16], two e2m1 values per byte (column 2b in
    the low nibble, 2b + 1 in the high), scales uint8 [O, K/32] e8m0 (2^(e - 127)). Exactly an int8 grid:
    q = 2 * e2m1 value (0, +-1, +-2, +-3, +-4, +-6, +-8, +-12), scale = 2^(e - 128)."""
    b, e = _numpy(blocks), _numpy(scales)
    _need(b.dtype == np.uint8 and b.ndim == 3 and b.shape[2] == MX_BLOCK // 2 and e.dtype == np.uint8
          and e.shape == b.shape[:2],
          f"MXFP4 needs blocks uint8 [out, in/32, 16] and scales uint8 [out, in/32], got blocks "
          f"{b.dtype}{list(b.shape)}, scales {e.dtype}{list(e.shape)}")
    O, G, _ = b.shape
    nibbles = np.stack([b & 0xF, b >> 4], axis=-1).reshape(O, G * MX_BLOCK)  # [O, K]: low nibble first
    scale = e8m0_to_float32(e) * np.float32(0.5)  # 2^(e - 128): exact, 2^-128 included (a float32 subnormal)
    return IntGroups(E2M1_TIMES_2[nibbles], scale, None, MX_BLOCK)


def gptq(qweight: torch.Tensor | np.ndarray, qzeros: torch.Tensor | np.ndarray, scales: torch.Tensor | np.ndarray,
         g_idx: torch.Tensor | np.ndarray | None = None, *, group_size: int = 128, bits: int = 4,
         checkpoint_format: str = "gptq") -> IntGroups | torch.Tensor:
    """AutoGPTQ / GPTQModel / optimum GPTQ: qweight int32 [K*bits/32, O] packed along the input dim (row
    (32/bits)*i + j in bits bits*j.. of word i), qzeros int32 [G, O*bits/32] packed along the output dim the same
    way, scales fp16 [G, O], g_idx int32 [K] (group of each input column). W[o, k] = (q - zero) * scale of group
    g_idx[k]. checkpoint_format "gptq" (v1) stores zero - 1, "gptq_v2" the zero itself. A symmetric checkpoint
    needs no flag: its zeros are stored like any other (2^(bits-1)).

    Columns in group order (g_idx[k] == k // group_size, or no g_idx) give IntGroups (unsigned q,
    offset = -zero * scale); act-order (a permuted g_idx) gives the float32 matrix [O, K]."""
    _need(bits in (4, 8), f"GPTQ with bits={bits} is not supported: only 4 and 8")
    _need(checkpoint_format in ("gptq", "gptq_v2"),
          f"unknown GPTQ checkpoint_format {checkpoint_format!r}: expected 'gptq' or 'gptq_v2'")
    qw, qz, s = _numpy(qweight), _numpy(qzeros), _float32(scales)
    per_word = 32 // bits
    K, O = qw.shape[0] * per_word, s.shape[1]
    group = K if group_size is None or group_size < 0 else int(group_size)
    G = -(-K // group)
    _need(qw.dtype == np.int32 and qz.dtype == np.int32 and qw.shape[1] == O and s.shape[0] == G
          and qz.shape == (G, -(-O // per_word)),
          f"GPTQ tensors do not fit together (bits {bits}, group_size {group}): qweight {qw.dtype}{list(qw.shape)}, "
          f"qzeros {qz.dtype}{list(qz.shape)}, scales {list(s.shape)}; expected qweight int32 [{K // per_word}, O], "
          f"qzeros int32 [{G}, O/{per_word}], scales [{G}, O]")
    q = _unpack_bits(qw.T, bits)  # [O, K]
    zero = _unpack_bits(qz, bits)[:, :O].astype(np.float32)  # [G, O]
    if checkpoint_format == "gptq":
        zero += 1
    in_order = np.arange(K) // group
    if g_idx is not None:
        gi = _numpy(g_idx).astype(np.int64)
        _need(gi.shape == (K,) and gi.min(initial=0) >= 0 and gi.max(initial=0) < G,
              f"g_idx must be [{K}] with values in 0..{G - 1}, got {list(gi.shape)}")
        if not np.array_equal(gi, in_order):
            w = (q.astype(np.float32) - zero.T[:, gi]) * s.T[:, gi]  # [O, K]: exact (integer times fp16)
            return torch.from_numpy(w)
    return IntGroups(q, np.ascontiguousarray(s.T), np.ascontiguousarray(-zero.T * s.T), group)


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble j of a word holds column AWQ_ORDER[j] of its 8


def awq(qweight: torch.Tensor | np.ndarray, qzeros: torch.Tensor | np.ndarray, scales: torch.Tensor | np.ndarray,
        group_size: int) -> IntGroups:
    """AutoAWQ "gemm": qweight int32 [K, O/8] packed along the output dim, nibble j of word c holding column
    8c + AWQ_ORDER[j]; qzeros int32 [K/group, O/8] the same; scales fp16 [K/group, O].
    W[o, k] = (q - zero) * scale (zeros stored as they are, unlike GPTQ v1)."""
    qw, qz, s = _numpy(qweight), _numpy(qzeros), _float32(scales)
    K, O = qw.shape[0], s.shape[1]
    _need(K % group_size == 0 and qw.dtype == np.int32 and qz.dtype == np.int32 and qw.shape == (K, O // 8)
          and O % 8 == 0 and qz.shape == (K // group_size, O // 8) and s.shape[0] == K // group_size,
          f"AWQ tensors do not fit together (group_size {group_size}): qweight {qw.dtype}{list(qw.shape)}, "
          f"qzeros {qz.dtype}{list(qz.shape)}, scales {list(s.shape)}; expected qweight int32 [K, O/8], "
          f"qzeros int32 [K/{group_size}, O/8], scales [K/{group_size}, O]")
    q = _unpack_bits(qw, 4, AWQ_ORDER)  # [K, O]
    zero = _unpack_bits(qz, 4, AWQ_ORDER).astype(np.float32)  # [G, O]
    return IntGroups(np.ascontiguousarray(q.T), np.ascontiguousarray(s.T), np.ascontiguousarray(-zero.T * s.T),
                     group_size)

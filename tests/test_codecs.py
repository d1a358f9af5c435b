"""Decoders of published quantized layouts (offload/weights/codecs.py) against independent references,
the encoders (offload/weights/encoders.py) as round-to-nearest quantizers, and pack_groups' exact mapping onto
offload's int8/int4 formats (csrc_py/formats.py).

References: transformers' own FP8 and MXFP4 dequantization and compressed-tensors' own unpack/compress run
here on the CPU; for GPTQ and AWQ, loops over the bits written from the published packing code."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
# transformers' private helpers are the code that loads these checkpoints there: the reference to match.
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from csrc_py import dispatch, formats
from offload.errors import CheckpointError
from offload.weights import codecs, encoders
from offload.weights.codecs import IntGroups

try:  # the package that writes these checkpoints (the test extra installs it)
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
except ImportError:
    PackedQuantizationCompressor = None
needs_compressed_tensors = pytest.mark.skipif(PackedQuantizationCompressor is None,
                                              reason="compressed-tensors is not installed (pip install -e .[test])")

E4M3_NAN = (0x7F, 0xFF)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def gaussian(O: int, K: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(rng(seed).standard_normal((O, K)).astype(np.float32) * 0.02)


def random_words(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return rng(seed).integers(0, 2**32, shape, dtype=np.uint64).astype(np.uint32).view(np.int32)


def same_bits(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> bool:
    a, b = (np.ascontiguousarray(np.asarray(x, np.float32)) for x in (a, b))
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def dense(decoded: IntGroups | torch.Tensor) -> np.ndarray:
    return decoded.dequantize() if isinstance(decoded, IntGroups) else decoded.numpy()


def assert_nearest(g: IntGroups, w: torch.Tensor, codes: np.ndarray) -> None:
    """Every decoded value is (one of) the nearest point(s) of its group's grid {code * scale + offset}."""
    s, off = g.expand(g.scale).astype(np.float64), g.expand(g.offset if g.offset is not None else 0 * g.scale)
    grid = codes.astype(np.float64)[:, None, None] * s + off  # [codes, O, K]
    wd = w.numpy().astype(np.float64)
    best = np.abs(grid - wd).min(0)
    assert (np.abs(g.dequantize() - wd) <= best + 1e-5 * s).all()


# ---- FP8 block ----------------------------------------------------------------------------------------------

def random_e4m3(O: int, K: int, seed: int) -> torch.Tensor:
    bits = rng(seed).integers(0, 256, (O, K), dtype=np.uint8)
    bits[np.isin(bits, E4M3_NAN)] = 0
    return torch.from_numpy(bits).view(torch.float8_e4m3fn)


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (77, 129)])
def test_fp8_block_matches_transformers(shape):
    """fp32 scales, ragged edge tiles included, bit for bit as transformers' FP8 dequantization."""
    O, K = shape
    weight = random_e4m3(O, K, 1)
    scale = torch.from_numpy(rng(2).uniform(1e-4, 1e-2, (-(-O // 128), -(-K // 128))).astype(np.float32))
    ref = _dequantize_fp8_weight(weight, scale, [128, 128], torch.float32)
    assert same_bits(codecs.fp8_block(weight, scale), ref)


def test_fp8_block_ue8m0_scales_in_every_storage():
    """e8m0 scales as uint8 codes, float8_e8m0fnu or float32 powers of two decode alike, as transformers."""
    weight = random_e4m3(256, 384, 3)
    codes = torch.from_numpy(rng(4).integers(110, 135, (2, 3), dtype=np.uint8))
    ref = Fp8Dequantize(None)._dequantize_one(weight, codes, output_dtype=torch.float32)
    as_float = torch.ldexp(torch.ones(2, 3), codes.to(torch.int32) - 127)
    for scale in (codes, codes.view(torch.float8_e8m0fnu), as_float):
        assert same_bits(codecs.fp8_block(weight, scale), ref)


def test_fp8_block_rejects_bad_input():
    weight = random_e4m3(200, 300, 5)
    with pytest.raises(CheckpointError, match=r"expected \[2, 3\]"):
        codecs.fp8_block(weight, torch.ones(1, 3))
    with pytest.raises(CheckpointError, match="NaN"):
        codecs.fp8_block(weight, torch.full((2, 3), 255, dtype=torch.uint8))
    with pytest.raises(CheckpointError, match="float8_e4m3fn"):
        codecs.fp8_block(weight.float(), torch.ones(2, 3))


@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_encoder_round_trip(ue8m0):
    w = gaussian(300, 200, 6)
    w[:128, :128] = 0  # an all-zero tile
    weight, scale_inv = encoders.encode_fp8_block(w, ue8m0=ue8m0)
    assert weight.dtype == torch.float8_e4m3fn and weight.shape == w.shape
    assert scale_inv.dtype == (torch.float8_e8m0fnu if ue8m0 else torch.float32) and scale_inv.shape == (3, 2)
    inv = scale_inv.float()
    amax = F.pad(w.abs(), (0, 56, 0, 84)).reshape(3, 128, 2, 128).amax((1, 3))
    top = amax[1:].flatten() / inv[1:].flatten()  # the largest |stored| value of each non-zero tile
    if ue8m0:
        assert torch.equal(torch.frexp(inv)[0], torch.full_like(inv, 0.5))  # powers of two
        assert (top <= 448).all() and (top > 224).all()
    else:
        assert torch.allclose(top, torch.full_like(top, 448.0))
    decoded = codecs.fp8_block(weight, scale_inv)
    per_element = inv.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    # e4m3 keeps 3 mantissa bits (half an ulp: 2^-4 relative); below 2^-6 its subnormal step is 2^-9
    bound = torch.maximum(w.abs() * 2**-4, per_element * 2**-10)
    assert ((decoded - w).abs() <= bound * (1 + 1e-6)).all()
    assert (decoded[:128, :128] == 0).all()


# ---- compressed-tensors pack-quantized int4 -----------------------------------------------------------------

def ct_scheme(symmetric: bool, group_size: int | None) -> "QuantizationScheme":
    strategy = "group" if group_size else "channel"
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=symmetric, strategy=strategy, group_size=group_size))


@needs_compressed_tensors
@pytest.mark.parametrize("symmetric,group_size,shape", [(True, 32, (48, 256)), (False, 32, (45, 128)),
                                                        (True, None, (40, 100)), (False, 64, (64, 192))])
def test_compressed_int4_matches_compressed_tensors(symmetric, group_size, shape):
    """Random packed words and bf16 scales decode bit for bit as compressed-tensors' own decompressor."""
    O, K = shape
    G = K // (group_size or K)
    packed = torch.from_numpy(random_words((O, -(-K // 8)), 7))
    scale = torch.from_numpy(rng(8).uniform(1e-3, 2e-2, (O, G)).astype(np.float32)).to(torch.bfloat16)
    state = {"weight_packed": packed, "weight_scale": scale.float(), "weight_shape": torch.tensor([O, K])}
    zp = None
    if not symmetric:
        zp = torch.from_numpy(random_words((-(-O // 8), G), 9))
        state["weight_zero_point"] = zp
    ref = PackedQuantizationCompressor.decompress(state, ct_scheme(symmetric, group_size))["weight"]
    g = codecs.compressed_int4(packed, scale, torch.tensor([O, K]), group_size, zp)
    assert g.q.dtype == np.int8 and g.q.min() >= -8 and g.q.max() <= 7 and (g.offset is None) == symmetric
    assert same_bits(g.dequantize(), ref)


@needs_compressed_tensors
@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_int4_encoder_writes_what_compressed_tensors_writes(symmetric):
    """The encoder's bytes equal compressed-tensors' compress() given the same scales (and zero points)."""
    w = gaussian(40, 128, 10)
    out = encoders.encode_compressed_int4(w, 32, symmetric=symmetric)
    assert out["weight_packed"].dtype == torch.int32 and out["weight_packed"].shape == (40, 16)
    assert out["weight_scale"].dtype == torch.bfloat16 and out["weight_scale"].shape == (40, 4)
    assert out["weight_shape"].tolist() == [40, 128]
    state = {"weight": w, "weight_scale": out["weight_scale"].float()}
    if not symmetric:
        g = codecs.compressed_int4(out["weight_packed"], out["weight_scale"], out["weight_shape"], 32,
                                   out["weight_zero_point"])
        zp = -g.offset / g.scale
        state["weight_zero_point"] = torch.from_numpy(np.rint(zp).astype(np.int8))
    ref = PackedQuantizationCompressor.compress(state, ct_scheme(symmetric, 32))
    assert torch.equal(out["weight_packed"], ref["weight_packed"])
    if not symmetric:
        assert torch.equal(out["weight_zero_point"], ref["weight_zero_point"])
    g = codecs.compressed_int4(out["weight_packed"], out["weight_scale"], out["weight_shape"], 32,
                               out.get("weight_zero_point"))
    assert_nearest(g, w, np.arange(-8, 8))


def test_compressed_int4_rejects_mismatched_scales():
    with pytest.raises(CheckpointError, match="weight_scale"):
        codecs.compressed_int4(torch.zeros(8, 16, dtype=torch.int32), torch.ones(8, 3), torch.tensor([8, 128]))


# ---- MXFP4 --------------------------------------------------------------------------------------------------

def test_mxfp4_matches_transformers():
    blocks = torch.from_numpy(rng(11).integers(0, 256, (48, 6, 16), dtype=np.uint8))
    scales = torch.from_numpy(rng(12).integers(100, 150, (48, 6), dtype=np.uint8))
    scales[0, 0] = 0  # 2^-127 * value: float32 subnormals
    # transformers takes expert stacks and returns [E, in, out] (gpt-oss multiplies x @ W)
    ref = convert_moe_packed_tensors(blocks[None], scales[None], dtype=torch.float32)[0].T
    g = codecs.mxfp4(blocks, scales)
    assert g.q.dtype == np.int8 and set(np.unique(g.q)) <= {0, 1, 2, 3, 4, 6, 8, 12, -1, -2, -3, -4, -6, -8, -12}
    assert same_bits(g.dequantize(), ref + 0.0)  # + 0.0: e2m1's -0 (nibble 8) is the integer grid's 0


def test_mxfp4_rejects_nan_scale():
    with pytest.raises(CheckpointError, match="NaN"):
        codecs.mxfp4(torch.zeros(4, 1, 16, dtype=torch.uint8), torch.full((4, 1), 255, dtype=torch.uint8))


def test_mxfp4_encoder_round_trip():
    w = gaussian(40, 128, 13)
    w[3, 32:64] = 0
    w[5, :32] = torch.tensor([1.25, 0.75, 2.5, 3.5, 5.0, -0.25, 6.0] + [0.0] * 25) * 2**-6  # midpoints, exact
    blocks, scales = encoders.encode_mxfp4(w)
    assert blocks.dtype == scales.dtype == torch.uint8 and blocks.shape == (40, 4, 16) and scales.shape == (40, 4)
    g = codecs.mxfp4(blocks, scales)
    assert_nearest(g, w, np.array([0, 1, 2, 3, 4, 6, 8, 12, -1, -2, -3, -4, -6, -8, -12]))
    assert np.array_equal(g.q[5, :7] / 2, [1.0, 1.0, 2.0, 4.0, 4.0, 0.0, 6.0])  # ties to the even mantissa
    amax = w.abs().reshape(40, 4, 32).amax(-1).numpy()
    unit = 2 * g.scale.astype(np.float64)  # 2^(e - 127): the smallest power of two with amax <= 6 * unit
    assert ((amax <= 6 * unit) & ((amax > 3 * unit) | (amax == 0))).all()
    assert scales[3, 1] == 0 and (g.dequantize()[3, 32:64] == 0).all()


# ---- GPTQ ---------------------------------------------------------------------------------------------------

def gptq_reference(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray, bits: int,
                   v1: bool) -> np.ndarray:
    """W [O, K] from AutoGPTQ's layout, one input column and one output column at a time."""
    per_word, mask = 32 // bits, (1 << bits) - 1
    words, zwords = qweight.view(np.uint32).astype(np.int64), qzeros.view(np.uint32).astype(np.int64)
    K, O = qweight.shape[0] * per_word, scales.shape[1]
    zeros = np.empty((scales.shape[0], O), np.int64)
    for o in range(O):
        zeros[:, o] = (zwords[:, o // per_word] >> (bits * (o % per_word))) & mask
    zeros += 1 if v1 else 0
    w = np.empty((O, K))
    for k in range(K):
        q = (words[k // per_word] >> (bits * (k % per_word))) & mask  # [O]
        w[:, k] = (q - zeros[g_idx[k]]) * scales[g_idx[k]].astype(np.float64)
    return w


@pytest.mark.parametrize("bits,fmt,act_order", [(4, "gptq", False), (4, "gptq_v2", False), (4, "gptq", True),
                                                (8, "gptq", False), (8, "gptq_v2", True)])
def test_gptq_matches_reference(bits, fmt, act_order):
    O, K, group = 64, 256, 64
    per_word = 32 // bits
    qweight, qzeros = random_words((K // per_word, O), 14), random_words((K // group, O // per_word), 15)
    scales = rng(16).uniform(1e-3, 2e-2, (K // group, O)).astype(np.float16)
    g_idx = np.arange(K, dtype=np.int32) // group
    if act_order:
        g_idx = rng(17).permutation(g_idx)
    decoded = codecs.gptq(torch.from_numpy(qweight), torch.from_numpy(qzeros), torch.from_numpy(scales),
                          torch.from_numpy(g_idx), group_size=group, bits=bits, checkpoint_format=fmt)
    assert isinstance(decoded, torch.Tensor) == act_order
    if not act_order:
        assert decoded.q.dtype == np.uint8 and decoded.group == group
    ref = gptq_reference(qweight, qzeros, scales, g_idx, bits, fmt == "gptq")
    assert np.array_equal(dense(decoded).astype(np.float64), ref)  # (q - zero) * fp16 scale: exact in float32


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_encoder_round_trip(sym, fmt):
    w = gaussian(64, 256, 18)
    w[:, :64] = w[:, :64].abs()  # a group with no negative value: zero 0, kept >= 1 in v1
    out = encoders.encode_gptq(w, 64, sym=sym, checkpoint_format=fmt)
    assert [tuple(out[n].shape) for n in ("qweight", "qzeros", "scales", "g_idx")] == [(32, 64), (4, 8), (4, 64),
                                                                                       (256,)]
    assert out["scales"].dtype == torch.float16 and out["qweight"].dtype == out["qzeros"].dtype == torch.int32
    g = codecs.gptq(out["qweight"], out["qzeros"], out["scales"], out["g_idx"], group_size=64,
                    checkpoint_format=fmt)
    ref = gptq_reference(out["qweight"].numpy(), out["qzeros"].numpy(), out["scales"].numpy(),
                         out["g_idx"].numpy(), 4, fmt == "gptq")
    assert np.array_equal(g.dequantize().astype(np.float64), ref)
    if sym:
        assert (g.offset == -8 * g.scale).all()
    assert_nearest(g, w, np.arange(16))


def test_gptq_act_order_round_trip():
    w = gaussian(64, 256, 19)
    out = encoders.encode_gptq(w, 64, act_order=True, sym=False)
    g_idx = out["g_idx"].numpy()
    assert not np.array_equal(g_idx, np.arange(256) // 64) and (np.bincount(g_idx) == 64).all()
    decoded = codecs.gptq(out["qweight"], out["qzeros"], out["scales"], out["g_idx"], group_size=64)
    assert isinstance(decoded, torch.Tensor) and decoded.dtype == torch.float32 and decoded.shape == (64, 256)
    scale = out["scales"].float().numpy()[g_idx].T  # [O, K]: each column's own group
    # each value within half a step of its own (permuted) group's grid, whose range covers the group's values
    # (up to the fp16 rounding of the scale: 15 steps of 2^-12 relative)
    assert (np.abs(decoded.numpy() - w.numpy()) <= 0.51 * scale).all()


def test_gptq_rejects_mismatched_tensors():
    with pytest.raises(CheckpointError, match="qzeros"):
        codecs.gptq(torch.zeros(32, 64, dtype=torch.int32), torch.zeros(3, 8, dtype=torch.int32),
                    torch.ones(4, 64, dtype=torch.float16), group_size=64)


# ---- AWQ ----------------------------------------------------------------------------------------------------

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's order_map: nibble i of a word holds column order_map[i]


def awq_reference(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, group: int) -> np.ndarray:
    def unpack(words: np.ndarray) -> np.ndarray:
        u = words.view(np.uint32).astype(np.int64)
        out = np.empty((u.shape[0], u.shape[1] * 8), np.int64)
        for c in range(u.shape[1]):
            for i in range(8):
                out[:, 8 * c + AWQ_PACK_ORDER[i]] = (u[:, c] >> (4 * i)) & 15
        return out
    q, zeros = unpack(qweight), unpack(qzeros)  # [K, O], [G, O]
    k = np.arange(q.shape[0]) // group
    return ((q - zeros[k]) * scales[k].astype(np.float64)).T


def test_awq_matches_reference():
    O, K, group = 64, 256, 128
    qweight, qzeros = random_words((K, O // 8), 20), random_words((K // group, O // 8), 21)
    scales = rng(22).uniform(1e-3, 2e-2, (K // group, O)).astype(np.float16)
    g = codecs.awq(torch.from_numpy(qweight), torch.from_numpy(qzeros), torch.from_numpy(scales), group)
    assert g.q.dtype == np.uint8 and g.q.max() <= 15
    assert np.array_equal(g.dequantize().astype(np.float64), awq_reference(qweight, qzeros, scales, group))


def test_awq_encoder_round_trip():
    w = gaussian(64, 256, 23)
    out = encoders.encode_awq(w, 64)
    assert [tuple(out[n].shape) for n in ("qweight", "qzeros", "scales")] == [(256, 8), (4, 8), (4, 64)]
    g = codecs.awq(out["qweight"], out["qzeros"], out["scales"], 64)
    assert np.array_equal(g.dequantize().astype(np.float64),
                          awq_reference(out["qweight"].numpy(), out["qzeros"].numpy(), out["scales"].numpy(), 64))
    assert_nearest(g, w, np.arange(16))


# ---- pack_groups: the exact mapping onto offload's formats --------------------------------------------------

def decoded_schemes() -> dict[str, IntGroups]:
    w = gaussian(72, 320, 24)
    gq = encoders.encode_gptq(w, 64)
    gq_asym = encoders.encode_gptq(w, 64, sym=False)
    ct = encoders.encode_compressed_int4(w, 32)
    awq = encoders.encode_awq(w, 64)
    return {
        "compressed_int4": codecs.compressed_int4(ct["weight_packed"], ct["weight_scale"], ct["weight_shape"], 32),
        "mxfp4": codecs.mxfp4(*encoders.encode_mxfp4(w)),
        "gptq_sym": codecs.gptq(gq["qweight"], gq["qzeros"], gq["scales"], gq["g_idx"], group_size=64),
        "gptq_asym": codecs.gptq(gq_asym["qweight"], gq_asym["qzeros"], gq_asym["scales"], gq_asym["g_idx"],
                                 group_size=64),
        "awq": codecs.awq(awq["qweight"], awq["qzeros"], awq["scales"], 64),
    }


# scheme -> the formats it packs into exactly (without rounding scales/offsets); int4s takes symmetric grids only
EXACT = {"compressed_int4": {"int4", "int4s", "int8"}, "mxfp4": {"int8"}, "gptq_sym": {"int4", "int4s"},
         "gptq_asym": set(), "awq": set()}


@pytest.mark.parametrize("scheme", sorted(EXACT))
def test_pack_groups_exact_where_it_claims(scheme):
    g = decoded_schemes()[scheme]
    for fmt in ("int8", "int4", "int4s"):
        pm = formats.pack_groups(g, fmt)
        assert (pm is not None) == (fmt in EXACT[scheme]), fmt
        if pm is not None:
            assert pm.shape == (1, *g.shape)
            assert same_bits(formats.unpack(pm, 0), g.dequantize())


@pytest.mark.parametrize("scheme", ["gptq_asym", "awq"])
def test_pack_groups_rounds_offsets_when_asked(scheme):
    """-zero * scale rarely fits fp16: rounded, each value moves by at most half an fp16 ulp of its offset."""
    g = decoded_schemes()[scheme]
    pm = formats.pack_groups(g, "int4", round_scales=True)
    assert pm is not None
    offset = g.expand(g.offset)
    half_ulp = np.abs(offset) * 2.0**-11
    err = np.abs(formats.unpack(pm, 0) - g.dequantize())
    assert (err <= half_ulp + 1e-7 * np.abs(offset)).all() and err.max() > 0


def test_pack_groups_ragged_and_refusals():
    r = rng(25)
    O, K = 40, 70  # neither a multiple of 32: the last group has 6 columns, rows pad to 64
    q = r.integers(-127, 128, (O, K)).astype(np.int8)
    scale = r.uniform(1e-3, 1e-2, (O, 3)).astype(np.float16).astype(np.float32)
    g = IntGroups(q, scale, None, 32)
    pm = formats.pack_groups(g, "int8")
    assert pm is not None and pm.padded_shape == (1, 64, 96)
    assert same_bits(formats.unpack(pm, 0), g.dequantize())
    # padded rows (40..63: panel 2 from row 8, panel 3) and columns (70..95) hold q = 0, padded rows scale 0
    assert (pm.q[0, 2, :, 8:] == 0).all() and (pm.q[0, 3] == 0).all()
    assert (pm.q[0, :, 17, :, 2:] == 0).all() and (pm.q[0, :, 18:] == 0).all()
    assert (pm.d[0, 2, :, 8:] == 0).all() and (pm.d[0, 3] == 0).all()
    assert formats.pack_groups(g, "int4") is None  # |q| > 8: not a 4-bit grid
    small = IntGroups((q // 16).astype(np.int8), scale, None, 32)
    pm4 = formats.pack_groups(small, "int4")
    assert pm4 is not None and same_bits(formats.unpack(pm4, 0), small.dequantize())
    pm4s = formats.pack_groups(small, "int4s")  # a signed grid without offsets: Q4_0's, held as q + 8
    assert pm4s is not None and pm4s.m is None and same_bits(formats.unpack(pm4s, 0), small.dequantize())
    assert (pm4s.q[0, 3] == 0x88).all()  # padded rows hold q = 8: the value 0
    assert formats.pack_groups(IntGroups(small.q, scale, scale, 32), "int4s") is None  # an offset: int4 only
    assert formats.pack_groups(IntGroups(q, np.repeat(scale, 2, 1)[:, :5], None, 16), "int8") is None  # group 16
    not_fp16 = scale * np.float32(1 + 2**-20)
    assert formats.pack_groups(IntGroups(q, not_fp16, None, 32), "int8") is None
    rounded = formats.pack_groups(IntGroups(q, not_fp16, None, 32), "int8", round_scales=True)
    assert rounded is not None and same_bits(formats.unpack(rounded, 0), g.dequantize())
    huge = IntGroups(q, scale * np.float32(1e8), None, 32)
    assert formats.pack_groups(huge, "int8", round_scales=True) is None  # overflows fp16
    assert formats.pack_groups(g, "bf16") is None


def test_pack_groups_zero_block_takes_scale_zero():
    """An all-zero MXFP4 block's 2^-128 scale is not an fp16; its values are 0 whatever the scale."""
    w = gaussian(32, 64, 26)
    w[7, :32] = 0
    g = codecs.mxfp4(*encoders.encode_mxfp4(w))
    assert g.scale[7, 0] == np.float32(2.0**-128)
    pm = formats.pack_groups(g, "int8")
    assert pm is not None and same_bits(formats.unpack(pm, 0), g.dequantize())


def test_packed_groups_run_in_the_kernels():
    """dispatch.linear and dispatch.moe take pack_groups' matrices as they take pack's."""
    schemes = decoded_schemes()
    x = torch.from_numpy(rng(27).standard_normal((5, 320)).astype(np.float32))
    for scheme, fmt in (("mxfp4", "int8"), ("compressed_int4", "int4"), ("gptq_sym", "int4")):
        g = schemes[scheme]
        pm = formats.pack_groups(g, fmt)
        y = dispatch.linear(x, pm)
        ref = x @ torch.from_numpy(g.dequantize()).T
        assert (y - ref).norm() / ref.norm() < 0.03, scheme

    H, I = 64, 96  # two experts from CT int4 tensors, stacked one at a time
    r = rng(28)
    mats = {name: formats.empty("int4", 2, *shape) for name, shape in (("gate", (I, H)), ("up", (I, H)),
                                                                       ("down", (H, I)))}
    dense_w = {name: [] for name in mats}
    for e in range(2):
        for name, pm in mats.items():
            t = encoders.encode_compressed_int4(torch.from_numpy(r.standard_normal(pm.shape[1:]).astype(np.float32)))
            g = codecs.compressed_int4(t["weight_packed"], t["weight_scale"], t["weight_shape"])
            assert formats.pack_groups_expert(pm, e, g)
            dense_w[name].append(torch.from_numpy(g.dequantize()))
    xs = torch.from_numpy(r.standard_normal((4, H)).astype(np.float32))
    ids = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 1]])
    weights = torch.full((4, 2), 0.5)
    y = dispatch.moe(xs, ids, weights, mats["gate"], mats["up"], mats["down"])
    ref = torch.zeros_like(xs)
    for t in range(4):
        for k in range(2):
            e = int(ids[t, k])
            h = F.silu(dense_w["gate"][e] @ xs[t]) * (dense_w["up"][e] @ xs[t])
            ref[t] += weights[t, k] * (dense_w["down"][e] @ h)
    assert (y - ref).norm() / ref.norm() < 0.05

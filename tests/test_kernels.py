"""The Numba kernels of csrc_py against their numpy / torch oracles (csrc_py/oracles.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from numba import njit

from csrc_py import dispatch, formats, oracles, simd, threads
from csrc_py import quant_kernels as qk
from csrc_py.expert_ffn import NO_BIAS, SILU_ACT, moe_bf16, moe_q4, moe_q8, route
from csrc_py.grouped_matmul import matmul_bf16, matmul_q4, matmul_q8
from csrc_py.torch_path import moe_torch
from offload.errors import FormatError

FORMATS = ("bf16", "int8", "int4", "int4s")
# Relative RMS error of quantize -> dequantize on Gaussian weights, measured (seed 0, 96 x 200): bf16 0.00167,
# int8 0.00532, int4 0.0775 (scale+offset; docs/formats.md has why int4 is not symmetric), int4s 0.0852 (one
# scale, no offset: Q4_0).
WEIGHT_RMSE = {"bf16": 0.0020, "int8": 0.0064, "int4": 0.090, "int4s": 0.10}
# Relative L2 error of a whole layer vs float64 with exact weights, measured over LAYER_CASES (max):
# bf16 0.0038, int8 0.018 (weights and int8 activations), int4 0.17, int4s 0.18.
LAYER_ERROR = {"bf16": 0.006, "int8": 0.025, "int4": 0.22, "int4s": 0.23}
# Kernel vs the oracle that quantizes at the same points: float rounding, plus the rare activation that lands
# on a rounding boundary in one and not the other (one int8 step of one element).
PACKED_ERROR = {"bf16": 1e-5, "int8": 3e-3, "int4": 3e-3, "int4s": 3e-3}


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@njit(cache=False)
def _fp16_roundtrip(values: np.ndarray, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    to_bits = np.empty(values.size, np.uint16)
    to_f32 = np.empty(bits.size, np.float32)
    for i in range(values.size):
        to_bits[i] = qk.f32_to_fp16(values[i])
    for i in range(bits.size):
        to_f32[i] = qk.fp16_to_f32(bits[i])
    return to_bits, to_f32


def test_fp16_conversions_match_numpy():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(4000) * 10.0 ** rng.integers(-9, 5, 4000),
                             [0.0, -0.0, 6.1e-5, 5.96e-8, 2.98e-8, 65504.0, 65520.0, 1e6, -1e6]]).astype(np.float32)
    finite = np.arange(0, 1 << 16, dtype=np.uint32).astype(np.uint16)
    finite = finite[np.isfinite(finite.view(np.float16))]
    to_bits, to_f32 = _fp16_roundtrip(values, finite)
    with np.errstate(over="ignore"):  # 1e6 -> inf on purpose
        expected = values.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(to_bits, expected)
    np.testing.assert_array_equal(to_f32, finite.view(np.float16).astype(np.float32))


@pytest.mark.parametrize("shape", [(64, 96), (40, 50), (17, 33)])
def test_quantizers_match_oracle(shape):
    w = (np.random.default_rng(1).standard_normal((2, *shape)) * 0.05).astype(np.float32)
    w[1, 0, :10] = 1e-7  # a group of near-zero weights: subnormal fp16 scales
    q8, q4 = formats.pack(w, "int8"), formats.pack(w, "int4")
    ref8, ref4 = oracles.quantize_q8(w[1]), oracles.quantize_q4(w[1])
    np.testing.assert_array_equal(q8.q[1], ref8[0])
    np.testing.assert_array_equal(q8.d[1].view(np.uint16), ref8[1].view(np.uint16))
    np.testing.assert_array_equal(q4.q[1], ref4[0])
    np.testing.assert_array_equal(q4.d[1].view(np.uint16), ref4[1].view(np.uint16))
    np.testing.assert_array_equal(q4.m[1].view(np.uint16), ref4[2].view(np.uint16))
    q4s, ref4s = formats.pack(w, "int4s"), oracles.quantize_q4s(w[1])
    assert q4s.m is None and q4s.nbytes == q4s.q.nbytes + q4s.d.nbytes
    np.testing.assert_array_equal(q4s.q[1], ref4s[0])
    np.testing.assert_array_equal(q4s.d[1].view(np.uint16), ref4s[1].view(np.uint16))
    for pm in (q8, q4, q4s, formats.pack(w, "bf16")):
        np.testing.assert_array_equal(formats.unpack(pm), oracles.dequantize(pm))
        assert formats.unpack(pm).shape == w.shape


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantization_error_bound(fmt):
    w = np.random.default_rng(0).standard_normal((1, 96, 200)).astype(np.float32)
    err = rel_l2(formats.unpack(formats.pack(w, fmt)), w)
    assert err < WEIGHT_RMSE[fmt]
    assert err > WEIGHT_RMSE[fmt] / 3  # a format that silently stopped quantizing fails too


def test_int4s_is_llama_cpp_q4_0():
    """int4s holds the numbers llama.cpp's Q4_0 holds for the same weights (gguf-py's reference quantizer):
    the same rounding, the same fp16 scale, W = d * (q - 8); 0.5625 bytes per weight."""
    gguf = pytest.importorskip("gguf")
    w = (np.random.default_rng(4).standard_normal((32, 128)) * 0.02).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero group: d = 0
    w[1, 5] = -0.5  # the peak negative: d > 0
    q4_0 = gguf.GGMLQuantizationType.Q4_0
    ref = gguf.quants.dequantize(gguf.quants.quantize(w, q4_0), q4_0)
    pm = formats.pack(w[None], "int4s")
    np.testing.assert_array_equal(formats.unpack(pm)[0], ref)
    assert pm.nbytes / w.size == 0.5625


def test_int4_padding_does_not_widen_the_range():
    w = np.tile(np.linspace(5.0, 5.03, 40, dtype=np.float32), (1, 16, 1))  # columns 40..63 are padding
    np.testing.assert_allclose(formats.unpack(formats.pack(w, "int4")), w, rtol=3e-4)


@pytest.mark.parametrize("rows", [5, 11])  # on the calling thread, and split over the threads (over 8 rows)
def test_activation_quantizer_matches_oracle(rows):
    x = (np.random.default_rng(2).standard_normal((rows, 70)) * 3).astype(np.float32)
    x[1] = 0.0
    # a group's largest magnitude in each of the quantizer's four max chains (column % 4), negative in two
    x[2, 4], x[2, 32 + 5], x[3, 6], x[3, 32 + 7] = 9.0, -11.0, -9.0, 12.0
    ngroups = formats.padded(70) // simd.GROUP
    got = qk.quantized_rows(x, ngroups)
    for a, b in zip(got, oracles.quantize_activations(x)):
        np.testing.assert_array_equal(a, b)


def test_route_sorts_pairs_by_expert():
    ids = np.array([[3, 1], [1, 3], [0, 3]], np.int64)
    seg_expert, seg_start, row_of_pair, token_of_row = route(ids, 5)
    np.testing.assert_array_equal(seg_expert, [0, 1, 3])
    np.testing.assert_array_equal(seg_start, [0, 1, 3, 6])
    experts_by_row = np.repeat(seg_expert, np.diff(seg_start))
    np.testing.assert_array_equal(experts_by_row[row_of_pair], ids.ravel())
    np.testing.assert_array_equal(token_of_row[row_of_pair], [0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError):
        route(np.array([[5]], np.int64), 5)
    seg_expert, seg_start, row_of_pair, token_of_row = route(np.array([[2, -1], [-1, 2]], np.int64), 5)
    np.testing.assert_array_equal(row_of_pair, [0, -1, -1, 1])
    np.testing.assert_array_equal(token_of_row, [0, 1])


def _segments(rng: np.random.Generator, E: int, sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return np.sort(rng.choice(E, len(sizes), replace=False)).astype(np.int64), np.cumsum([0, *sizes]).astype(np.int64)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(48, 64), (40, 50)])
def test_grouped_matmul_matches_oracle(fmt, shape):
    """Segments of 13, 6, 1 and 8 rows run every microkernel width (8, 4, 2, 1)."""
    rng = np.random.default_rng(3)
    O, K = shape
    pm = formats.pack(rng.standard_normal((6, O, K)).astype(np.float32), fmt)
    seg_expert, seg_start = _segments(rng, 6, [13, 6, 1, 8])
    a = rng.standard_normal((int(seg_start[-1]), K)).astype(np.float32)
    out = np.zeros((a.shape[0], pm.padded_shape[1]), np.float32)
    if fmt == "bf16":
        matmul_bf16(pm.q, seg_expert, seg_start, a, out)
    else:
        acts = qk.quantized_rows(a, formats.padded(K) // simd.GROUP)
        (matmul_q8 if fmt == "int8" else matmul_q4)(*pm.bits(), seg_expert, seg_start, *acts, out)
    for s, e in enumerate(seg_expert):
        rows = slice(seg_start[s], seg_start[s + 1])
        ref = oracles.linear(a[rows], pm, expert=int(e))
        np.testing.assert_allclose(out[rows, :O], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _layer(E: int, H: int, I: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=gen) / shape[2] ** 0.5 for shape in ((E, I, H), (E, I, H), (E, H, I)))


# (E, H, I, T, K): T = 1, 3, 64; K = 1..8; H/I multiples of 32 or not; T*K > E forces repeated experts.
LAYER_CASES = [(8, 64, 96, 1, 1), (8, 64, 96, 3, 2), (6, 40, 50, 3, 4), (16, 96, 72, 64, 8), (8, 33, 47, 64, 3),
               (9, 64, 32, 1, 8), (4, 32, 64, 3, 4)]


def _fused(fmt: str, x, ids, w, g, u, d) -> np.ndarray:
    y = np.empty_like(x)
    {"bf16": moe_bf16, "int8": moe_q8, "int4": moe_q4, "int4s": moe_q4}[fmt](x, ids, w, *g.bits(), *u.bits(),
                                                                             *d.bits(), *(NO_BIAS,) * 3, SILU_ACT, y)
    return y


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", LAYER_CASES)
def test_fused_moe_matches_oracles(fmt, case):
    E, H, I, T, K = case
    gate, up, down = _layer(E, H, I, seed=sum(case))
    gen = torch.Generator().manual_seed(T * K)
    x = torch.randn(T, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=gen)
    g, u, d = (formats.pack(m, fmt) for m in (gate, up, down))
    y = _fused(fmt, x.numpy(), ids.numpy(), w.numpy(), g, u, d)
    assert rel_l2(y, oracles.moe_packed(x.numpy(), ids.numpy(), w.numpy(), g, u, d)) < PACKED_ERROR[fmt]
    assert rel_l2(y, oracles.moe(x, ids, w, gate, up, down).numpy()) < LAYER_ERROR[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_path_matches_oracle(fmt):
    gate, up, down = _layer(4, 40, 64, seed=7)
    gen = torch.Generator().manual_seed(1)
    x, ids, w = torch.randn(9, 40, generator=gen), torch.randint(0, 4, (9, 3), generator=gen), torch.rand(9, 3)
    ids[::3, 0] = -1  # computed elsewhere
    y = moe_torch(x, ids, w, *(formats.pack(m, fmt) for m in (gate, up, down)))
    # torch's path runs in bf16 (activations and weights): ~0.5% per matmul on top of the format's own error
    assert rel_l2(y.numpy(), oracles.moe(x, ids, w, gate, up, down).numpy()) < LAYER_ERROR[fmt] + 0.02


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [1, 3, 64])
def test_linear_matches_oracle(fmt, T):
    rng = np.random.default_rng(T)
    pm = formats.pack(rng.standard_normal((1, 50, 70)).astype(np.float32), fmt)
    x = torch.from_numpy(rng.standard_normal((T, 70)).astype(np.float32))
    y = dispatch.linear(x.to(torch.bfloat16), pm)
    assert y.dtype == torch.bfloat16 and y.shape == (T, 50)
    ref = oracles.linear(x.to(torch.bfloat16).float().numpy(), pm)
    assert rel_l2(y.float().numpy(), ref) < 0.01  # bf16 output rounding, and bf16 inputs on torch's path


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4s"])
def test_portable_microkernel_without_vnni(fmt, monkeypatch):
    """The portable tier in this process: the production stage compiled afresh (uncached) while simd.TIER is
    'portable' must match the oracle and contain no vpdpbusd (tests/test_isa_tiers.py runs every tier as a CPU of
    that tier compiles it)."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((3, 48, 64)).astype(np.float32)
    w[1, 3, :32] = 3e-6  # subnormal fp16 scales take the integer conversion path
    pm = formats.pack(w, fmt)
    seg_expert, seg_start = np.array([1, 2], np.int64), np.array([0, 15, 22], np.int64)  # widths 8+4+2+1, 4+2+1
    a = rng.standard_normal((22, 64)).astype(np.float32)
    acts = qk.quantized_rows(a, 2)
    monkeypatch.setattr(simd, "TIER", "portable")
    portable = njit(cache=False)((matmul_q8 if fmt == "int8" else matmul_q4).py_func)
    out = np.zeros((22, pm.padded_shape[1]), np.float32)
    portable(*pm.bits(), seg_expert, seg_start, *acts, out)
    for s, e in enumerate(seg_expert):
        rows = slice(seg_start[s], seg_start[s + 1])
        ref = oracles.linear(a[rows], pm, expert=int(e))
        np.testing.assert_allclose(out[rows, :48], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert "vpdpbusd" not in next(iter(portable.inspect_llvm().values()))


def test_packed_matrix_rejects_bad_arrays():
    good = formats.pack(np.zeros((2, 40, 50), np.float32), "int8")
    with pytest.raises(FormatError, match="needs d"):
        formats.PackedMatrix("int8", (2, 40, 50), good.q, good.d[:, :1])
    with pytest.raises(FormatError, match="unknown weight format"):
        formats.pack(np.zeros((1, 32, 32), np.float32), "fp8")
    with pytest.raises(FormatError, match="experts, out, in"):
        formats.pack(np.zeros((32, 32), np.float32), "int8")


def test_threads_and_layer():
    assert threads.set_threads(1) == 1
    assert torch.get_num_threads() == 1
    assert threads.set_threads() == threads.default_threads()
    assert threads.threading_layer() in ("omp", "tbb", "workqueue")


def test_engine_thresholds_follow_torchs_bf16_engine(monkeypatch):
    native, software = dispatch.torch_min_rows(True), dispatch.torch_min_rows(False)
    prefill, decode = (512 * 8, 128), (8, 128)  # (token-expert pairs, experts) of a Qwen3 layer
    assert dispatch.use_torch("bf16", *prefill, native) and not dispatch.use_torch("bf16", *decode, native)
    assert not any(dispatch.use_torch(fmt, *prefill, software) for fmt in FORMATS)  # an AVX2 host: all fused
    assert not any(dispatch.use_torch(fmt, *prefill, native) for fmt in ("int8", "int4", "int4s"))
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # torch's software bf16, as on an AVX2 host
    assert not dispatch.torch_has_native_bf16()

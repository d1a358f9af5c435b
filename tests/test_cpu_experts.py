"""CpuExperts: the experts contract on the Numba kernels, blocking and in the background."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from csrc_py import crossover, dispatch, formats, oracles
from offload.errors import FormatError
from offload.experts.base import ExpertWeights
from offload.experts.cpu import CpuExperts, warmup
from offload.experts.link import HostLink

FORMATS = ("bf16", "int8", "int4")
# Relative L2 error of a layer vs float64 (measured maxima in tests/test_kernels.py, plus bf16 input/output
# rounding when x is bfloat16, ~0.4%).
LAYER_ERROR = {"bf16": 0.012, "int8": 0.03, "int4": 0.22}


def _weights(E: int = 8, H: int = 80, I: int = 48, seed: int = 0) -> ExpertWeights:
    gen = torch.Generator().manual_seed(seed)
    return ExpertWeights(*(torch.randn(s, generator=gen) / s[2] ** 0.5 for s in ((E, I, H), (E, I, H), (E, H, I))))


def _inputs(T: int, K: int, E: int = 8, H: int = 80, dtype: torch.dtype = torch.float32, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    return torch.randn(T, H, generator=gen).to(dtype), ids, torch.rand(T, K, generator=gen)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def weights() -> ExpertWeights:
    return _weights()


@pytest.fixture(scope="module", params=FORMATS)
def experts(request, weights) -> CpuExperts:
    return CpuExperts(weights, request.param)


@pytest.mark.parametrize("T,K", [(1, 1), (3, 4), (64, 8), (5, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_call_matches_oracle(experts, weights, T, K, dtype):
    x, ids, w = _inputs(T, K, dtype=dtype)
    y = experts(x, ids, w)
    assert y.dtype == dtype and y.shape == x.shape and y.device == x.device
    ref = oracles.moe(x.float(), ids, w, weights.gate, weights.up, weights.down)
    assert _rel(y, ref) < LAYER_ERROR[experts.fmt]


def test_submit_wait_equals_call(experts):
    x, ids, w = _inputs(7, 3)
    handles = [experts.submit(x, ids, w) for _ in range(3)]
    expected = experts(x, ids, w)
    for handle in handles:
        assert torch.equal(experts.wait(handle), expected)


def test_wait_reraises_errors(experts):
    x, ids, w = _inputs(2, 2)
    with pytest.raises(ValueError):
        experts.wait(experts.submit(x[:, :5], ids, w))


def test_from_packed_shares_and_matches(weights):
    packed = [formats.pack(m, "int4") for m in (weights.gate, weights.up, weights.down)]
    experts = CpuExperts.from_packed(*packed)
    assert experts.gate is packed[0]
    x, ids, w = _inputs(3, 2)
    assert torch.equal(experts(x, ids, w), CpuExperts(weights, "int4")(x, ids, w))


def test_nbytes_counts_the_packed_arrays(weights):
    E, I, H = weights.gate.shape  # 8, 48, 80 -> padded I 64, H 96
    bf16 = CpuExperts(weights, "bf16").nbytes
    assert bf16 == 3 * E * I * H * 2
    # int8: a byte per weight plus an fp16 scale per 32; int4: half a byte plus fp16 scale and offset per 32
    assert CpuExperts(weights, "int8").nbytes == 3 * E * 64 * 96 * (1 + 2 / 32)
    assert CpuExperts(weights, "int4").nbytes == 3 * E * 64 * 96 * (0.5 + 4 / 32)


def test_many_rows_take_the_torch_path_for_bf16(weights, monkeypatch):
    """Where torch's bf16 matmul is native (AVX512-BF16, AMX), many rows go to it, and its result must match. The
    thresholds of such a host are injected, so a CPU without native bf16 (which keeps bf16 fused) tests it too."""
    native = dispatch.torch_min_rows(native_bf16=True)
    x, ids, w = _inputs(40, 8)
    assert dispatch.use_torch("bf16", ids.numel(), weights.num_experts, native)
    torch_calls = []
    real_moe_torch = dispatch.moe_torch

    def counted_moe_torch(*args):
        torch_calls.append(1)
        return real_moe_torch(*args)

    monkeypatch.setattr(dispatch, "moe_torch", counted_moe_torch)
    dispatch.set_crossovers(crossover.Crossovers(measure=None, fixed=native.__getitem__, cache=None, mode="fixed"))
    try:
        y = CpuExperts(weights, "bf16")(x, ids, w)
    finally:
        dispatch.set_crossovers(None)
    assert torch_calls == [1]
    ref = oracles.moe(x, ids, w, weights.gate, weights.up, weights.down)
    assert _rel(y, ref) < LAYER_ERROR["bf16"] + 0.01  # torch's path multiplies in bf16


def test_bad_shapes_are_reported(weights):
    with pytest.raises(FormatError, match="gate/up"):
        CpuExperts(ExpertWeights(weights.gate, weights.up, weights.gate), "int8")
    with pytest.raises(FormatError, match="unknown weight format"):
        CpuExperts(weights, "q4_k")
    gate = formats.pack(weights.gate, "int8")
    with pytest.raises(FormatError, match="disagree"):
        CpuExperts.from_packed(gate, formats.pack(weights.up, "int4"), formats.pack(weights.down, "int8"))
    x, ids, w = _inputs(2, 2)
    with pytest.raises(ValueError):
        CpuExperts(weights, "int8")(x, ids[:1], w[:1])
    for rows, width in ((2, 80 + 5), (3, 80 + 4)):  # a block [T, H + 2K] that does not fit y [2, H]
        with pytest.raises(ValueError, match="block"):
            CpuExperts(weights, "int8").run_block(np.zeros((rows, width), np.float32), np.empty((2, 80), np.float32))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("host_link", [False, True])
def test_warmup_reports_seconds(fmt, host_link):
    seconds = warmup(fmt, host_link=host_link)
    assert isinstance(seconds, float) and seconds >= 0.0


def test_dense_linear_matches_float(weights):
    x = torch.randn(4, 80)
    y = dispatch.linear(x, formats.pack(weights.gate[:1], "int8"))
    ref = x @ weights.gate[0].T
    assert y.shape == (4, 48) and _rel(y, ref) < 0.02
    with pytest.raises(ValueError):
        dispatch.linear(x[:, :40], formats.pack(weights.gate[:1], "int8"))


def test_pairs_marked_minus_one_are_left_out(experts, weights):
    """The hybrid backend hands the CPU every pair and marks the ones it computes itself with -1."""
    x, ids, w = _inputs(6, 4)
    mine = ids.clone()
    mine[::2, 1:] = -1
    mine[1] = -1  # a token with nothing for the CPU
    y = experts(x, mine, w)
    ref = oracles.moe(x, mine, w, weights.gate, weights.up, weights.down)
    assert y[1].abs().max() == 0
    assert _rel(y, ref) < LAYER_ERROR[experts.fmt]
    assert experts(x, torch.full_like(ids, -1), w).abs().max() == 0


def test_expert_tensors_dequantize_one_expert(experts, weights):
    gate, up, down = experts.expert_tensors(3)
    assert gate.shape == up.shape == (48, 80) and down.shape == (80, 48)
    for got, ref in ((gate, weights.gate[3]), (up, weights.up[3]), (down, weights.down[3])):
        assert _rel(got, ref) < {"bf16": 0.005, "int8": 0.01, "int4": 0.1}[experts.fmt]
    assert experts.expert_nbytes * experts.num_experts == experts.nbytes


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [1, 9])
def test_biases_and_clamped_activation_match_the_reference_backend(fmt, T):
    """gpt-oss experts (biases on gate/up/down, the clamped SwiGLU) on the kernels equal the torch reference with
    the same weights as packed; the clamps bite (limit below the projections' spread) and the biases count."""
    from dataclasses import replace

    from offload.config import ExpertActivation
    from offload.experts.reference import ReferenceExperts

    weights = _gpt_oss_weights()
    experts = CpuExperts(weights, fmt)
    packed = replace(ReferenceExperts(weights).weights, gate=_dequantized(experts.gate), up=_dequantized(experts.up),
                     down=_dequantized(experts.down))
    x, ids, w = _inputs(T, 3)
    y = experts(x, ids, w)
    expected = ReferenceExperts(packed)(x, ids, w)
    assert _rel(y, expected) < {"bf16": 1e-5, "int8": 0.02, "int4": 0.1}[fmt]
    for other in (replace(packed, biases=None), replace(packed, activation=ExpertActivation())):
        assert _rel(ReferenceExperts(other)(x, ids, w), expected) > 0.05


def _gpt_oss_weights() -> ExpertWeights:
    """_weights with gpt-oss's biases on gate / up / down and its clamped SwiGLU (the clamps bite at 0.4)."""
    from dataclasses import replace

    from offload.config import ExpertActivation
    from offload.experts.base import ExpertBiases

    gen = torch.Generator().manual_seed(5)
    E, H, I = 8, 80, 48
    biases = ExpertBiases(*(torch.randn(E, n, generator=gen) * 0.5 for n in (I, I, H)))
    return replace(_weights(), biases=biases, activation=ExpertActivation("clamped_swiglu", 1.702, 0.4))


def _dequantized(pm) -> torch.Tensor:
    return torch.from_numpy(formats.unpack(pm))


def _spy_run_block(monkeypatch) -> list[bool]:
    """What each CpuExperts.run_block call returned (True: it computed the block)."""
    returned = []
    real = CpuExperts.run_block

    def spy(self, block, y):
        returned.append(real(self, block, y))
        return returned[-1]

    monkeypatch.setattr(CpuExperts, "run_block", spy)
    return returned


@pytest.mark.parametrize("fmt", FORMATS + ("int4s",))
@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize("kind", ["plain", "gpt_oss"])
def test_a_host_link_block_gives_the_call_s_numbers(fmt, T, kind, monkeypatch):
    """A hybrid layer's CPU side: HostLink hands CpuExperts its block of inputs as it lies and they compute it in
    one compiled call (run_block), to the same bits as the call on tensors, the device's pairs (-1) left out."""
    experts = CpuExperts(_weights() if kind == "plain" else _gpt_oss_weights(), fmt)
    x, ids, w = _inputs(T, 4)
    ids[::2, 1:3] = -1
    ran = _spy_run_block(monkeypatch)
    link = HostLink(hidden=80, device=torch.device("cpu"))
    for _ in range(2):  # the second call reuses the link's buffers and their numpy views
        y = torch.zeros(T, 80)
        link.add_result(y, link.submit(experts, x, ids, w))
        assert torch.equal(y, experts(x, ids, w))
    assert ran == [True, True]


def test_a_host_link_block_that_torch_computes_goes_through_the_call(weights, monkeypatch):
    """Many rows of plain bf16 experts next to a native-bf16 torch take torch's matmul: run_block declines and the
    link calls the experts on tensors, which pick torch as a direct call would."""
    native = dispatch.torch_min_rows(native_bf16=True)
    experts = CpuExperts(weights, "bf16")
    x, ids, w = _inputs(40, 8)
    ran = _spy_run_block(monkeypatch)
    dispatch.set_crossovers(crossover.Crossovers(measure=None, fixed=native.__getitem__, cache=None, mode="fixed"))
    try:
        link = HostLink(hidden=80, device=torch.device("cpu"))
        y = torch.zeros(40, 80)
        link.add_result(y, link.submit(experts, x, ids, w))
        expected = experts(x, ids, w)
    finally:
        dispatch.set_crossovers(None)
    assert ran == [False]
    assert torch.equal(y, expected)

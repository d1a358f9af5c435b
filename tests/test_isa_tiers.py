"""Every ISA tier of the quantized microkernels (csrc_py/simd.py) and of the attention's value tile
(csrc_py/attend_simd.py) against the oracles, each compiled the way a CPU of that tier compiles it: in a
subprocess, for a restricted Numba target or with OFFLOAD_CPU_ISA, with its own Numba cache. The integer sums are
exact on every tier, so where the target has FMA a tier's dense outputs equal the host tier's bit for bit: that
is the proof that the AVX2 tier's vpmaddubsw never saturates."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

from csrc_py import decode_step, formats, oracles, simd
from csrc_py.expert_ffn import NO_BIAS, SILU_ACT, moe_q4, moe_q8
from csrc_py.grouped_matmul import matmul_q4, matmul_q8
from csrc_py.linear import linear_q4, linear_q8
from offload.errors import OffloadError

ROOT = Path(__file__).resolve().parents[1]
HASWELL = "+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+lzcnt,+movbe,+popcnt,+sse4.2"


class Target(NamedTuple):
    env: dict[str, str]  # the child's environment: a restricted Numba target, or OFFLOAD_CPU_ISA
    tier: str  # the tier the child's kernels compile for
    fma: bool  # the target has FMA: then its dense outputs equal the host's bit for bit
    host_feature: str | None = None  # an LLVM feature name the host CPU must have to run the child's code


TARGETS = {
    # the host target lowered by OFFLOAD_CPU_ISA: on an AVX-512 host, EVEX vpdpbusd on 256-bit registers
    "avx-vnni": Target({simd.ISA_VARIABLE: "avx-vnni"}, "avx-vnni", True),
    # an Intel client CPU's target (Alder Lake and later: AVX-VNNI, no AVX-512): VEX vpdpbusd, which only a CPU
    # with AVX-VNNI runs (an AVX-512 VNNI CPU without it, e.g. Zen 4 or Ice Lake, stops at it)
    "avx-vnni-vex": Target({"NUMBA_CPU_NAME": "alderlake", "NUMBA_CPU_FEATURES": HASWELL + ",+avxvnni"}, "avx-vnni",
                           True, "avxvnni"),
    "avx2": Target({"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": HASWELL}, "avx2", True),
    "portable": Target({"NUMBA_CPU_NAME": "x86-64", "NUMBA_CPU_FEATURES": "+sse2"}, "portable", False),
}
HOST = "host"  # a child on this CPU's own tier, compiling afresh in a cache of its own
KERNELS = {"int8": (moe_q8, linear_q8), "int4": (moe_q4, linear_q4), "int4s": (moe_q4, linear_q4)}
LINEAR_ROWS = (1, 11)  # 11 = a block of 8, then 2 + 1
# attend's shape: 3 query heads per KV head and 2 tokens (6 rows: a four and a pair), 48 columns (3 or 6 chunks)
ATTEND = {"heads": 6, "kv_heads": 2, "d": 48, "positions": 40, "tokens": 2, "start": 30}
PACKED_ERROR = 3e-3  # as tests/test_kernels.py: float rounding and the rare activation on a rounding boundary

CHILD = """
import sys
import numpy as np
import csrc_py  # noqa: F401
from csrc_py import simd
from tests.test_isa_tiers import run_kernels, streams_asm
data = dict(np.load(sys.argv[1]))
out = run_kernels(data)
weights, cache = streams_asm()
instructions = [name for name in ("vpdpbusd", "{vex}", "vpmaddubsw", "vpsignb", "zmm") if name in weights + cache]
hints = [f"{stream}:{hint}" for stream, asm in (("weights", weights), ("cache", cache))
         for hint in ("prefetcht0", "prefetcht1") if hint in asm]
np.savez(sys.argv[2], tier=simd.TIER, instructions=",".join(instructions), hints=",".join(hints), **out)
"""


def _bits(data: dict, fmt: str, name: str) -> list[np.ndarray | None]:
    """A matrix's kernel arguments (PackedMatrix.bits) from the saved arrays: int4s passes None offsets."""
    arrays = [data[f"{fmt}.{name}.{a}"] for a in ("q", "d", "m") if f"{fmt}.{name}.{a}" in data]
    return arrays + [None] if fmt == "int4s" else arrays


def run_kernels(data: dict) -> dict[str, np.ndarray]:
    """The int8, int4 and int4s fused MoE layer and dense linear on the arrays of `inputs()`."""
    out = {}
    for fmt, (moe, linear) in KERNELS.items():
        y = np.empty_like(data["x"])
        moe(data["x"], data["ids"], data["w"], *_bits(data, fmt, "gate"), *_bits(data, fmt, "up"),
            *_bits(data, fmt, "down"), *(NO_BIAS,) * 3, SILU_ACT, y)
        out[f"{fmt}.moe"] = y
        for T in LINEAR_ROWS:
            lin = _bits(data, fmt, "lin")
            yl = np.empty((T, lin[1].shape[1] * simd.PANEL), np.float32)
            linear(data["a"][:T], *lin, yl)
            out[f"{fmt}.linear{T}"] = yl
    a = ATTEND
    for cache in ("float32", "bf16"):
        y = np.empty((a["tokens"], a["heads"] * a["d"]), np.float32)
        decode_step.attend(data["attn.q"], a["heads"], a["kv_heads"], a["d"], data[f"attn.k.{cache}"],
                           data[f"attn.v.{cache}"], a["start"], 0, 0, a["d"] ** -0.5, np.zeros(0, np.float32), y)
        out[f"attend.{cache}"] = y
    return out


def _packed(fmt: str) -> dict[str, formats.PackedMatrix]:
    gen = torch.Generator().manual_seed(0)
    E, H, I = 6, 64, 96
    mats = {"gate": torch.randn(E, I, H, generator=gen) / 8, "up": torch.randn(E, I, H, generator=gen) / 8,
            "down": torch.randn(E, H, I, generator=gen) / 10, "lin": torch.randn(1, 48, 96, generator=gen)}
    mats["lin"][0, 3, :32] = 3e-6  # subnormal fp16 scales
    mats["lin"][0, 20:36] = torch.where(torch.rand(16, 96, generator=gen) < 0.5, 1.0, -1.0)  # every |q| = 127
    # int4 nibble 15 in every column the even int16 lanes of the avx2 / portable int4 paths sum (columns 8t + 0, 1,
    # 4, 5), 0 in the others: against activations at 127 those lanes reach their bound, 16 * 15 * 127 per group
    # (int4s maps +1 to nibble 0 and -1 to 15 here: the odd lanes reach it)
    mats["lin"][0, 40:48] = torch.where(torch.tensor([c % 8 in (0, 1, 4, 5) for c in range(96)]), 1.0, -1.0)
    return {name: formats.pack(m, fmt) for name, m in mats.items()}


def inputs() -> tuple[dict[str, np.ndarray], dict[str, dict[str, formats.PackedMatrix]]]:
    rng = np.random.default_rng(1)
    data = {"x": rng.standard_normal((3, 64)).astype(np.float32),
            "ids": np.array([[0, 4], [4, 5], [2, 0]], np.int64),
            "w": rng.random((3, 2)).astype(np.float32),
            "a": rng.standard_normal((max(LINEAR_ROWS), 96)).astype(np.float32)}
    data["a"][0] = np.where(np.arange(96) % 3 == 0, -5.0, 5.0)  # activations at +-127 against the +-127 rows
    data["a"][1] = 5.0  # every activation at 127 against the int4 rows at their lanes' bound
    a = ATTEND
    data["attn.q"] = rng.standard_normal((a["tokens"], a["heads"] * a["d"])).astype(np.float32)
    for name in "kv":
        values = rng.standard_normal((a["kv_heads"], a["positions"], a["d"])).astype(np.float32)
        data[f"attn.{name}.float32"] = values
        data[f"attn.{name}.bf16"] = (values.view(np.uint32) >> 16).astype(np.uint16)  # bf16 bits, truncated
    packed = {fmt: _packed(fmt) for fmt in KERNELS}
    for fmt, mats in packed.items():
        for name, pm in mats.items():
            for array, value in zip("qdm", pm.bits()):
                if value is not None:
                    data[f"{fmt}.{name}.{array}"] = value
    return data, packed


def _runnable(target: Target) -> bool:
    if target.host_feature is not None and not simd.llvm.get_host_cpu_features().get(target.host_feature, False):
        return False
    return simd.TIERS.index(target.tier) >= simd.TIERS.index(simd.tier_for(simd.jit_features()))


@pytest.fixture(scope="module")
def host_run():
    data, packed = inputs()
    return data, packed, run_kernels(data)


@pytest.fixture(scope="module")
def tier_runs(host_run, tmp_path_factory):
    """One child per runnable tier and one on the host's, all started at once (each compiles the kernels afresh:
    ~40 s of CPU)."""
    data = host_run[0]
    folder = tmp_path_factory.mktemp("tiers")
    np.savez(folder / "in.npz", **data)
    runs = {}
    for name, target in {**TARGETS, HOST: Target({}, simd.TIER, True)}.items():
        if not _runnable(target):
            continue
        env = {key: value for key, value in os.environ.items() if key != simd.ISA_VARIABLE}
        env.update(target.env, NUMBA_CACHE_DIR=str(folder / name), PYTHONPATH=str(ROOT))
        out = folder / f"{name}.npz"
        runs[name] = (subprocess.Popen([sys.executable, "-c", CHILD, str(folder / "in.npz"), str(out)], env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), out)
    yield runs
    for proc, _ in runs.values():
        proc.kill()
        proc.wait()


def test_host_tier_matches_the_oracles(host_run):
    data, packed, out = host_run
    _check_against_oracles(data, packed, out)


def streams_asm() -> tuple[str, str]:
    """The machine code of the kernels run_kernels compiled that stream memory: the packed matmuls (weights), and
    the attention over the cache. Only in a process that compiled them: code loaded from Numba's on-disk cache has
    none to show (the children have caches of their own)."""
    def asm(kernel) -> str:
        return "".join(kernel.inspect_asm().values())

    return asm(matmul_q8) + asm(matmul_q4), asm(decode_step.attend)


def expected_hints() -> list[str]:
    """The prefetch instructions of the two kinds of stream on this host: the weights' by vendor
    (simd.PREFETCH_LOCALITY), the attention's cache streams prefetcht1."""
    return ["weights:" + ("prefetcht0" if simd.PREFETCH_LOCALITY == 3 else "prefetcht1"), "cache:prefetcht1"]


def test_the_prefetch_hint_follows_the_vendor():
    """prefetcht0 on AMD's cores (1.23-1.38x a layer's experts on a Zen 4 VM where DRAM allowed 53-57 GB/s),
    prefetcht1 elsewhere (1.14-1.16x DeepSeek-V2-Lite decode on the Intel VM); by LLVM's name of the host CPU."""
    assert [simd.prefetch_locality(cpu) for cpu in ("znver4", "znver3", "znver5", "bdver2")] == [3] * 4
    assert [simd.prefetch_locality(cpu) for cpu in ("sapphirerapids", "rocketlake", "haswell", "generic")] == [2] * 4


def test_the_streams_take_the_host_s_prefetch_hints(tier_runs):
    """The weight streams' hint by vendor and the cache streams' prefetcht1, one hint each, in the host tier's
    code, compiled by a child (the tier children check their own)."""
    proc, out = tier_runs[HOST]
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    assert str(np.load(out)["hints"]).split(",") == expected_hints()


@pytest.mark.parametrize("name", list(TARGETS))
def test_tier_in_a_subprocess_matches_the_oracles(name, host_run, tier_runs):
    target = TARGETS[name]
    if not _runnable(target):
        pytest.skip(f"this CPU cannot run the {name} target's code")
    data, packed, host = host_run
    proc, out = tier_runs[name]
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    got = dict(np.load(out))
    assert str(got.pop("tier")) == target.tier
    instructions = str(got.pop("instructions")).split(",")
    assert ("vpdpbusd" in instructions) == (target.tier == "avx-vnni")
    assert ("vpmaddubsw" in instructions and "vpsignb" in instructions) == (target.tier == "avx2")
    if "NUMBA_CPU_FEATURES" in target.env:
        assert "zmm" not in instructions  # the restricted target really compiled without AVX-512
    if name == "avx-vnni-vex":
        assert "{vex}" in instructions  # AVX-VNNI's encoding, not AVX512-VL's
    assert str(got.pop("hints")).split(",") == expected_hints()  # the host's hints whatever the target
    _check_against_oracles(data, packed, got)
    for key in got:
        if target.fma and "linear" in key:  # exact integer sums, the same float operations: bit for bit
            np.testing.assert_array_equal(got[key], host[key], err_msg=f"{name} {key}")


def _check_against_oracles(data: dict, packed: dict, out: dict) -> None:
    for fmt, mats in packed.items():
        ref = oracles.moe_packed(data["x"], data["ids"], data["w"], mats["gate"], mats["up"], mats["down"])
        assert _rel_l2(out[f"{fmt}.moe"], ref) < PACKED_ERROR, fmt
        for T in LINEAR_ROWS:
            ref = oracles.linear(data["a"][:T], mats["lin"])
            assert _rel_l2(out[f"{fmt}.linear{T}"][:, :48], ref) < 1e-5, (fmt, T)
    for cache in ("float32", "bf16"):
        k, v = (data[f"attn.{name}.{cache}"] for name in "kv")
        if cache == "bf16":
            k, v = ((x.astype(np.uint32) << 16).view(np.float32) for x in (k, v))
        assert _rel_l2(out[f"attend.{cache}"], _attention(data["attn.q"], k, v)) < 1e-5, cache


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal grouped-query attention of ATTEND's tokens over the cached k, v [kv_heads, positions, d], in float64."""
    a = ATTEND
    group, out = a["heads"] // a["kv_heads"], np.empty((a["tokens"], a["heads"] * a["d"]))
    for t in range(a["tokens"]):
        seen = a["start"] + t + 1
        for h in range(a["heads"]):
            keys, values = k[h // group, :seen].astype(np.float64), v[h // group, :seen].astype(np.float64)
            logits = keys @ q[t, h * a["d"]:(h + 1) * a["d"]] * a["d"] ** -0.5
            p = np.exp(logits - logits.max())
            out[t, h * a["d"]:(h + 1) * a["d"]] = p @ values / p.sum()
    return out


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("features, tier", [
    ({"avx512f", "avx512bw", "avx512vnni", "avx512vl", "avx2", "fma", "f16c"}, "avx512-vnni"),
    ({"avx2", "fma", "f16c", "avxvnni"}, "avx-vnni"),
    ({"avx2", "fma", "f16c", "avx512f", "avx512vl", "avx512vnni"}, "avx-vnni"),  # VNNI without AVX512BW
    ({"avx2", "fma", "f16c", "avx512f", "avx512bw"}, "avx2"),  # AVX-512 without VNNI (Skylake-X)
    ({"avx2", "fma"}, "portable"),
    ({"sse2"}, "portable"),
])
def test_tier_for_features(features, tier):
    assert simd.tier_for(frozenset(features)) == tier


def test_tier_follows_the_jit_target_and_the_override(monkeypatch):
    monkeypatch.setattr(simd.numba.config, "CPU_FEATURES", HASWELL)
    monkeypatch.delenv(simd.ISA_VARIABLE, raising=False)
    assert simd.isa_tier() == "avx2"
    monkeypatch.setenv(simd.ISA_VARIABLE, "portable")
    assert simd.isa_tier() == "portable"
    monkeypatch.setenv(simd.ISA_VARIABLE, "avx512-vnni")
    with pytest.raises(OffloadError, match="lacks.*avx2, portable"):
        simd.isa_tier()
    monkeypatch.setenv(simd.ISA_VARIABLE, "sse9")
    with pytest.raises(OffloadError, match="not a kernel tier"):
        simd.isa_tier()
    monkeypatch.setattr(simd.numba.config, "CPU_FEATURES", None)  # Numba then compiles for the host's features
    monkeypatch.delenv(simd.ISA_VARIABLE)
    monkeypatch.setattr(simd.llvm, "get_host_cpu_features", lambda: {"avx2": True, "fma": True, "f16c": True,
                                                                     "avxvnni": True, "avx512f": False})
    assert simd.isa_tier() == "avx-vnni"


"""tools/bench_e2e.py's bandwidth floor: a round's read bandwidth is the median of its probes, and llama.cpp's
share of the floor is computed from an offload engine's weight bytes, which is right only while those formats hold
exactly the GGUF type's bytes."""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_e2e  # noqa: E402

from csrc_py import formats  # noqa: E402


@pytest.mark.parametrize("fmt", ["int8", "int4s"])
def test_paired_formats_hold_the_gguf_types_bytes(fmt):
    gguf = pytest.importorskip("gguf")
    E, O, K = 2, 64, 256  # whole panels and groups, as every real shape has them
    packed = formats.pack(torch.randn(E, O, K), fmt)
    qtype = bench_e2e.same_bytes_gguf({"experts": fmt, "dense": fmt})
    block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype.upper()]]
    assert packed.nbytes == E * O * K // block * block_bytes


def test_no_pairing_where_the_bytes_differ():
    assert bench_e2e.same_bytes_gguf({"experts": "int4", "dense": "int4"}) is None  # its offsets add bytes
    assert bench_e2e.same_bytes_gguf({"experts": "int8", "dense": "int4s"}) is None
    assert bench_e2e.same_bytes_gguf({"experts": "bf16", "dense": None}) is None
    assert bench_e2e.same_bytes_gguf(None) is None


def test_llama_cpp_share_uses_the_same_bytes_offload_engine_of_the_round():
    steps = 10
    offload = {"decode_s": 1.0, "decode_split": {"formats": {"experts": "int4s", "dense": "int4s"},
                                                 "weight_mb_per_token": 100.0}}
    other = {"decode_s": 1.0, "decode_split": {"formats": {"experts": "int8", "dense": "int8"},
                                               "weight_mb_per_token": 999.0}}
    q4, q8 = {"decode_s": 2.0}, {"decode_s": 2.0}
    round_results = {"offload-int8": other, "offload-int4s": offload, "llama.cpp-q4_0": q4, "llama.cpp-q8_0": q8}
    bench_e2e.add_peer_floor_shares(round_results, 50.0, steps)
    # 100 MB at 50 GB/s is a 2 ms floor; llama.cpp takes 200 ms a token
    assert q4["floor_share"] == pytest.approx(0.002 / 0.2)
    assert q8["floor_share"] == pytest.approx(999e6 / 50e9 / 0.2)
    assert "floor_share" not in offload


def test_a_rounds_bandwidth_is_the_median_of_its_probes():
    # probes before, between and after two engines: one caught a burst, one failed
    probes = [{"read_gbps": 31.0}, {"read_gbps": 55.0}, {"engine": "bandwidth", "error": "exit code 1"},
              {"read_gbps": 33.0}]
    assert bench_e2e.round_bandwidth(probes) == ([31.0, 55.0, 33.0], 33.0)
    assert bench_e2e.round_bandwidth([{"error": "exit code 1"}]) == ([], None)


def test_the_floor_share_records_the_probes_it_rests_on():
    result = {"decode_s": 1.0, "decode_split": {"weight_mb_per_token": 100.0}}
    bench_e2e.add_floor_share(result, 50.0, 10, [40.0, 50.0, 60.0])
    assert result["decode_split"]["read_probes_gbps"] == [40.0, 50.0, 60.0]
    assert result["decode_split"]["floor_share"] == pytest.approx(0.002 / 0.1)


def _rounds(*pairs):
    """One engine's rounds from (decode, prefill) tok/s pairs; None is a failed round."""
    return [{"error": "killed"} if p is None else {"decode_tok_s": p[0], "prefill_tok_s": p[1]} for p in pairs]


def _medians(runs):
    return {engine: {metric: statistics.median(r[metric] for r in results if "error" not in r)
                     for metric in ("decode_tok_s", "prefill_tok_s")} for engine, results in runs.items()}


def test_ratios_pair_each_round_and_skip_a_failed_one():
    runs = {"offload-int4s": _rounds((30.0, 100.0), (20.0, 90.0), None, (26.0, 80.0)),
            "llama.cpp-q4_0": _rounds((20.0, 50.0), (10.0, 45.0), (99.0, 99.0), (20.0, 40.0))}
    decode = bench_e2e.ratios(_medians(runs), runs)["offload-int4s / llama.cpp-q4_0 decode"]
    assert decode["by_round"] == [1.5, 2.0, 1.3]  # the failed round has no ratio, the rest keep their pairs
    assert decode["median_by_round"] == 1.5
    assert decode["of_medians"] == 26.0 / 20.0  # medians 26 (of 30, 20, 26) and 20 (of 20, 10, 99, 20)


def test_ratios_of_engines_that_never_ran_in_the_same_round():
    runs = {"offload-int4s": _rounds((30.0, 100.0), None), "llama.cpp-q4_0": _rounds(None, (20.0, 50.0))}
    decode = bench_e2e.ratios(_medians(runs), runs)["offload-int4s / llama.cpp-q4_0 decode"]
    assert decode == {"of_medians": 1.5, "by_round": [], "median_by_round": None, "steady_by_round": [],
                      "median_steady": None}


def test_a_round_is_steady_when_its_probes_agree():
    assert bench_e2e.steady([33.0, 34.5, 36.1, 35.0])
    assert not bench_e2e.steady([33.6, 34.5, 64.2, 36.1])  # one probe caught a burst
    assert not bench_e2e.steady([35.0])  # one reading cannot say
    assert not bench_e2e.steady([])


def test_the_steady_median_leaves_out_the_rounds_whose_probes_disagreed():
    runs = {"offload-int4s": _rounds((30.0, 100.0), (20.0, 90.0), (26.0, 80.0)),
            "llama.cpp-q4_0": _rounds((20.0, 50.0), (10.0, 45.0), (20.0, 40.0))}
    for engine in runs:  # round 2 ran in a burst its probes caught
        for result, calm in zip(runs[engine], (True, False, True)):
            result["probes_steady"] = calm
    decode = bench_e2e.ratios(_medians(runs), runs)["offload-int4s / llama.cpp-q4_0 decode"]
    assert decode["by_round"] == [1.5, 2.0, 1.3]
    assert decode["steady_by_round"] == [1.5, 1.3]
    assert decode["median_steady"] == pytest.approx(1.4)

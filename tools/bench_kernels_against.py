"""The fused expert kernels of this tree against another commit's, in one process, their calls alternating.

    python tools/bench_kernels_against.py --against main --layers qwen3,mixtral,deepseek --formats int4s
    python tools/bench_kernels_against.py --against HEAD~3 --formats int8,int4s --tokens 1,8 --calls 30

On a host whose memory bandwidth swings between runs (the shared hosts this project is measured on: read probes of
30-36 GB/s and bursts of 49-68 within minutes; one build's decode 29.6-42.4 tok/s in twelve runs over 45
minutes), two processes timed one after the other compare two bandwidths as much as two builds. Here both versions
run in one process on the same packed weights: each call follows a read of twice the last-level cache and an
empty parallel region that wakes the pool's workers (tools/cold_caches.py), the two versions alternate call by call
(the order flipped every pair), and the figure to read is the median over pairs of this / REF, which a slow minute
moves for both.

REF's csrc_py is exported with `git archive` into ~/.cache/offload/kernels-at/<commit>/ as a package of another name
(its imports of csrc_py rewritten; tools/kernels_at.py), so Numba's cache there keeps its compiled kernels between
runs. The weights are packed by this tree's csrc_py.formats: where REF's layout differs, its outputs differ, and the
maximum relative difference printed says so. The layer shapes are tools/bench_kernels.py's; T tokens routed
uniformly at random, REF and this tree on the same ids. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cold_caches  # noqa: E402  (tools/, beside this file)
from bench_kernels import LAYERS, describe_machine  # noqa: E402
from csrc_py import expert_ffn, threads  # noqa: E402
from csrc_py.expert_ffn import NO_BIAS, SILU_ACT  # noqa: E402
from csrc_py.formats import pack  # noqa: E402
from kernels_at import commit_of, is_commit, module_of_csrc_py_at  # noqa: E402  (tools/, beside this file)

KERNELS = {"bf16": "moe_bf16", "int8": "moe_q8", "int4": "moe_q4", "int4s": "moe_q4"}


def routed(T: int, top_k: int, held: int, rng: np.random.Generator) -> np.ndarray:
    """[T, top_k] distinct expert ids per token."""
    return np.stack([rng.choice(held, top_k, replace=False) for _ in range(T)]).astype(np.int64)


def bench_case(layer, fmt: str, T: int, ref_ffn, calls: int, max_gb: float, evict: np.ndarray) -> str:
    """One table row: this tree's and REF's kernel for `fmt` on `layer` at T tokens, cold, alternating."""
    E, H, I = layer.experts, layer.hidden, layer.intermediate
    held = min(E, max(layer.top_k, int(max_gb * 1e9 // (2 * 3 * H * I))))  # the bf16 source must fit
    gen = torch.Generator().manual_seed(0)
    mats = [pack(torch.randn(shape, generator=gen, dtype=torch.bfloat16) / shape[-1] ** 0.5, fmt)
            for shape in ((held, I, H), (held, I, H), (held, H, I))]
    bits = [b for m in mats for b in m.bits()]
    touched = sum(m.nbytes for m in mats) / held  # bytes per expert
    rng = np.random.default_rng(T)
    x = rng.standard_normal((T, H), dtype=np.float32)
    w = rng.random((T, layer.top_k), dtype=np.float32)
    outs = {"this": np.empty((T, H), np.float32), "ref": np.empty((T, H), np.float32)}
    awake = np.zeros(64, np.float32)  # cold_caches.wake_threads's array
    kernels = {"this": getattr(expert_ffn, KERNELS[fmt]), "ref": getattr(ref_ffn, KERNELS[fmt])}

    def call(which: str, ids: np.ndarray) -> float:
        evict.sum()
        cold_caches.wake_threads(awake)
        start = time.perf_counter()
        kernels[which](x, ids, w, *bits, NO_BIAS, NO_BIAS, NO_BIAS, SILU_ACT, outs[which])
        return time.perf_counter() - start

    ids = routed(T, layer.top_k, held, rng)
    call("this", ids), call("ref", ids)  # compile or load, page in
    diff = float(np.abs(outs["this"] - outs["ref"]).max() / max(np.abs(outs["ref"]).max(), 1e-30))
    times: dict[str, list[float]] = {"this": [], "ref": []}
    gigabytes = []
    for i in range(calls):
        ids = routed(T, layer.top_k, held, rng)
        for which in ("this", "ref") if i % 2 == 0 else ("ref", "this"):
            times[which].append(call(which, ids))
        gigabytes.append(len(np.unique(ids)) * touched / 1e9)
    ratios = [r / t for t, r in zip(times["this"], times["ref"])]  # > 1: this tree is faster
    this, ref = statistics.median(times["this"]), statistics.median(times["ref"])
    gb = statistics.median(gigabytes)
    return (f"| {layer.name} | {fmt} | {T} | {this * 1e3:.3f} ({gb / this:.1f} GB/s) | {ref * 1e3:.3f} "
            f"({gb / ref:.1f} GB/s) | **{statistics.median(ratios):.2f}x** ({min(ratios):.2f}-{max(ratios):.2f}) | "
            f"{diff:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="a git commit or branch whose kernels to time alongside")
    parser.add_argument("--layers", default="qwen3,mixtral,deepseek", help=f"comma list of {', '.join(LAYERS)}")
    parser.add_argument("--formats", default="int8,int4s", help=f"comma list of {', '.join(KERNELS)}")
    parser.add_argument("--tokens", default="1", help="comma list of token counts per call")
    parser.add_argument("--calls", type=int, default=20, help="timed calls of each version per case")
    parser.add_argument("--threads", type=int, default=None, help="default: physical cores")
    parser.add_argument("--max-gb", type=float, default=4.0, help="RAM budget for one layer's bf16 source")
    args = parser.parse_args()
    formats = args.formats.split(",")
    if unknown := [f for f in formats if f not in KERNELS]:
        parser.error(f"unknown format(s) {', '.join(unknown)}: use {', '.join(KERNELS)}")
    if unknown := [name for name in args.layers.split(",") if name not in LAYERS]:
        parser.error(f"unknown layer(s) {', '.join(unknown)}: use {', '.join(LAYERS)}")
    layers = [LAYERS[name] for name in args.layers.split(",")]

    if not is_commit(args.against):
        parser.error(f"--against {args.against}: not a commit of this repository")
    n_threads = threads.set_threads(args.threads)
    describe_machine(n_threads)
    ref_ffn = module_of_csrc_py_at(args.against, "expert_ffn")
    print(f"against {args.against} ({commit_of(args.against)[:12]}, from {Path(ref_ffn.__file__).parent}); "
          f"a cold call follows a read of {cold_caches.eviction_bytes() >> 20} MiB; {args.calls} calls each, "
          "alternating")
    evict = cold_caches.eviction_buffer()
    print("\n| layer | format | T | this tree ms | REF ms | this / REF speed, median of pairs (range) | "
          "max rel diff |")
    print("|---|---|---|---|---|---|---|")
    for layer in layers:
        for fmt in formats:
            for T in (int(t) for t in args.tokens.split(",")):
                print(bench_case(layer, fmt, T, ref_ffn, args.calls, args.max_gb, evict), flush=True)


if __name__ == "__main__":
    main()

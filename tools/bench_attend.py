"""The compiled decode step's GQA attention over the cache (csrc_py.decode_step.attend) alone, against another
commit's version of it in the same run.

    python tools/bench_attend.py --against main --contexts 128 512 2048 8192 --tokens 1 8
    python tools/bench_attend.py --against main --cold --threads 2 --kv-cache float32 bf16 --contexts 640 4096

Shapes: Qwen3-30B-A3B (32 heads, 4 KV heads, d 128), gpt-oss (64 heads, 8 KV heads, d 64), the 4.7 B Mixtral of
tools/make_checkpoint.py (32 heads, 8 KV heads, d 64), OLMoE (16 heads, 16 KV heads, d 128: a group of one). T new
tokens after context - T cached positions, no window, no sinks, a float32 cache or one of bf16 bits. Warm (the
default): the same cache arrays every call, each figure the median CPU time of the calling thread (time.thread_time:
on a shared machine it stays near the work done while wall time swings). `--cold`: a read of an --evict-mb buffer
and a trivial parallel loop (the pool's threads awake, as in a decode step) before each call, whose wall time is
the cold figure; a second call right after it gives the warm one (wall time too). `--against REF` loads REF's
csrc_py as a package of its own (tools/kernels_at.py); the two kernels are called in turn. Also prints
max |this - REF| / max |REF| over the outputs (float32 summation order). `--read` adds `read`, a plain parallel
sum over the same cached K / V rows split over the threads as attend splits them (one KV head per thread): with
--cold its cold figure is what streaming the cache alone costs, so attend's cold - max(read cold, attend warm) is
the part of the read its arithmetic does not hide. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch  # noqa: F401  (torch before numba)
import numba
from numba import njit, prange

from cold_caches import eviction_bytes, wake_threads
from csrc_py import decode_step, simd
from kernels_at import is_commit, module_of_csrc_py_at

# heads, KV heads, head dim
SHAPES = {"qwen3": (32, 4, 128), "gpt-oss": (64, 8, 64), "mixtral-4.7b": (32, 8, 64), "olmoe": (16, 16, 128)}


def decode_step_at(ref: str):
    """csrc_py.decode_step as of commit `ref`, in REF's whole package (tools/kernels_at.py): its tiles, prefetch hints
    and fast math are REF's too (a lone copy of decode_step.py would call this tree's)."""
    return module_of_csrc_py_at(ref, "decode_step")


@njit(parallel=True, nogil=True, cache=True, fastmath={"reassoc"})  # reassoc: the sums vectorize
def read_cache(q, heads, kv_heads, d, kcache, vcache, start, window, chunk, scale, sinks, out) -> None:
    """attend's arguments, none of its arithmetic: every cached key and value row a query at start.. reads, summed
    (bits as numbers) one KV head per thread; out[0, g] = head g's sum, so the reads are not optimised away."""
    n = start + q.shape[0]
    for g in prange(kv_heads):
        total = np.float32(0.0)
        for cache in (kcache, vcache):
            rows = cache[g]
            for j in range(n):
                for i in range(d):
                    total += np.float32(rows[j, i])
        out[0, g] = total


def cache_aligned(x: np.ndarray) -> np.ndarray:
    """A copy of x in memory torch allocated: 64-byte aligned, as the model's caches are (torch.zeros). numpy puts a
    large array 16 or 32 bytes off a cache line, so every 64-byte vector load splits in two: the value pass ran
    1.1-1.4x slower on such a copy (also tools/bench_latent.py's)."""
    return torch.from_numpy(x).clone().numpy()


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """x rounded to bf16 (nearest even), as the bits a bf16 cache holds."""
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def time_kernels(kernels: dict, shape: tuple[int, int, int], context: int, T: int, calls: int, cache: str,
                 evict: np.ndarray | None) -> dict:
    """{name: (median us, cold median us or None, output [T, heads*d])} for each kernel, called in turn `calls`
    times after one warm-up; with `evict`, each call cold (after reading evict) and then warm, in wall time."""
    heads, kv_heads, d = shape
    rng = np.random.default_rng(0)
    k = cache_aligned(rng.standard_normal((kv_heads, context, d), dtype=np.float32))
    v = cache_aligned(rng.standard_normal((kv_heads, context, d), dtype=np.float32))
    if cache == "bf16":
        k, v = bf16_bits(k), bf16_bits(v)
    q = cache_aligned(rng.standard_normal((T, heads * d), dtype=np.float32))
    no_sinks = np.zeros(0, np.float32)
    scratch = np.zeros(64, np.float32)
    outs = {name: np.empty((T, heads * d), np.float32) for name in kernels}
    warm = {name: [] for name in kernels}
    cold = {name: [] for name in kernels}
    clock = time.thread_time if evict is None else time.perf_counter
    for _ in range(calls + 1):
        for name, attend in kernels.items():
            if evict is not None:
                evict.sum()
                wake_threads(scratch)
                start = clock()
                attend(q, heads, kv_heads, d, k, v, context - T, 0, 0, d**-0.5, no_sinks, outs[name])
                cold[name].append(clock() - start)
            start = clock()
            attend(q, heads, kv_heads, d, k, v, context - T, 0, 0, d**-0.5, no_sinks, outs[name])
            warm[name].append(clock() - start)
    return {name: (1e6 * statistics.median(warm[name][1:]),
                   1e6 * statistics.median(cold[name][1:]) if evict is not None else None, outs[name])
            for name in kernels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", help="a git commit or branch whose attend to time alongside this tree's")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048, 8192])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1], help="new tokens T per call (at most 8)")
    parser.add_argument("--kv-cache", nargs="+", default=["float32"], choices=["float32", "bf16"])
    parser.add_argument("--calls", type=int, default=40, help="timed calls per kernel and case")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cold", action="store_true", help="also time each call after evicting the caches")
    parser.add_argument("--evict-mb", type=int, default=eviction_bytes() >> 20,
                        help="buffer read before each cold call (default: twice the last-level cache, at least 256)")
    parser.add_argument("--read", action="store_true", help="also time a plain read of the same cache rows")
    args = parser.parse_args()
    if args.against and not is_commit(args.against):
        parser.error(f"--against {args.against}: not a commit of this repository")
    numba.set_num_threads(args.threads)
    evict = np.ones(args.evict_mb << 18, np.float32) if args.cold else None
    kernels = {"this": decode_step.attend}
    if args.against:
        kernels[args.against] = decode_step_at(args.against).attend
    ref = args.against
    if args.read:
        kernels["read"] = read_cache
    columns = [f"{name} {kind} us" for name in kernels for kind in (("cold", "warm") if args.cold else ("",))]
    ratios = [f"{ref} / this {kind}" for kind in (("cold", "warm") if args.cold else ("",))] if ref else []
    print(f"kernel ISA tier {simd.TIER}, threads {args.threads}, "
          f"{'wall time, cold and warm' if args.cold else 'CPU time, warm'}, median of {args.calls} calls")
    print("| shape | heads / KV / d | cache | T | positions | " + " | ".join(c.replace("  ", " ") for c in
          columns + ratios) + (" | max rel diff |" if ref else " |"))
    print("|---" * (5 + len(columns) + len(ratios) + (1 if ref else 0)) + "|")
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        for cache in args.kv_cache:
            for T in args.tokens:
                for context in args.contexts:
                    got = time_kernels(kernels, shape, context, T, args.calls, cache, evict)
                    cells = [f"{us:.0f}" for warm_us, cold_us, _ in got.values()
                             for us in ((cold_us, warm_us) if args.cold else (warm_us,))]
                    row = f"| {shape_name} | {' / '.join(map(str, shape))} | {cache} | {T} | {context} | "
                    row += " | ".join(cells)
                    if ref:
                        (this_warm, this_cold, this_out), (ref_warm, ref_cold, ref_out) = got["this"], got[ref]
                        pairs = ((ref_cold, this_cold), (ref_warm, this_warm)) if args.cold else \
                            ((ref_warm, this_warm),)
                        diff = np.abs(this_out - ref_out).max() / np.abs(ref_out).max()
                        row += " | " + " | ".join(f"{a / b:.2f}x" for a, b in pairs) + f" | {diff:.1e}"
                    print(row + " |", flush=True)


if __name__ == "__main__":
    main()

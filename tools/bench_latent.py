"""MLA's absorbed attention (csrc_py.decode_step.latent_attend) alone, against another commit's version of it in
the same run, with its inputs in DRAM (as in a decode step, where the previous layer's experts evicted them) and
in cache.

    python tools/bench_latent.py --against main --positions 512 2048 8192 --tokens 1 4 --dsa 2048:8192
    python tools/bench_latent.py --packed int4s int8    # W_UK / W_UV packed per head, against bf16 bits

Shape: DeepSeek-V2-Lite (16 heads, nope 128, rope 64, rank 512, v 128), kv_b_proj's weight as bf16 bits. T new
tokens after positions - T cached ones; `--dsa N:P` adds a case where each query attends N selected positions of
P. Cold: a read of a --evict-mb buffer before each call (wall time: cold work is memory time), then a trivial
parallel loop so the pool's threads are awake as in a decode step (waking a sleeping one costs this VM up to a
millisecond, which would swamp the figures); warm: the same arrays called again. `--against REF` loads REF's
csrc_py as a package of its own (tools/kernels_at.py); the kernels are called in turn (interleaved, so the shared
host's noise falls on both), each figure the median of --calls calls, and the ratio REF / this is per case. Also
prints max |this - REF| / max |REF| (float32 summation order). `--packed FMT ...` adds this tree's
latent_attend_packed with the same W_UK / W_UV packed per head in each format (offload.model.mla.pack_absorbed, as
a CPU-only run with dense=FMT holds them), interleaved likewise. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch  # noqa: F401  (torch before numba)
import numba

from bench_attend import cache_aligned, decode_step_at  # tools/ is the script's folder, so on sys.path
from cold_caches import eviction_bytes, wake_threads
from kernels_at import is_commit
from csrc_py import decode_step

HEADS, NOPE, ROPE, RANK, V = 16, 128, 64, 512, 128  # DeepSeek-V2-Lite


def case_inputs(positions: int, T: int, selected: int, rng: np.random.Generator) -> tuple:
    """(q, w_kv bf16 bits, c_cache, r_cache, start, selection) for T queries ending at `positions`."""
    q = cache_aligned(rng.standard_normal((T, HEADS * (NOPE + ROPE)), dtype=np.float32))
    w = torch.from_numpy(rng.standard_normal((HEADS, NOPE + V, RANK), dtype=np.float32) * 0.05)
    w_kv = w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    c = cache_aligned(rng.standard_normal((positions, RANK), dtype=np.float32))
    r = cache_aligned(rng.standard_normal((positions, ROPE), dtype=np.float32))
    start = positions - T
    if selected:
        selection = np.stack([np.sort(rng.permutation(positions)[:selected]) for _ in range(T)]).astype(np.int64)
    else:
        selection = np.zeros((T, 0), np.int64)
    return q, w_kv, c, r, start, selection


def time_case(kernels: dict, positions: int, T: int, selected: int, calls: int, evict: np.ndarray) -> dict:
    """{name: (cold median us, warm median us, output)}: each kernel called in turn, cold then warm, the order
    rotated call by call so that no kernel always runs right after the same one."""
    q, w_kv, c, r, start, selection = case_inputs(positions, T, selected, np.random.default_rng(0))
    outs = {name: np.empty((T, HEADS * V), np.float32) for name in kernels}
    cold = {name: [] for name in kernels}
    warm = {name: [] for name in kernels}
    scale = (NOPE + ROPE) ** -0.5
    scratch = np.zeros(64, np.float32)
    for name, kernel in kernels.items():  # compile and warm up
        kernel(q, HEADS, NOPE, w_kv, c, r, start, scale, selection, selected, outs[name])
    names = list(kernels)
    for call in range(calls):
        for name in names[call % len(names):] + names[:call % len(names)]:
            kernel = kernels[name]
            evict.sum()
            wake_threads(scratch)
            t0 = time.perf_counter()
            kernel(q, HEADS, NOPE, w_kv, c, r, start, scale, selection, selected, outs[name])
            t1 = time.perf_counter()
            kernel(q, HEADS, NOPE, w_kv, c, r, start, scale, selection, selected, outs[name])
            t2 = time.perf_counter()
            cold[name].append(t1 - t0)
            warm[name].append(t2 - t1)
    return {name: (1e6 * statistics.median(cold[name]), 1e6 * statistics.median(warm[name]), outs[name])
            for name in kernels}


def packed_attend(fmt: str, module=decode_step):
    """A callable with latent_attend's arguments that runs `module`'s latent_attend_packed (this tree's
    csrc_py.decode_step, or another commit's) on w_kv (bf16 bits [heads, nope + v, rank]) packed per head in
    `fmt`, packed once per weight array."""
    from offload.model.mla import pack_absorbed

    packed: dict[int, tuple] = {}

    def attend(q, heads, nope, w_kv, c, r, start, scale, selection, selected, out):
        if id(w_kv) not in packed:
            w = torch.from_numpy(w_kv.view(np.int16)).view(torch.bfloat16).float()
            k_b, v_b = pack_absorbed(w, nope, fmt)
            # w_kv kept: its id stays its own
            packed[id(w_kv)] = (w_kv, k_b.packed.kernel_tuple(), v_b.packed.kernel_tuple())
        _, k_b, v_b = packed[id(w_kv)]
        module.latent_attend_packed(q, heads, nope, k_b, v_b, c, r, start, scale, selection, selected, out)

    return attend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", help="a git commit or branch whose latent_attend to time alongside this tree's")
    parser.add_argument("--positions", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4], help="new tokens T per call (at most 8)")
    parser.add_argument("--dsa", nargs="*", default=["2048:8192"], help="SELECTED:POSITIONS cases")
    parser.add_argument("--calls", type=int, default=15, help="timed calls per kernel and case")
    parser.add_argument("--packed", nargs="*", default=[], choices=["int8", "int4", "int4s"],
                        help="also time W_UK / W_UV packed per head in these formats")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--evict-mb", type=int, default=eviction_bytes() >> 20,
                        help="buffer read before each cold call (default: twice the last-level cache, at least 256)")
    args = parser.parse_args()
    if args.against and not is_commit(args.against):
        parser.error(f"--against {args.against}: not a commit of this repository")
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    evict = np.ones(args.evict_mb << 18, np.float32)
    cases = [(p, T, 0) for T in args.tokens for p in args.positions]
    cases += [(int(p), T, int(n)) for T in args.tokens for n, p in (d.split(":") for d in args.dsa)]
    ref = args.against
    at_ref = decode_step_at(ref) if ref else None
    kernels = {"this": decode_step.latent_attend}
    if ref:
        kernels[ref] = at_ref.latent_attend
    pairs = [("this", ref)] if ref else []  # (this tree's kernel, REF's) compared per case
    for fmt in args.packed:
        kernels[f"packed {fmt}"] = packed_attend(fmt)
        if ref:
            kernels[f"{ref} packed {fmt}"] = packed_attend(fmt, at_ref)
            pairs.append((f"packed {fmt}", f"{ref} packed {fmt}"))
    names = list(kernels)
    print(f"threads {numba.get_num_threads()}, evict {args.evict_mb} MB, {args.calls} calls, median wall us")
    print("| T | positions | selected | " + " | ".join(f"{n} cold | {n} warm" for n in names) + "".join(
        f" | {theirs} / {mine} cold | warm | max rel diff" for mine, theirs in pairs) + " |")
    print("|---" * (3 + 2 * len(names) + 3 * len(pairs)) + "|")
    for positions, T, selected in cases:
        got = time_case(kernels, positions, T, selected, args.calls, evict)
        row = f"| {T} | {positions} | {selected or '-'} | " + " | ".join(
            f"{c:.0f} | {w:.0f}" for c, w, _ in got.values())
        for mine, theirs in pairs:
            (c_this, w_this, out_this), (c_ref, w_ref, out_ref) = got[mine], got[theirs]
            diff = np.abs(out_this - out_ref).max() / np.abs(out_ref).max()
            row += f" | {c_ref / c_this:.2f}x | {w_ref / w_this:.2f}x | {diff:.1e}"
        print(row + " |", flush=True)


if __name__ == "__main__":
    main()

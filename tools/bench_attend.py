"""The compiled decode step's GQA attention over the cache (csrc_py.decode_step.attend) alone, one thread, against
another commit's version of it in the same run.

    python tools/bench_attend.py --against main --contexts 128 512 2048 8192 --tokens 1 8

Shapes: Qwen3-30B-A3B (32 heads, 4 KV heads, d 128), gpt-oss (64 heads, 8 KV heads, d 64), OLMoE (16 heads, 16 KV
heads, d 128: a group of one). T new tokens after context - T cached positions, no window, no sinks; the same cache
arrays every call (warm caches). `--against REF` loads REF's csrc_py/decode_step.py (git show) as a separate module;
the two kernels are called in turn, and each figure is the median CPU time of the calling thread
(time.thread_time: on a shared machine it stays near the work done while wall time swings). Also prints
max |this - REF| / max |REF| over the outputs (float32 summation order). A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch  # noqa: F401  (torch before numba)
import numba

from csrc_py import decode_step

SHAPES = {"qwen3": (32, 4, 128), "gpt-oss": (64, 8, 64), "olmoe": (16, 16, 128)}  # heads, KV heads, head dim
REPO = Path(__file__).resolve().parent.parent


def decode_step_at(ref: str, folder: Path):
    """csrc_py/decode_step.py as of commit `ref`, imported from a copy in `folder` as a separate module (also
    tools/bench_latent.py's)."""
    source = subprocess.run(["git", "show", f"{ref}:csrc_py/decode_step.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = folder / "decode_step_at_ref.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("decode_step_at_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_kernels(kernels: dict, shape: tuple[int, int, int], context: int, T: int, calls: int) -> dict:
    """{name: (median us, output [T, heads*d])} for each kernel, called in turn `calls` times after one warm-up."""
    heads, kv_heads, d = shape
    rng = np.random.default_rng(0)
    k = rng.standard_normal((kv_heads, context, d), dtype=np.float32)
    v = rng.standard_normal((kv_heads, context, d), dtype=np.float32)
    q = rng.standard_normal((T, heads * d), dtype=np.float32)
    no_sinks = np.zeros(0, np.float32)
    outs = {name: np.empty((T, heads * d), np.float32) for name in kernels}
    times = {name: [] for name in kernels}
    for _ in range(calls + 1):
        for name, attend in kernels.items():
            start = time.thread_time()
            attend(q, heads, kv_heads, d, k, v, context - T, 0, 0, d**-0.5, no_sinks, outs[name])
            times[name].append(time.thread_time() - start)
    return {name: (1e6 * statistics.median(times[name][1:]), outs[name]) for name in kernels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", help="a git commit or branch whose attend to time alongside this tree's")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048, 8192])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1], help="new tokens T per call (at most 8)")
    parser.add_argument("--calls", type=int, default=40, help="timed calls per kernel and case")
    args = parser.parse_args()
    numba.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        kernels = {"this": decode_step.attend}
        if args.against:
            kernels[args.against] = decode_step_at(args.against, Path(tmp)).attend
        ref = args.against
        print("| shape | heads / KV / d | T | positions | " + " | ".join(f"{name} us" for name in kernels)
              + (f" | {ref} / this | max rel diff |" if ref else " |"))
        print("|---" * (4 + len(kernels) + (2 if ref else 0)) + "|")
        for shape_name in args.shapes:
            shape = SHAPES[shape_name]
            for T in args.tokens:
                for context in args.contexts:
                    got = time_kernels(kernels, shape, context, T, args.calls)
                    row = f"| {shape_name} | {' / '.join(map(str, shape))} | {T} | {context} | " + " | ".join(
                        f"{us:.0f}" for us, _ in got.values())
                    if ref:
                        (this_us, this_out), (ref_us, ref_out) = got["this"], got[ref]
                        diff = np.abs(this_out - ref_out).max() / np.abs(ref_out).max()
                        row += f" | {ref_us / this_us:.2f}x | {diff:.1e}"
                    print(row + " |", flush=True)


if __name__ == "__main__":
    main()

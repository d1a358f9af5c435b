"""Measure engine crossovers afresh (csrc_py/crossover.py) and print the timings behind them (a benchmark, not a test).

    python tools/bench_crossovers.py                                  # MoE classes of the Qwen3/Mixtral/DeepSeek shapes
    OFFLOAD_CPU_ISA=portable python tools/bench_crossovers.py --formats int8,int4
    python tools/bench_crossovers.py --classes linear/bf16/bf16/2048x2048 --rows 1,2,4,8,16,32,64

Each engine class is timed as the runtime times it at first use (dispatch.measure_engines: random weights of the
class's shape, both engines interleaved, best of crossover.REPEATS), without reading or writing the cache, and
--rounds times over (the host is shared: the rounds show how stable the derived crossover is). Prints per class
and round the fused and torch milliseconds per row count, the derived crossover and the seconds the measurement
took, after the ISA tier, torch's bf16 path and the thread counts.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csrc_py import crossover, dispatch, threads  # noqa: E402
from csrc_py.crossover import EngineClass  # noqa: E402

SHAPES = {"qwen3": (2048, 768), "mixtral": (4096, 14336), "deepseek": (7168, 2048)}  # MoE (H, I)


def parse_class(label: str) -> EngineClass:
    kind, fmt, dtype, dims = label.split("/")
    a, b = (int(n) for n in dims.split("x"))
    return crossover.engine_class(kind, fmt, dtype, a, b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="qwen3,mixtral,deepseek", help=f"MoE shapes: {', '.join(SHAPES)}")
    parser.add_argument("--formats", default="bf16,int8,int4")
    parser.add_argument("--dtype", default="f32", choices=("f32", "bf16"), help="the activations' dtype class")
    parser.add_argument("--classes", default="", help="explicit labels kind/fmt/dtype/AxB instead of --layers")
    parser.add_argument("--rows", default=",".join(map(str, crossover.ROWS)))
    parser.add_argument("--budget", type=float, default=crossover.BUDGET_S, help="seconds of timed calls per class")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    n_threads = threads.set_threads(args.threads)
    crossover.ROWS, crossover.BUDGET_S = tuple(int(r) for r in args.rows.split(",")), args.budget
    key = crossover.host_key(dispatch.torch_has_native_bf16())
    print(f"{key['cpu']}; tier {key['tier']}; torch {key['torch']} (bf16 {key['torch_bf16']}); {n_threads} threads; "
          f"budget {crossover.BUDGET_S} s of timed calls per class")
    if args.classes:
        classes = [parse_class(label) for label in args.classes.split(",")]
    else:
        classes = [crossover.engine_class("moe", fmt, args.dtype, *SHAPES[name])
                   for name in args.layers.split(",") for fmt in args.formats.split(",")]
    print("\n| class | round | rows | fused ms | torch ms | crossover (rows per expert) | measuring s |")
    print("|---|---|---|---|---|---|---|")
    for cls in dict.fromkeys(classes):
        for r in range(args.rounds):
            start = time.perf_counter()
            t = dispatch.measure_engines(cls)
            seconds = time.perf_counter() - start
            found = crossover.derive(t)
            print(f"| {cls.label} | {r + 1} | {', '.join(map(str, t.rows))} | "
                  f"{', '.join(f'{s * 1e3:.2f}' for s in t.fused)} | {', '.join(f'{s * 1e3:.2f}' for s in t.torch)} | "
                  f"{'never' if found is None else found} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()

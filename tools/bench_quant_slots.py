"""One decode step's resident-expert compute: a pool of device-dtype rows against int8 / int4 rows.

    python tools/bench_quant_slots.py                  # CPU: the simulated device tier (torch on the CPU)
    python tools/bench_quant_slots.py --device cuda    # a GPU tier

A pool of --rows rows of a Qwen3-30B-A3B-shaped expert (H 2048, I 768) filled from random weights; one token routed
to top-8 with two pairs on the host (row -1). Device-dtype rows run torch's grouped matmul over the used rows
(experts/swiglu.py: swiglu_rows); int8 / int4 rows run one weight-only matmul per projection over every row
(experts/quant_pool.py). Float32 and bf16 activations; every pool's call is timed in turn each round (interleaved),
best of --rounds. Prints the time, the ratio to the float32 pool and the pool's bytes. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import time

import torch

from offload.experts.base import SILU, ExpertWeights
from offload.experts.quant_pool import make_pool

H, I, K = 2048, 768, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    device, R = torch.device(args.device), args.rows
    torch.manual_seed(0)
    w = ExpertWeights(torch.randn(R, I, H) / 40, torch.randn(R, I, H) / 40, torch.randn(R, H, I) / 30)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pools = {}
    for fmt in (None, "int8", "int4"):
        for dtype in (torch.float32, torch.bfloat16):
            pool = make_pool(fmt, (), R, H, I, dtype, device, False, SILU)
            pool.fill(0, ExpertWeights(*(m.to(device, dtype) for m in (w.gate, w.up, w.down))))
            pools[f"{fmt or 'rows'} / {str(dtype).removeprefix('torch.')}"] = (pool, dtype)
    x = torch.randn(1, H, device=device)
    rows = torch.tensor([[0, 3, 5, 7, -1, -1, 9, 12]], device=device) % R
    rows[0, 4:6] = -1
    weights = torch.rand(1, K, device=device)
    best = dict.fromkeys(pools, float("inf"))
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, (pool, dtype) in pools.items():
                sync()
                start = time.perf_counter()
                pool.compute(x.to(dtype), rows, weights.to(dtype))
                sync()
                best[name] = min(best[name], time.perf_counter() - start)
    base = best["rows / float32"]
    print(f"{'pool':<18}{'time':>10}{'ratio':>8}{'pool MiB':>10}")
    for name, (pool, _) in pools.items():
        print(f"{name:<18}{best[name] * 1e3:>8.2f}ms{best[name] / base:>8.2f}{pool.nbytes / 2**20:>10.1f}")


if __name__ == "__main__":
    main()

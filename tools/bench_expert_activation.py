"""Same-run A/B of the fused MoE kernel on plain SwiGLU experts: a saved copy of the kernel module from before the
experts' activation and biases became kernel arguments against the current one, interleaved, medians.

    git show <rev>:csrc_py/expert_ffn.py > /tmp/oldffn/old_expert_ffn.py
    PYTHONPATH=. python tools/bench_expert_activation.py /tmp/oldffn
"""
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else "/tmp/oldffn")
import old_expert_ffn as old  # noqa: E402
from csrc_py import expert_ffn as new  # noqa: E402
from csrc_py.formats import pack  # noqa: E402

E, H, I, K = 64, 2048, 768, 8  # a Qwen3-30B-A3B layer
REPEATS = 15
gen = torch.Generator().manual_seed(0)
for fmt in ("int8", "int4"):
    g, u, d = (pack(torch.randn(s, generator=gen) * 0.02, fmt) for s in ((E, I, H), (E, I, H), (E, H, I)))
    for T in (1, 32):
        x = torch.randn(T, H, generator=gen).numpy()
        ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).numpy()
        w = torch.rand(T, K, generator=gen).numpy()
        y = np.empty((T, H), np.float32)
        kold = {"int8": old.moe_q8, "int4": old.moe_q4}[fmt]
        knew = {"int8": new.moe_q8, "int4": new.moe_q4}[fmt]

        def run_old():
            kold(x, ids, w, *g.bits(), *u.bits(), *d.bits(), y)

        def run_new():
            knew(x, ids, w, *g.bits(), *u.bits(), *d.bits(), *(new.NO_BIAS,) * 3, new.SILU_ACT, y)

        run_old()
        run_new()
        times_old, times_new = [], []
        for _ in range(REPEATS):
            for run, acc in ((run_old, times_old), (run_new, times_new)):
                start = time.perf_counter()
                run()
                acc.append(time.perf_counter() - start)
        before, after = statistics.median(times_old), statistics.median(times_new)
        print(f"{fmt} T={T}: before {before * 1e3:.2f} ms, after {after * 1e3:.2f} ms, ratio {after / before:.3f}")

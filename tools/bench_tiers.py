"""Same-run comparison of the kernel ISA tiers on real MoE layer shapes (a benchmark, not a test).

    python tools/bench_tiers.py                               # qwen3, deepseek, mixtral; T=1 and T=128
    python tools/bench_tiers.py --layers qwen3 --tokens 1 --rounds 30

Every tier this CPU can run (csrc_py.simd.TIERS) is compiled in this one process (simd.TIER patched while each copy
of the grouped int8/int4/int4s matmuls compiles, uncached), so the tiers take turns call by call and see the same
machine noise. A call is one layer's three expert matmuls (gate, up, down) on prequantized activations, for uniform
top-k routing drawn afresh per call (decode streams its experts from DRAM); each call is paired with a
read-bandwidth probe just before it (a torch sum over twice the last-level cache, tools/cold_caches.py). Reported
per layer, token count, tier and format: median and best ms, GB/s of expert bytes touched at the best call, that as
% of the best probe of the same engine's calls, and G weights/s at the best call (best against best: on a shared
machine the fastest call and probe are the ones that were not preempted). At T > 1 the torch loops over experts
(bf16 with oneDNN, bf16 with oneDNN off as on a CPU without AVX512-BF16, and fp32) run in the same rounds. The
256-bit tiers compile for this CPU's target here: their microkernels are 256-bit by construction, the code around
them may use wider registers. Layers hold fewer experts than the model when --max-gb says so (decode still touches
top-k distinct experts).
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

from bench_kernels import LAYERS, Layer, read_bandwidth, torch_loop  # noqa: E402
from cold_caches import eviction_bytes  # noqa: E402
from csrc_py import formats, simd, threads  # noqa: E402
from csrc_py import quant_kernels as qk  # noqa: E402
from csrc_py.grouped_matmul import matmul_q4, matmul_q8  # noqa: E402
from numba import njit  # noqa: E402

FORMATS = ("int8", "int4", "int4s")
KERNELS = {"int8": matmul_q8, "int4": matmul_q4, "int4s": matmul_q4}  # int4s: matmul_q4 with m None


def tier_kernels(tier: str, formats: tuple[str, ...]) -> dict[str, object]:
    """Uncached copies of the grouped matmuls whose microkernels compile for `tier` (at their first call)."""
    options = {k: v for k, v in matmul_q8.targetoptions.items() if k not in ("cache", "nopython")}
    return {fmt: njit(**options)(KERNELS[fmt].py_func) for fmt in formats}


class TierLayer:
    """One MoE layer's expert stacks, packed in each format, and the calls that run them."""

    def __init__(self, layer: Layer, experts: int, formats_: tuple[str, ...] = FORMATS) -> None:
        gen = torch.Generator().manual_seed(0)
        self.layer, self.experts = layer, experts
        H, I = layer.hidden, layer.intermediate
        self.float = [(torch.randn(experts, o, k, generator=gen) / k ** 0.5).to(torch.bfloat16)
                      for o, k in ((I, H), (I, H), (H, I))]
        self.packed = {fmt: [formats.pack(m, fmt) for m in self.float] for fmt in formats_}
        self.rng = np.random.default_rng(0)

    def routing(self, tokens: int) -> np.ndarray:
        k = min(self.layer.top_k, self.experts)
        return np.stack([self.rng.choice(self.experts, k, replace=False) for _ in range(tokens)])

    def call(self, kernel, fmt: str, ids: np.ndarray) -> tuple[float, int]:
        """Seconds of the three matmuls for routing `ids`, and the expert bytes they touched."""
        used, counts = np.unique(ids, return_counts=True)
        seg_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        rows = int(seg_start[-1])
        gate, up, down = self.packed[fmt]
        x = qk.quantized_rows(np.random.default_rng(rows).standard_normal((rows, self.layer.hidden), np.float32),
                              gate.d.shape[2])
        h = qk.quantized_rows(np.random.default_rng(rows).standard_normal((rows, self.layer.intermediate),
                                                                          np.float32), down.d.shape[2])
        outs = [np.empty((rows, pm.padded_shape[1]), np.float32) for pm in (gate, up, down)]
        seg = (used.astype(np.int64), seg_start)
        start = time.perf_counter()
        kernel(*gate.bits(), *seg, *x, outs[0])
        kernel(*up.bits(), *seg, *x, outs[1])
        kernel(*down.bits(), *seg, *h, outs[2])
        seconds = time.perf_counter() - start
        return seconds, len(used) * sum(pm.nbytes // self.experts for pm in (gate, up, down))


def torch_engines(tl: TierLayer) -> dict[str, object]:
    """name -> call(ids) for the torch loops over experts, timed like the kernels."""
    f32 = [m.float() for m in tl.float]

    def run(mats, mkldnn: bool):
        def call(ids: np.ndarray) -> float:
            T = ids.shape[0]
            x = torch.randn(T, tl.layer.hidden, dtype=mats[0].dtype)
            w = torch.rand(T, ids.shape[1])
            with torch.backends.mkldnn.flags(enabled=mkldnn):
                start = time.perf_counter()
                torch_loop(x, torch.from_numpy(ids), w, *mats)
                return time.perf_counter() - start
        return call

    return {"torch bf16 loop": run(tl.float, True), "torch bf16 loop, oneDNN off": run(tl.float, False),
            "torch fp32 loop": run(f32, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="qwen3,deepseek,mixtral")
    parser.add_argument("--tokens", default="1,128")
    parser.add_argument("--rounds", type=int, default=15, help="calls per engine (prefill: a third, at least 3)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-gb", type=float, default=2.0, help="RAM budget for one layer's copies")
    parser.add_argument("--formats", default=",".join(FORMATS), help="packed formats to compare")
    args = parser.parse_args()
    fmts = tuple(args.formats.split(","))

    n_threads = threads.set_threads(args.threads)
    best = simd.tier_for(simd.jit_features())
    tiers = simd.TIERS[simd.TIERS.index(best):]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"{cpu}; {n_threads} threads; tiers {', '.join(tiers)} (best: {best}); torch bf16 matmul "
          f"{'native' if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 'software'}")
    kernels = {tier: tier_kernels(tier, fmts) for tier in tiers}
    probe = torch.ones(eviction_bytes() // 4)
    print("\n| layer | T | engine | median ms | best ms | GB/s | % of BW | G weights/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.layers.split(","):
        layer = LAYERS[name]
        per_expert = 3 * layer.hidden * layer.intermediate * 8  # bf16 + fp32 + int8 + int4 copies, roughly
        tl = TierLayer(layer, min(layer.experts, max(layer.top_k + 1, int(args.max_gb * 1e9 // per_expert))), fmts)
        for tier in tiers:  # compile each tier's copies (simd.TIER is read while they compile)
            previous, simd.TIER = simd.TIER, tier
            try:
                for fmt in fmts:
                    tl.call(kernels[tier][fmt], fmt, tl.routing(1))
            finally:
                simd.TIER = previous
        for T in [int(t) for t in args.tokens.split(",")]:
            engines = {f"{tier} {fmt}": (lambda ids, k=kernels[tier][fmt], f=fmt, tl=tl: tl.call(k, f, ids))
                       for tier in tiers for fmt in fmts}
            if T > 1:
                for label, call in torch_engines(tl).items():
                    engines[label] = lambda ids, call=call: (call(ids), 0)  # bytes: not comparable
            samples: dict[str, list[tuple[float, float, int]]] = {label: [] for label in engines}
            for _ in range(args.rounds if T == 1 else max(3, args.rounds // 3)):
                for label, call in engines.items():
                    ids = tl.routing(T)
                    bw = read_bandwidth(probe, reads=1)
                    seconds, touched = call(ids)
                    samples[label].append((seconds, bw, touched))
            for label, got in samples.items():
                t = statistics.median(s for s, _, _ in got)
                fastest, _, touched = min(got)
                share = touched / fastest / 1e9 / max(bw for _, bw, _ in got)
                weights = 3 * layer.hidden * layer.intermediate * T * layer.top_k
                gbps = f"{touched / fastest / 1e9:.1f}" if touched else "-"
                pct = f"{100 * share:.0f}%" if touched else "-"
                print(f"| {layer.name} (E held {tl.experts}) | {T} | {label} | {t * 1e3:.2f} | {fastest * 1e3:.2f} | "
                      f"{gbps} | {pct} | {weights / fastest / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()

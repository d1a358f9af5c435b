"""One MoE layer's decode call on the CPU kernels, four ways, interleaved call by call (a benchmark, not a test).

    python tools/bench_host_link.py --layers qwen3,mixtral-4.7b --formats int4s,int8 --against f2c9e9a

Engines, all on the same packed experts (bench_kernels' random layers, top-k of the experts held) and T = 1:

- `kernel`: the fused kernel alone, from a prepared numpy block (CpuExperts.run_block: the compiled decode step
  and the host link's worker call the kernel so, with nothing converted in Python);
- `CpuExperts`: `CpuExperts.__call__` on torch tensors (bf16 x), as the torch path calls a layer;
- `host link`: the CPU side of a hybrid (GPU + CPU) layer on the CPU tier: offload.experts.link.HostLink packs x,
  the ids and the weights, its worker thread computes them, the result is added to the layer's output;
- `REF's host link` with `--against REF`: that commit's offload/experts/link.py in the same run.

Every round runs each engine once, in a rotated order, each call after a 256 MiB read (the caches cold, as a
decode step's layer finds them after the others streamed their weights) and an untimed call on other experts (the
previous layer's). Prints per engine the median wall time, its share of the read bandwidth measured around the
call (expert bytes touched / time / probe), and the median over rounds of its time over the kernel's.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csrc_py import simd, threads  # noqa: E402
from offload.experts.cpu import CpuExperts  # noqa: E402
from offload.experts.link import HostLink  # noqa: E402

from bench_attend import module_at  # noqa: E402  (tools/ is the script's folder, so on sys.path)
from bench_kernels import LAYERS, HostLinkCall, Layer, random_layer, read_bandwidth  # noqa: E402


class Engines:
    """The engines of one layer and format, each a callable of (x, ids, weights) torch tensors."""

    def __init__(self, cpu: CpuExperts, hidden: int, links: dict[str, type]) -> None:
        self.cpu, self.hidden = cpu, hidden
        self.calls = {"kernel": self.kernel, "CpuExperts": cpu}
        for ref, link in links.items():
            name = f"{ref}'s host link" if ref else "host link"
            self.calls[name] = HostLinkCall(cpu, link(hidden, torch.device("cpu")))
        self._block = np.zeros((1, 0), np.float32)

    def prepare(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> None:
        """The kernel's block for the next call, built outside its timing."""
        self._block = torch.cat((x.float(), ids.float(), w.float()), dim=1).numpy()

    def kernel(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> None:
        if not self.cpu.run_block(self._block, np.empty((self._block.shape[0], self.hidden), np.float32)):
            raise SystemExit("the fused kernel is not the engine for this call (torch's crossover): nothing to time")


def bench_layer(layer: Layer, fmt: str, links: dict[str, type], rounds: int, probe: torch.Tensor,
                max_gb: float) -> list[str]:
    bf16_bytes = 2 * 3 * layer.hidden * layer.intermediate  # an expert's source weights
    experts = min(layer.experts, max(2 * layer.top_k, int(max_gb * 1e9 // bf16_bytes)))
    cpu = CpuExperts(random_layer(layer, experts), fmt)
    per_expert = cpu.nbytes / experts
    engines = Engines(cpu, layer.hidden, links)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, layer.hidden, generator=gen).to(torch.bfloat16)

    def routing(avoid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token's top-k ids (uniform, none of `avoid`) and weights."""
        pool = torch.arange(experts)
        if avoid is not None:
            pool = pool[~torch.isin(pool, avoid)]
        ids = pool[torch.randperm(pool.numel(), generator=gen)[: layer.top_k]][None]
        return ids, torch.rand(1, layer.top_k, generator=gen)

    names = list(engines.calls)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    shares: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # JIT and first touch
        engines.prepare(x, *routing())
        engines.calls[name](x, *routing())
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            ids, w = routing()
            previous = routing(avoid=ids)
            before = read_bandwidth(probe, reads=1)
            engines.prepare(x, *previous)
            engines.calls[name](x, *previous)
            engines.prepare(x, ids, w)
            start = time.perf_counter()
            engines.calls[name](x, ids, w)
            seconds[name].append(time.perf_counter() - start)
            bw = (before + read_bandwidth(probe, reads=1)) / 2
            shares[name].append(layer.top_k * per_expert / seconds[name][-1] / 1e9 / bw)
    rows = []
    for name in names:
        over = statistics.median(t / k for t, k in zip(seconds[name], seconds["kernel"]))
        rows.append(f"| {layer.name} | {fmt} | {name} | {statistics.median(seconds[name]) * 1e6:.0f} | "
                    f"{100 * statistics.median(shares[name]):.0f}% | {over:.2f}x |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="qwen3,mixtral-4.7b", help=f"comma list of {', '.join(LAYERS)}")
    parser.add_argument("--formats", default="int4s,int8")
    parser.add_argument("--against", metavar="REF", help="also time commit REF's HostLink")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None, help="default: physical cores")
    parser.add_argument("--max-gb", type=float, default=3.0, help="RAM budget for one layer's packed experts")
    args = parser.parse_args()

    n_threads = threads.set_threads(args.threads)
    links: dict[str, type] = {"": HostLink}
    if args.against:
        links[args.against] = module_at(args.against, "offload/experts/link.py", "offload.experts.link_at_ref",
                                        Path(tempfile.mkdtemp())).HostLink
    print(f"kernel ISA tier {simd.TIER}, {n_threads} threads, T = 1, {args.rounds} rounds, cold calls")
    print("\n| layer | format | engine | us (median) | % of the probe | over the kernel (median by round) |")
    print("|---|---|---|---|---|---|")
    probe = torch.ones(1 << 26)  # 256 MiB, 8x a workstation's L3
    for name in args.layers.split(","):
        for fmt in args.formats.split(","):
            bench_layer(LAYERS[name], fmt, links, args.rounds, probe, args.max_gb)


if __name__ == "__main__":
    main()

"""One MoE layer's decode call on the CPU kernels, four ways, interleaved call by call (a benchmark, not a test).

    python tools/bench_host_link.py --layers qwen3,mixtral-4.7b --formats int4s,int8 --against f2c9e9a

Engines, all on the same packed experts (bench_kernels' random layers, top-k of the experts held) and T = 1:

- `kernel`: the fused kernel alone, from a prepared numpy block (CpuExperts.run_block: the compiled decode step
  and the host link's worker call the kernel so, with nothing converted in Python);
- `CpuExperts`: `CpuExperts.__call__` on torch tensors (bf16 x), as the torch path calls a layer;
- `host link`: the CPU side of a hybrid (GPU + CPU) layer on the CPU tier: offload.experts.link.HostLink packs x,
  the ids and the weights, its worker thread computes them, the result is added to the layer's output;
- `REF's host link` with `--against REF`: that commit's offload/experts/link.py in the same run;
- `gate+up matmul`, `down matmul` (packed formats): the kernel's two grouped matmuls alone, on inputs prepared
  outside their timing, each as a share of the probe over its own bytes; their times over the kernel's leave the
  rest of the call (routing, quantizing the activations, SwiGLU, the weighted sum) as the remainder.

Every parallel region (kernels, torch, the probe) starts on the CPU workers' thread, where the host link runs its
kernels (`on_worker`: one OpenMP team in all). Every round runs each engine once, in a rotated order, each call
after a read of twice the last-level cache (tools/cold_caches.py; the caches cold, as a decode step's layer finds
them after the others streamed their weights) and an untimed call on other experts (the previous layer's). Prints
per engine the median wall time, its share of the read bandwidth measured around the call (expert bytes touched /
time / probe), and the median over rounds of its time over the kernel's.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csrc_py import simd, threads  # noqa: E402
from csrc_py.expert_ffn import route  # noqa: E402
from csrc_py.grouped_matmul import matmul_q4, matmul_q4_pair, matmul_q8, matmul_q8_pair  # noqa: E402
from csrc_py.quant_kernels import quantized_rows  # noqa: E402
from offload.experts.cpu import CpuExperts  # noqa: E402
from offload.experts.link import HostLink  # noqa: E402
from offload.experts.worker import background  # noqa: E402

from kernels_at import is_commit, lone_module_at  # noqa: E402  (tools/ is the script's folder, so on sys.path)
from bench_kernels import LAYERS, Layer, random_layer, read_bandwidth  # noqa: E402
from cold_caches import eviction_bytes  # noqa: E402

T = TypeVar("T")


class Engines:
    """The engines of one layer and format, each a callable of (x, ids, weights) torch tensors."""

    def __init__(self, cpu: CpuExperts, hidden: int, links: dict[str, type]) -> None:
        self.cpu, self.hidden = cpu, hidden
        self.calls = {"kernel": self.kernel, "CpuExperts": cpu}
        for ref, link in links.items():
            name = f"{ref}'s host link" if ref else "host link"
            self.calls[name] = HostLinkCall(cpu, link(hidden, torch.device("cpu")))
        self._block = np.zeros((1, 0), np.float32)
        self.byte_shares = dict.fromkeys(self.calls, 1.0)  # of the call's expert bytes, each engine reads
        if cpu.fmt != "bf16":
            self.phases = MatmulPhases(cpu)
            self.calls.update({"gate+up matmul": self.phases.pair, "down matmul": self.phases.down})
            down = self.phases.down_share
            self.byte_shares.update({"gate+up matmul": 1 - down, "down matmul": down})

    def run(self, name: str, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> float:
        """Seconds of one call: a link's timed from this thread, as a layer calls it; the others' inside the
        workers' thread (on_worker), without the hand-off."""
        call = self.calls[name]
        if isinstance(call, HostLinkCall):
            start = time.perf_counter()
            call(x, ids, w)
            return time.perf_counter() - start

        def timed() -> float:
            threads.apply()
            start = time.perf_counter()
            call(x, ids, w)
            return time.perf_counter() - start

        return on_worker(timed)

    def prepare(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> None:
        """The kernel's block (and the phases' inputs) for the next call, built outside its timing."""
        self._block = torch.cat((x.float(), ids.float(), w.float()), dim=1).numpy()
        if "down matmul" in self.calls:
            on_worker(self.phases.prepare, self._block[:, : self.hidden], ids.numpy())

    def kernel(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> None:
        if not self.cpu.run_block(self._block, np.empty((self._block.shape[0], self.hidden), np.float32)):
            raise SystemExit("the fused kernel is not the engine for this call (torch's crossover): nothing to time")


class HostLinkCall:
    """The CPU side of a hybrid layer's decode call on the CPU tier: HostLink packs x, the ids and the weights into
    its block, the worker thread computes the experts from it and the result is added to the layer's output."""

    def __init__(self, experts: CpuExperts, link: HostLink) -> None:
        self.experts, self.link = experts, link

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = torch.zeros_like(x)
        self.link.add_result(y, self.link.submit(self.experts, x, ids, w))
        return y


def on_worker(fn: Callable[..., T], *args: object) -> T:
    """fn(*args) on the CPU workers' thread (offload.experts.worker.background, where a host link runs its
    kernels). libgomp keeps a team of threads for each thread that started a parallel region, the kernels' and
    torch's alike, while that thread lives; with a second team alive beside the cores it wakes a sleeping thread
    at every region (offload/openmp_env.py). So every parallel region of the benchmark, the probe's reads too,
    starts on that one thread; this one only hands a link its inputs, as a layer does."""
    return background().submit(fn, *args).result()


class MatmulPhases:
    """The fused kernel's gate/up pair and down matmuls (csrc_py.expert_ffn.moe_q8 / moe_q4) called alone, on the
    routed and quantized inputs of the next call."""

    def __init__(self, cpu: CpuExperts) -> None:
        self.gate, self.up, self.down_m = (m.kernel_tuple() for m in (cpu.gate, cpu.up, cpu.down))
        self.int8 = cpu.fmt == "int8"
        self.num_experts = cpu.gate.shape[0]
        self.down_share = cpu.down.nbytes / (cpu.gate.nbytes + cpu.up.nbytes + cpu.down.nbytes)

    def prepare(self, x: np.ndarray, ids: np.ndarray) -> None:
        seg_expert, seg_start, _, token_of_row = route(ids, self.num_experts)
        groups_in, groups_mid = self.gate[1].shape[2], self.down_m[1].shape[2]
        aq, a_s, a_sum = (a[token_of_row] for a in quantized_rows(x, groups_in))
        rows, mid, out = token_of_row.size, groups_mid * simd.GROUP, self.down_m[1].shape[1] * simd.PANEL
        h = np.random.default_rng(rows).standard_normal((rows, mid)).astype(np.float32)
        self.args = (seg_expert, seg_start, aq, a_s, a_sum)
        self.h = quantized_rows(h, groups_mid)
        self.g, self.u = np.empty((rows, mid), np.float32), np.empty((rows, mid), np.float32)
        self.o = np.empty((rows, out), np.float32)

    def pair(self, *_) -> None:
        (gq, gd, gm), (uq, ud, um) = self.gate, self.up
        if self.int8:
            matmul_q8_pair(gq, gd, uq, ud, *self.args, self.g, self.u)
        else:
            matmul_q4_pair(gq, gd, gm, uq, ud, um, *self.args, self.g, self.u)

    def down(self, *_) -> None:
        dq, dd, dm = self.down_m
        if self.int8:
            matmul_q8(dq, dd, *self.args[:2], *self.h, self.o)
        else:
            matmul_q4(dq, dd, dm, *self.args[:2], *self.h, self.o)


def bench_layer(layer: Layer, fmt: str, links: dict[str, type], rounds: int, probe: torch.Tensor,
                max_gb: float) -> list[str]:
    bf16_bytes = 2 * 3 * layer.hidden * layer.intermediate  # an expert's source weights
    experts = min(layer.experts, max(2 * layer.top_k, int(max_gb * 1e9 // bf16_bytes)))
    cpu = on_worker(lambda: CpuExperts(random_layer(layer, experts), fmt))
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
        engines.run(name, x, *routing())
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            ids, w = routing()
            previous = routing(avoid=ids)
            before = on_worker(read_bandwidth, probe, 1)
            engines.prepare(x, *previous)
            engines.run(name, x, *previous)
            engines.prepare(x, ids, w)
            seconds[name].append(engines.run(name, x, ids, w))
            bw = (before + on_worker(read_bandwidth, probe, 1)) / 2
            touched = layer.top_k * per_expert * engines.byte_shares[name]
            shares[name].append(touched / seconds[name][-1] / 1e9 / bw)
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
    if args.against and not is_commit(args.against):
        parser.error(f"--against {args.against}: not a commit of this repository")

    n_threads = threads.set_threads(args.threads)
    links: dict[str, type] = {"": HostLink}
    if args.against:
        links[args.against] = lone_module_at(args.against, "offload/experts/link.py",
                                             "offload.experts.link_at_ref").HostLink
    print(f"kernel ISA tier {simd.TIER}, {n_threads} threads, T = 1, {args.rounds} rounds, cold calls")
    print("\n| layer | format | engine | us (median) | % of the probe | over the kernel (median by round) |")
    print("|---|---|---|---|---|---|")
    probe = on_worker(torch.ones, eviction_bytes() // 4)  # twice the last-level cache
    for name in args.layers.split(","):
        for fmt in args.formats.split(","):
            bench_layer(LAYERS[name], fmt, links, args.rounds, probe, args.max_gb)


if __name__ == "__main__":
    main()

"""Benchmark the CPU expert kernels on real MoE layer shapes (a benchmark, not a test).

    python tools/bench_kernels.py                          # qwen3, mixtral, deepseek; bf16/int8/int4/int4s; T=1, 512
    python tools/bench_kernels.py --layers qwen3 --formats int8 --quick

Prints the machine's read bandwidth (all cores, one core), then per layer and token count the time of one layer
through each engine, the GB/s of expert weight bytes it touched, that as % of the read bandwidth measured around
the call (the machine is shared: every call is paired with one probe read before and one after), GFLOP/s, and the speed
relative to torch bf16 looping over experts. Weights are random; routing is uniform top-k, fresh for every
call so decode streams its experts from DRAM. A decode call is timed right after an untimed call on other experts,
as one layer's call follows another's in a decode step (the probe before it evicts every cache, the interpreter's
too, which cost a ~1 ms Qwen3 layer 50-100 us). Layers too big for --max-gb hold fewer experts than the model
(the output says so). When kt-kernel (and gguf) are installed, the same layer also runs through its CPU MoE
operator; otherwise that engine is skipped. Every parallel region starts on this one thread: a second thread's
OpenMP team (a host link's worker) would throttle every region (offload/openmp_env.py), so the CPU side of a
hybrid layer is tools/bench_host_link.py's to time, against the kernel alone, on one thread.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cold_caches  # noqa: E402  (tools/, beside this file)
from csrc_py import crossover, dispatch, simd, threads  # noqa: E402
from csrc_py.torch_path import moe_torch  # noqa: E402
from offload.experts.base import ExpertWeights  # noqa: E402
from offload.experts.cpu import CpuExperts, warmup  # noqa: E402


@dataclass(frozen=True)
class Layer:
    name: str
    experts: int
    top_k: int
    hidden: int
    intermediate: int


LAYERS = {
    "qwen3": Layer("Qwen3-30B-A3B", 128, 8, 2048, 768),
    "mixtral": Layer("Mixtral-8x7B", 8, 2, 4096, 14336),
    "mixtral-4.7b": Layer("Mixtral-4.7B", 8, 2, 2048, 5632),  # tools/make_checkpoint.py's mixtral-4.7b
    "deepseek": Layer("DeepSeek-V3", 256, 8, 7168, 2048),
}


def read_bandwidth(buf: torch.Tensor, reads: int = 3) -> float:
    """GB/s of a torch sum over `buf` with torch's current thread count (best of `reads`)."""
    best = float("inf")
    for _ in range(reads):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return buf.numel() * buf.element_size() / best / 1e9


def torch_loop(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, gate, up, down) -> torch.Tensor:
    """The baseline: plain torch, one expert at a time, in the weights' dtype."""
    x = x.to(gate.dtype)
    y = torch.zeros_like(x)
    for e in ids.unique().tolist():
        tok, k = (ids == e).nonzero(as_tuple=True)
        h = torch.nn.functional.silu(x[tok] @ gate[e].T) * (x[tok] @ up[e].T)
        y.index_add_(0, tok, (h @ down[e].T) * w[tok, k, None].to(x.dtype))
    return y


class KtKernel:
    """kt-kernel's CPU MoE operator (KTransformers' kernels, `pip install --no-deps kt-kernel`) through its low-level
    `kt_kernel_ext` (its KTMoEWrapper needs CUDA): the llamafile `moe.MOE` KTransformers runs on CPUs without AMX,
    on GGUF blocks (Q8_0 / Q4_0 / BF16, as llama.cpp; quantized here by the gguf package). Its workers busy-spin
    ~50 ms after each job, so the probes around its calls wait that out."""

    GGML_TYPES = {"bf16": "BF16", "int8": "Q8_0", "int4": "Q4_0", "int4s": "Q4_0"}
    SETTLE_S = 0.06
    _pool = None

    def __init__(self, src: ExpertWeights, fmt: str, top_k: int, n_threads: int, max_tokens: int) -> None:
        import gguf
        from kt_kernel import kt_kernel_ext as kt

        if KtKernel._pool is None:
            KtKernel._pool = kt.CPUInfer(n_threads)
        qtype = gguf.GGMLQuantizationType[self.GGML_TYPES[fmt]]

        def encode(m: torch.Tensor) -> np.ndarray:  # [E, O, K] -> GGUF blocks, one expert at a time
            if fmt == "bf16":
                return m.contiguous().view(torch.int16).numpy()
            return np.stack([gguf.quants.quantize(e.float().numpy(), qtype) for e in m])

        self.blocks = [encode(m) for m in (src.gate, src.up, src.down)]  # kt keeps raw pointers
        self.nbytes = sum(b.nbytes for b in self.blocks)
        E, I, H = src.gate.shape
        self.gpu_mask = torch.zeros(E, dtype=torch.bool)  # no expert on a GPU
        config = kt.moe.MOEConfig(E, top_k, H, I, self.gpu_mask.data_ptr())
        config.pool, config.layer_idx = KtKernel._pool.backend_, 0
        config.max_len = config.group_max_len = max_tokens
        config.m_block, config.group_min_len = 32, 10  # KTransformers' own settings (it hangs without them)
        config.gate_proj, config.up_proj, config.down_proj = (b.ctypes.data for b in self.blocks)
        config.gate_type = config.up_type = config.down_type = int(qtype)
        config.hidden_type = int(gguf.GGMLQuantizationType.BF16)
        self.op = kt.moe.MOE(config)
        identity = torch.arange(E, dtype=torch.int64)
        KtKernel._pool.submit(self.op.load_weights_task(identity.data_ptr()))
        KtKernel._pool.sync()
        self.out = torch.empty(max_tokens, H, dtype=torch.bfloat16)

    @staticmethod
    def available() -> bool:
        try:
            import gguf  # noqa: F401
            import kt_kernel  # noqa: F401
        except Exception:  # absent, or no build for this CPU
            return False
        return True

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x, ids, w = x.to(torch.bfloat16).contiguous(), ids.to(torch.int64).contiguous(), w.float().contiguous()
        T, K = ids.shape
        tokens = torch.tensor([T], dtype=torch.int32)
        KtKernel._pool.submit(self.op.forward_task(tokens.data_ptr(), K, ids.data_ptr(), w.data_ptr(), x.data_ptr(),
                                                   self.out.data_ptr(), False))
        KtKernel._pool.sync()
        return self.out[:T]


@dataclass
class Result:
    engine: str
    seconds: float
    gbps: float
    bw_share: float
    gflops: float


class Bench:
    def __init__(self, decode_calls: int, prefill_calls: int, max_gb: float) -> None:
        self.decode_calls, self.prefill_calls, self.max_gb = decode_calls, prefill_calls, max_gb
        self.kt_threads = 0  # kt-kernel's worker threads; 0: not run
        evict = cold_caches.eviction_bytes() // 4
        self.buf = torch.ones(max(1 << 28, evict))  # 1 GiB of float32 (or the eviction's): the headline bandwidth
        self.probe = self.buf[:evict]  # twice the last-level cache: the per-call probe, which also evicts
        self.rows: list[str] = []

    def measure(self, name: str, fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object], layer: Layer,
                experts: int, tokens: int, bytes_per_expert: float, settle_s: float = 0.0) -> Result:
        """Medians over calls; each call is paired with the mean of two read-bandwidth probes, one right before it
        and one right after (the host's load drifts between calls)."""
        gen = torch.Generator().manual_seed(tokens)
        x = torch.randn(tokens, layer.hidden, generator=gen).to(torch.bfloat16)  # a bf16 model's hidden states

        def routing(avoid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            """Uniform top-k per token, from the experts not in `avoid`."""
            pool = torch.arange(experts)
            if avoid is not None:
                pool = pool[~torch.isin(pool, avoid)]
            k = min(layer.top_k, pool.numel())
            ids = torch.stack([pool[torch.randperm(pool.numel(), generator=gen)[:k]] for _ in range(tokens)])
            return ids, torch.rand(tokens, k, generator=gen)

        fn(x, *routing())  # first call: page in, JIT, oneDNN primitive cache
        decode = tokens < 64
        times, shares, touched = [], [], []
        for _ in range(self.decode_calls if decode else self.prefill_calls):
            time.sleep(settle_s)
            before = read_bandwidth(self.probe, reads=1)
            ids, w = routing()
            if decode:
                # The previous layer's call, on other experts: the probe streamed twice the L3 through it, and
                # in a decode step a layer call follows another layer's, not a cold start of the Python path.
                previous_ids, previous_w = routing(avoid=ids)
                if previous_ids.numel():
                    fn(x, previous_ids, previous_w)
            start = time.perf_counter()
            fn(x, ids, w)
            times.append(time.perf_counter() - start)
            time.sleep(settle_s)
            bw = (before + read_bandwidth(self.probe, reads=1)) / 2  # one read on each side, as the call is one
            touched.append(len(ids.unique()) * bytes_per_expert)
            shares.append(touched[-1] / times[-1] / 1e9 / bw)
        t = statistics.median(times)
        flops = 2 * 3 * layer.hidden * layer.intermediate * tokens * layer.top_k
        return Result(name, t, statistics.median(touched) / t / 1e9, statistics.median(shares), flops / t / 1e9)


def random_layer(layer: Layer, experts: int) -> ExpertWeights:
    gen = torch.Generator().manual_seed(0)
    E, H, I = experts, layer.hidden, layer.intermediate

    def mat(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) / shape[-1] ** 0.5).to(torch.bfloat16)

    return ExpertWeights(mat(E, I, H), mat(E, I, H), mat(E, H, I))


def bench_layer(bench: Bench, layer: Layer, formats: list[str], token_counts: list[int]) -> None:
    weights_per_expert = 3 * layer.hidden * layer.intermediate
    # bf16 source + the fp32 baseline copy (6 bytes per weight) must fit the budget
    experts = min(layer.experts, max(layer.top_k, int(bench.max_gb * 1e9 // (6 * weights_per_expert))))
    print(f"\n## {layer.name}: E={layer.experts}, top-{layer.top_k}, H={layer.hidden}, I={layer.intermediate}")
    if experts < layer.experts:
        print(f"(holding {experts} of {layer.experts} experts to stay under {bench.max_gb:g} GB: decode touches "
              f"top-{layer.top_k} experts as in the model; at T=512 each expert gets "
              f"{512 * layer.top_k // experts} rows instead of {512 * layer.top_k // layer.experts})")
    src = random_layer(layer, experts)
    results: dict[int, list[Result]] = {T: [] for T in token_counts}
    for fmt in formats:
        cpu = CpuExperts(src, fmt)
        per_expert = cpu.nbytes / experts
        packed = (cpu.gate, cpu.up, cpu.down)
        for T in token_counts:
            # the engine CpuExperts picks first, then the other one for comparison
            fused_tag, torch_tag = f"offload {fmt} fused Numba", f"offload {fmt} via torch bf16"
            picks_torch = dispatch.moe_uses_torch(cpu.gate, T * layer.top_k, torch.bfloat16)  # as Bench's x
            results[T].append(bench.measure(f"{torch_tag if picks_torch else fused_tag} *", cpu, layer, experts, T,
                                            per_expert))
            other = (lambda x, i, w, packed=packed: dispatch.moe_fused(x, i, w, *packed)) if picks_torch else \
                (lambda x, i, w, packed=packed: moe_torch(x, i, w, *packed))
            results[T].append(bench.measure(fused_tag if picks_torch else torch_tag, other, layer, experts, T,
                                            per_expert))
        del cpu, packed
    for fmt in formats if bench.kt_threads else []:
        kt = KtKernel(src, fmt, layer.top_k, bench.kt_threads, max(token_counts))
        for T in token_counts:
            name = f"kt-kernel {KtKernel.GGML_TYPES[fmt]} ({bench.kt_threads} thr)"
            results[T].append(bench.measure(name, kt, layer, experts, T, kt.nbytes / experts, KtKernel.SETTLE_S))
        del kt
    for dtype in (torch.bfloat16, torch.float32):
        mats = [m.to(dtype) for m in (src.gate, src.up, src.down)]
        per_expert = weights_per_expert * mats[0].element_size()
        name = f"torch {str(dtype).removeprefix('torch.')} loop"
        loop = lambda x, i, w, mats=mats: torch_loop(x, i, w, *mats)  # noqa: E731
        for T in token_counts:
            results[T].append(bench.measure(name, loop, layer, experts, T, per_expert))
        del mats
    for T in token_counts:
        base = next(r.seconds for r in results[T] if r.engine == "torch bfloat16 loop")
        for r in results[T]:
            bench.rows.append(f"| {layer.name} | {T} | {r.engine} | {r.seconds * 1e3:.2f} | {r.gbps:.1f} | "
                              f"{100 * r.bw_share:.0f}% | {r.gflops:.0f} | {base / r.seconds:.2f}x |")
            print(bench.rows[-1], flush=True)


def describe_machine(n_threads: int) -> None:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"machine: {cpu}, {psutil.cpu_count(logical=False)} cores / {psutil.cpu_count()} threads, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM; kernel ISA tier {simd.TIER}")
    print(f"torch {torch.__version__} (bf16 matmul {'native' if dispatch.torch_has_native_bf16() else 'software'}), "
          f"numba {sys.modules['numba'].__version__} ({threads.threading_layer()} layer), {n_threads} threads; "
          f"engine crossovers: {crossover.mode()} ({crossover.MODE_VARIABLE}), printed after the table")
    print(cold_caches.describe())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="qwen3,mixtral,deepseek", help=f"comma list of {', '.join(LAYERS)}")
    parser.add_argument("--formats", default="bf16,int8,int4,int4s")
    parser.add_argument("--tokens", default="1,512", help="token counts per layer call")
    parser.add_argument("--threads", type=int, default=None, help="default: physical cores")
    parser.add_argument("--max-gb", type=float, default=10.0, help="RAM budget for one layer's copies")
    parser.add_argument("--quick", action="store_true", help="fewer calls per engine (noisier)")
    parser.add_argument("--torch-bf16-software", action="store_true",
                        help="switch oneDNN off: torch's bf16 matmul then converts in software, as on a CPU without "
                             "AVX512-BF16 (with NUMBA_CPU_NAME/NUMBA_CPU_FEATURES for an AVX2 target: an AVX2 host)")
    parser.add_argument("--kt-threads", type=int, default=1,
                        help="kt-kernel worker threads when it is installed (0: skip it). Default 1: with 2 its "
                             "spinning workers and the waiting caller share 2 cores (a Qwen3 T=1 layer: 16 ms, not 7)")
    args = parser.parse_args()

    n_threads = threads.set_threads(args.threads)
    if args.torch_bf16_software:
        torch.backends.mkldnn.enabled = False
        dispatch.TORCH_MIN_ROWS = dispatch.torch_min_rows(dispatch.torch_has_native_bf16())
    describe_machine(n_threads)
    formats = args.formats.split(",")
    jit = sum(warmup(fmt) for fmt in formats)
    print(f"JIT warmup (compile or load cache): {jit:.1f} s")
    bench = Bench(decode_calls=15 if args.quick else 60, prefill_calls=3 if args.quick else 7, max_gb=args.max_gb)
    installed = KtKernel.available()
    bench.kt_threads = args.kt_threads if installed else 0
    print(f"kt-kernel: {bench.kt_threads} worker threads" if bench.kt_threads else
          f"kt-kernel: not run ({'--kt-threads 0' if installed else 'not installed'})")
    torch.set_num_threads(1)
    one = statistics.median(read_bandwidth(bench.buf) for _ in range(5))
    torch.set_num_threads(n_threads)
    every = statistics.median(read_bandwidth(bench.buf) for _ in range(5))
    print(f"read bandwidth (torch sum over 1 GiB, median of 5): {every:.1f} GB/s with {n_threads} threads, "
          f"{one:.1f} GB/s with one")
    print("\n| layer | T | engine | ms/layer | GB/s | % of BW | GFLOP/s | vs torch bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.layers.split(","):
        bench_layer(bench, LAYERS[name], formats, [int(t) for t in args.tokens.split(",")])
    print("\n* = the engine CpuExperts picks. GB/s: expert weight bytes touched (each used expert's three "
          "matrices, scales included) per second; % of BW: median over calls of that over the mean of two "
          f"read-bandwidth probes (a torch sum over {cold_caches.eviction_bytes() >> 20} MiB each, twice the "
          "last-level cache) just before and just after the call.")
    print("\n| layer | T | engine | ms/layer | GB/s | % of BW | GFLOP/s | vs torch bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(bench.rows))
    print(f"\n{dispatch.describe_crossovers()}")


if __name__ == "__main__":
    main()

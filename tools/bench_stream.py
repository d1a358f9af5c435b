"""Prefill with whole-layer expert streaming against prefill with the CPU workers, on the same plan.

    python tools/bench_stream.py                      # CPU: the device tier is simulated (torch on the CPU)
    python tools/bench_stream.py --device cuda        # a real GPU tier: packed uploads on the side stream

The synthetic Qwen3-style checkpoint of tools/bench_hybrid.py, two cache slots per layer, nothing pinned, experts
in --experts format on the host. Each round prefills a --prompt-token prompt in --chunk-token chunks once with
streaming forced on (every chunk streams its layers' used experts through the double buffer) and once forced off
(the CPU workers run them), interleaved. Prints per mode: bytes copied host -> device per chunk and per streamed
expert (packed, against the device dtype's size), non-view aten ops per chunk on the main thread, and prefill wall
and CPU seconds, with same-run ratios. On the simulated tier the "device" is the same CPU, so the times say what
streaming costs here, not what it gains on a GPU. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import offload
from bench_hybrid import cache_only_plan, checkpoint
from offload.experts.builder import ExpertsBuilder


class OpCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def prefill(model, prompt: torch.Tensor) -> dict:
    builder = model._experts
    builder.settle()
    before = builder.ring.bytes_copied
    counter = OpCount()
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode(), counter:
        model.transformer(prompt, 0, last_only=True)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
            "bytes": builder.ring.bytes_copied - before, "ops": counter.ops,
            "streamed": sum(h.stats.streamed_misses for h in builder.hybrids.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--experts", default="int8", choices=["bf16", "int8", "int4"])
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    folder = checkpoint(0)
    plan = cache_only_plan(folder, 2, args.prompt + 8, dtype, args.experts)
    models = {}
    for mode, threshold in (("stream", 2), ("cpu", None)):
        ExpertsBuilder.stream_threshold = property(lambda self, t=threshold: t)
        models[mode] = offload.load(folder, device=args.device, dtype=str(dtype).removeprefix("torch."),
                                    max_context=args.prompt + 8, plan=plan, prefill_chunk=args.chunk)
    prompt = torch.randint(2, 8000, (args.prompt,), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(models["stream"].device)
    results = {mode: [] for mode in models}
    for _ in range(args.rounds + 1):  # the first round warms up
        for mode, model in models.items():
            for hybrid in model._experts.hybrids.values():
                hybrid.stats.streamed_misses = 0
            results[mode].append(prefill(model, prompt))
    chunks = -(-args.prompt // args.chunk)
    hybrid = next(iter(models["stream"]._experts.hybrids.values()))
    print(f"{args.device}, {args.experts} host experts, {args.prompt}-token prompt in {chunks} chunks of "
          f"{args.chunk}; one expert: {hybrid.sizes.host_bytes / 1e6:.3f} MB packed, "
          f"{hybrid.sizes.device_bytes / 1e6:.3f} MB in the device dtype")
    best = {mode: {k: min(r[k] for r in rs[1:]) for k in ("wall", "cpu")} for mode, rs in results.items()}
    for mode, rs in results.items():
        r = rs[-1]
        per_expert = r["bytes"] / r["streamed"] if r["streamed"] else 0
        print(f"{mode:6s}  bytes/chunk {r['bytes'] / chunks / 1e6:8.3f} MB  streamed experts {r['streamed']:4d}  "
              f"bytes/streamed expert {per_expert / 1e6:.3f} MB  ops/chunk {r['ops'] / chunks:7.0f}  "
              f"wall {best[mode]['wall']:.3f} s  cpu {best[mode]['cpu']:.3f} s")
    print(f"stream / cpu: wall {best['stream']['wall'] / best['cpu']['wall']:.2f}x, "
          f"cpu time {best['stream']['cpu'] / best['cpu']['cpu']:.2f}x")


if __name__ == "__main__":
    main()

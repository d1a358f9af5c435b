"""Prefill with whole-layer expert streaming against prefill with the CPU workers, on the same plan.

    python tools/bench_stream.py                      # CPU: the device tier is simulated (torch on the CPU)
    python tools/bench_stream.py --device cuda        # a real GPU tier: packed uploads on the side stream
    python tools/bench_stream.py --experts int4 --rows int4   # slots and stream buffer as int4 rows

The synthetic Qwen3-style checkpoint of tools/bench_hybrid.py, --slots cache slots per layer (default 2; 0: every
expert on the host), nothing pinned, experts in --experts format on the host, the slots' and the stream buffer's
rows in --rows format (default: the device dtype). Each round prefills a
--prompt-token prompt in --chunk-token chunks with streaming forced on, blind (every chunk of at least
every_expert_tokens streams every non-resident expert without reading its ids back, whatever coverage the layer
measured) and with the ids read back (only the used experts stream), and forced off (the CPU workers run them),
interleaved. Prints per mode: bytes copied host -> device per chunk and per streamed (used) expert (packed,
against the row's size), host reads of tensor values inside the forward (Tensor.tolist / item), non-view
aten ops per chunk on the main thread, and prefill wall and CPU seconds, with same-run ratios. On the simulated
tier the "device" is the same CPU, so the times say what streaming costs here, not what it gains on a GPU. A
benchmark, not a test.
"""
from __future__ import annotations

import argparse
import time
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import offload
from bench_hybrid import cache_only_plan, checkpoint
from offload.experts import stream as stream_module
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
    reads = [0]
    tolist, item = torch.Tensor.tolist, torch.Tensor.item

    def counted(read):
        def wrapper(self, *args, **kwargs):
            reads[0] += 1
            return read(self, *args, **kwargs)
        return wrapper

    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode(), counter, mock.patch.object(torch.Tensor, "tolist", counted(tolist)), \
            mock.patch.object(torch.Tensor, "item", counted(item)):
        model.transformer(prompt, 0, last_only=True)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    builder.settle()  # a blind chunk's ids are counted at the step boundary
    return {**seconds, "bytes": builder.ring.bytes_copied - before, "ops": counter.ops, "reads": reads[0],
            "streamed": sum(h.stats.streamed_misses for h in builder.hybrids.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--experts", default="int8", choices=["bf16", "int8", "int4"])
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slots", type=int, default=2, help="cache slots per MoE layer (0: none)")
    parser.add_argument("--rows", default=None, choices=["int8", "int4", "int4s"],
                        help="format of the slots' and the stream buffer's rows (default: the device dtype)")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    folder = checkpoint(0)
    plan = cache_only_plan(folder, args.slots, args.prompt + 8, dtype, args.experts, args.rows)
    models = {}
    for mode, threshold in (("blind", 2), ("readback", 2), ("cpu", None)):
        ExpertsBuilder.stream_threshold = property(lambda self, t=threshold: t)
        models[mode] = offload.load(folder, device=args.device, dtype=str(dtype).removeprefix("torch."),
                                    max_context=args.prompt + 8, plan=plan, prefill_chunk=args.chunk)
    for hybrid in models["readback"]._experts.hybrids.values():
        hybrid.streaming.blind_tokens = None
    # Blind whatever the measured coverage (the synthetic router is skewed, so the measured rule would read back).
    stream_module.BLIND_MIN_COVERAGE = 0.0
    for hybrid in models["blind"]._experts.hybrids.values():
        hybrid.stream_coverage = 1.0
    blind_from = next(iter(models["blind"]._experts.hybrids.values())).streaming.blind_tokens
    prompt = torch.randint(2, 8000, (args.prompt,), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(models["blind"].device)
    results = {mode: [] for mode in models}
    for _ in range(args.rounds + 1):  # the first round warms up
        for mode, model in models.items():
            for hybrid in model._experts.hybrids.values():
                hybrid.stats.streamed_misses = 0
            results[mode].append(prefill(model, prompt))
    chunks = -(-args.prompt // args.chunk)
    hybrid = next(iter(models["blind"]._experts.hybrids.values()))
    print(f"{args.device}, {args.experts} host experts, {args.slots} slots per layer, {args.prompt}-token prompt in "
          f"{chunks} chunks of {args.chunk} (blind from {blind_from} tokens); one expert: "
          f"{hybrid.sizes.host_bytes / 1e6:.3f} MB packed, {hybrid.sizes.device_bytes / 1e6:.3f} MB as a "
          f"{args.rows or 'device dtype'} row")
    best = {mode: {k: min(r[k] for r in rs[1:]) for k in ("wall", "cpu")} for mode, rs in results.items()}
    for mode, rs in results.items():
        r = rs[-1]
        per_expert = r["bytes"] / r["streamed"] if r["streamed"] else 0
        print(f"{mode:8s}  bytes/chunk {r['bytes'] / chunks / 1e6:8.3f} MB  used streamed experts "
              f"{r['streamed']:4d}  bytes/used streamed expert {per_expert / 1e6:.3f} MB  host reads/chunk "
              f"{r['reads'] / chunks:5.1f}  ops/chunk {r['ops'] / chunks:7.0f}  wall {best[mode]['wall']:.3f} s  "
              f"cpu {best[mode]['cpu']:.3f} s")
    for mode in ("blind", "readback"):
        print(f"{mode} / cpu: wall {best[mode]['wall'] / best['cpu']['wall']:.2f}x, "
              f"cpu time {best[mode]['cpu'] / best['cpu']['cpu']:.2f}x")


if __name__ == "__main__":
    main()

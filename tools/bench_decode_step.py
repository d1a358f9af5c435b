"""Decode time per token with the compiled decode step and with the torch path, interleaved in one run, and how much
of each is spent outside the weight-reading kernels.

    python tools/bench_decode_step.py /tmp/q3-int8                 # a store or HF folder, CPU only
    python tools/bench_decode_step.py CKPT --experts int4 --dense int4 --prompt 256 --tokens 16 --rounds 3

Per round, both paths decode --tokens single-token steps after a --prompt-token prefill (the same positions, so
the same cache lengths), in alternating order (offload.model.compiled_step.set_enabled switches them). Then the
weight-reading kernels of one step are replayed alone (each layer's fused q/k/v and o_proj linears, its routed
experts for top-k distinct ids, shared expert or dense MLP, and the LM head), and:

    outside the kernels per layer = (step time - kernel time) / layers
    share of the floor            = (bytes a step must read / read bandwidth) / step time

where the bytes are the packed weights a token touches (top-k experts per layer, attention, shared experts, the
router, the LM head) plus the K/V cache it attends over. Medians over the steps of a round; every round printed.
A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import offload  # noqa: E402
from bench_kernels import describe_machine, read_bandwidth  # noqa: E402
from offload.model import compiled_step  # noqa: E402
from offload.model.layers import FusedLinear, QuantLinear  # noqa: E402
from offload.model.moe import MoE  # noqa: E402


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def step_times(model, prompt_len: int, tokens: int, compiled: bool, clock) -> list[float]:
    """Seconds of each of `tokens` single-token forward passes at positions prompt_len.."""
    compiled_step.set_enabled(compiled)
    times = []
    with torch.inference_mode():
        for i in range(tokens):
            token = torch.tensor([(7 * i + 3) % model.transformer.cfg.vocab_size])
            start = clock()
            model.transformer(token, prompt_len + i, last_only=True)
            times.append(clock() - start)
    return times


def _linears(layer) -> list:
    """The packed dense matrices a decode step reads in `layer` (attention, shared expert or dense MLP)."""
    return [m for part in (layer.attn, layer.mlp) for m in part.modules() if isinstance(m, FusedLinear | QuantLinear)]


def kernel_seconds(model, repeats: int, clock) -> float:
    """One decode step's weight-reading kernels replayed alone: medians per kernel, summed."""
    from csrc_py import dispatch

    gen = torch.Generator().manual_seed(0)
    total = 0.0

    def median_time(fn) -> float:
        fn()
        samples = []
        for _ in range(repeats):
            start = clock()
            fn()
            samples.append(clock() - start)
        return statistics.median(samples)

    for layer in model.transformer.layers:
        for m in _linears(layer):
            x = torch.randn(1, m.packed.shape[2], generator=gen)
            total += median_time(lambda m=m, x=x: dispatch.linear(x, m.packed))
        if isinstance(layer.mlp, MoE):
            e, cfg = layer.mlp.experts, layer.mlp.router_cfg
            x = torch.randn(1, e.gate.shape[2], generator=gen)
            ids = torch.randperm(cfg.num_experts, generator=gen)[: cfg.top_k][None]
            w = torch.rand(1, cfg.top_k, generator=gen)
            total += median_time(lambda e=e, x=x, ids=ids, w=w: dispatch.moe_fused(x, ids, w, e.gate, e.up, e.down))
    head = model.transformer.lm_head
    if isinstance(head, QuantLinear):
        x = torch.randn(1, head.packed.shape[2], generator=gen)
        total += median_time(lambda: dispatch.linear(x, head.packed))
    return total


def step_bytes(model, context: int) -> int:
    """Bytes a decode step must read: packed weights it touches plus the K/V it attends over."""
    total = 0
    t = model.transformer
    for layer, cache in zip(t.layers, t.caches):
        total += sum(m.packed.nbytes for m in _linears(layer))
        if isinstance(layer.mlp, MoE):
            e, cfg = layer.mlp.experts, layer.mlp.router_cfg
            total += e.nbytes * cfg.top_k // cfg.num_experts + layer.mlp.router.nbytes
        total += cache.nbytes * context // t.max_context
    head = t.lm_head
    return total + (head.packed.nbytes if isinstance(head, QuantLinear) else head.weight.nbytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--experts", default=None, help="expert format (default: the store's)")
    parser.add_argument("--dense", default=None, help="dense format (default: the store's)")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or the calling thread's CPU time (with --threads 1: the work itself, "
                             "without the waits of a host other programs share)")
    args = parser.parse_args()

    kwargs = {k: v for k, v in (("experts", args.experts), ("dense", args.dense)) if v is not None}
    model = offload.load(args.checkpoint, device="cpu", cpu_threads=args.threads,
                         max_context=args.prompt + args.tokens + 1, **kwargs)
    describe_machine(model.load_info.cpu_threads)
    L = len(model.transformer.layers)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.transformer.cfg.vocab_size, (args.prompt,), generator=gen)
    with torch.inference_mode():
        model.transformer(prompt, 0, last_only=True)
    clock = CLOCKS[args.clock]
    for compiled in (True, False):  # compile / first-call costs out of the rounds
        step_times(model, args.prompt, 2, compiled, clock)
    kernels = kernel_seconds(model, 5, clock)
    buf = torch.ones(1 << 28)
    bandwidth = statistics.median(read_bandwidth(buf) for _ in range(5)) * 1e9
    floor = step_bytes(model, args.prompt + args.tokens // 2) / bandwidth
    print(f"{args.checkpoint.name}: {L} layers, experts {model.load_info.expert_format}, dense "
          f"{model.load_info.dense_format}; prompt {args.prompt}, {args.tokens} steps per round; {args.clock} clock")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; bandwidth floor {floor * 1e3:.2f} ms/token; kernels replayed "
          f"alone {kernels * 1e3:.2f} ms/token")
    results: dict[str, list[float]] = {"compiled": [], "torch": []}
    for r in range(args.rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        for compiled in order:
            ms = statistics.median(step_times(model, args.prompt, args.tokens, compiled, clock)) * 1e3
            results["compiled" if compiled else "torch"].append(ms)
    for name, values in results.items():
        ms = statistics.median(values)
        outside = (ms / 1e3 - kernels) / L * 1e6
        print(f"{name:9s} {ms:7.2f} ms/token (rounds: {', '.join(f'{v:.2f}' for v in values)}); outside the kernels "
              f"{outside:6.0f} us/layer; {floor * 1e3 / ms:.0%} of the bandwidth floor")
    print(f"torch / compiled: {statistics.median(results['torch']) / statistics.median(results['compiled']):.2f}x")
    compiled_step.set_enabled(True)


if __name__ == "__main__":
    main()

"""Decode time per token with the compiled decode step and with the torch path, interleaved in one run, and how much
of each is spent outside the weight-reading kernels.

    python tools/bench_decode_step.py /tmp/q3-int8                 # a store or HF folder, CPU only
    python tools/bench_decode_step.py CKPT --experts int4 --dense int4 --prompt 256 --tokens 16 --rounds 3

Per round, both paths decode --tokens single-token steps after a --prompt-token prefill (the same positions, so
the same cache lengths), in alternating order (offload.model.compiled_step.set_enabled switches them). Then the
weight-reading kernels of one step are replayed alone (each layer's fused q/k/v and o_proj linears, its routed
experts for top-k distinct ids, shared expert or dense MLP, and the LM head), and so is each layer's attention
over the cache (the compiled step's attend, GQA layers), and:

    outside the kernels per layer = (step time - weight kernels - attention over the cache) / layers
    share of the floor            = (bytes a step must read / read bandwidth) / step time

where the bytes are the packed weights a token touches (top-k experts per layer, attention, shared experts, the
router, the LM head) plus the K/V cache it attends over. Medians over the steps of a round; every round printed.
On a host whose other programs load the memory bus, a whole step's remainder is noise-bound; so at the end the
middle layer's two compiled blocks are timed against the kernels they call, each call with cold caches.
A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from typing import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import offload  # noqa: E402
from bench_kernels import describe_machine  # noqa: E402
from cold_caches import eviction_buffer  # noqa: E402
from offload.model import compiled_step  # noqa: E402
from offload.model.attention import Attention  # noqa: E402
from offload.model.gated_deltanet import GatedDeltaNet  # noqa: E402
from offload.model.kv_cache import RecurrentState  # noqa: E402
from offload.model.layers import FusedLinear, QuantLinear  # noqa: E402
from offload.model.moe import MoE  # noqa: E402


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def recurrent_states(model) -> list[tuple]:
    """A copy of every recurrent layer state (Gated DeltaNet), to put back with `rewind`: a state cannot move back
    to the positions the next run decodes again, as a KV cache can."""
    return [(c, c.conv.clone(), c.state.clone(), c.position) for c in model.transformer.caches
            if isinstance(c, RecurrentState)]


def rewind(saved: list[tuple]) -> None:
    for cache, conv, state, position in saved:
        cache.conv.copy_(conv)
        cache.state.copy_(state)
        cache.position = position


def step_times(model, prompt_len: int, tokens: int, compiled: bool, clock, after_prompt: list[tuple]
               ) -> list[float]:
    """Seconds of each of `tokens` single-token forward passes at positions prompt_len.. (recurrent states put back
    to `after_prompt` first)."""
    compiled_step.set_enabled(compiled)
    rewind(after_prompt)
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


def _kernels() -> tuple[dict, dict]:
    """The Numba kernels by format, called as the compiled step calls them (numpy in, no torch dispatch)."""
    from csrc_py.expert_ffn import moe_bf16, moe_q4, moe_q8
    from csrc_py.linear import linear_bf16, linear_q4, linear_q8

    return ({"bf16": linear_bf16, "int8": linear_q8, "int4": linear_q4, "int4s": linear_q4},  # int4s: m is None
            {"bf16": moe_bf16, "int8": moe_q8, "int4": moe_q4, "int4s": moe_q4})


def _expert_extras(experts) -> tuple:
    """The fused MoE kernels' bias and activation arguments for `experts` (CpuExperts)."""
    from csrc_py.expert_ffn import NO_BIAS
    from offload.experts.cpu import kernel_activation

    biases = tuple(b.numpy() for b in experts.biases.stacks()) if experts.biases is not None else (NO_BIAS,) * 3
    return (*biases, kernel_activation(experts.activation))


def kernel_seconds(model, repeats: int, clock, context: int) -> tuple[float, float]:
    """One decode step's weight-reading kernels, and its attention over `context` cached positions, replayed alone
    in step order with fresh expert ids each time (a repeated call would find its weights in the cache): medians
    over `repeats` steps of (weight kernels, attention) seconds. Gated DeltaNet layers' recurrence is not replayed:
    it counts as outside the kernels."""
    from csrc_py.decode_step import attend

    LINEAR, EXPERTS = _kernels()
    gen = torch.Generator().manual_seed(0)
    calls, attention = [], []
    for layer, cache in zip(model.transformer.layers, model.transformer.caches):
        a = layer.attn
        if isinstance(a, Attention):
            q = torch.randn(1, a.heads * a.head_dim, generator=gen).numpy()
            out = np.empty_like(q)
            k, v = cache.k.numpy(), cache.v.numpy()
            sinks = a.sinks.numpy() if a.sinks is not None else np.zeros(0, np.float32)
            attention.append(lambda a=a, q=q, k=k, v=v, sinks=sinks, out=out: attend(
                q, a.heads, a.kv_heads, a.head_dim, k, v, context, a.window or 0, a.chunk or 0, a.scale, sinks, out))
        for m in _linears(layer):
            x = torch.randn(1, m.packed.shape[2], generator=gen).numpy()
            calls.append(partial(LINEAR[m.packed.fmt], x, *m.packed.bits(), np.empty((1, m.packed.padded_shape[1]),
                                                                                       np.float32)))
        if isinstance(layer.mlp, MoE):
            e, cfg = layer.mlp.experts, layer.mlp.router_cfg
            x = torch.randn(1, e.gate.shape[2], generator=gen).numpy()
            w, y = torch.rand(1, cfg.top_k, generator=gen).numpy(), np.empty_like(x)
            bits = (*e.gate.bits(), *e.up.bits(), *e.down.bits(), *_expert_extras(e))

            def experts(e=e, cfg=cfg, x=x, w=w, y=y, bits=bits):
                ids = torch.randperm(cfg.num_experts, generator=gen)[: cfg.top_k][None].numpy()
                EXPERTS[e.fmt](x, ids, w, *bits, y)

            calls.append(experts)
    head = model.transformer.lm_head
    if isinstance(head, QuantLinear):
        x = torch.randn(1, head.packed.shape[2], generator=gen).numpy()
        calls.append(partial(LINEAR[head.packed.fmt], x, *head.packed.bits(),
                             np.empty((1, head.packed.padded_shape[1]), np.float32)))
    totals = []
    for _ in range(repeats + 1):  # the first pass compiles / warms up
        total = [0.0, 0.0]
        for kind, kind_calls in enumerate((calls, attention)):
            for call in kind_calls:
                start = clock()
                call()
                total[kind] += clock() - start
        totals.append(total)
    return tuple(statistics.median(t[kind] for t in totals[1:]) for kind in (0, 1))


def read_bandwidth(buf: torch.Tensor, clock) -> float:
    """Bytes per second of a torch sum over `buf` (best of 3) on `clock`."""
    best = float("inf")
    for _ in range(3):
        start = clock()
        buf.sum()
        best = min(best, clock() - start)
    return buf.numel() * buf.element_size() / best


def cold_timer(clock, repeats: int = 9) -> Callable[[Callable], float]:
    """A timer of one call with cold caches (twice the last-level cache read before it: tools/cold_caches.py): the
    median of `repeats`, in us."""
    evict = torch.from_numpy(eviction_buffer())

    def cold(fn) -> float:
        fn()
        samples = []
        for _ in range(repeats):
            evict.sum()
            start = clock()
            fn()
            samples.append(clock() - start)
        return statistics.median(samples) * 1e6

    return cold


def block_split(model, clock, context: int) -> None:
    """For the middle GQA + MoE layer (or the next one that is): each compiled block against the kernels it calls,
    each call with cold caches, printed as block, kernels and the difference (the glue)."""
    from csrc_py import decode_step as ds

    LINEAR, EXPERTS = _kernels()
    t = model.transformer
    L = len(t.layers)
    layers = list(t.layers)
    layer = next((layer for layer in layers[L // 2:] + layers[:L // 2] if isinstance(layer.attn, Attention)
                  and isinstance(layer.mlp, MoE) and layer.__dict__.get("_compiled_step") is not None), None)
    if layer is None:
        print("block split: no compiled GQA + MoE layer")
        return
    compiled = layer.__dict__["_compiled_step"]
    p = next(iter(compiled._prepared.values()))
    cold = cold_timer(clock)
    x = torch.randn(1, t.cfg.hidden_size).numpy()
    out = np.empty_like(x)
    a, attn = layer.attn, compiled.attn
    h, qkv_out, _, att, o_out = p.attn_tail[-5:]
    qkv, o = a.qkv.packed, a.o_proj.packed
    block = cold(lambda: ds.attention_block(x, out, *p.attn_head, context, *p.attn_tail))
    parts = [cold(lambda: LINEAR[qkv.fmt](h, *qkv.bits(), qkv_out)), cold(lambda: LINEAR[o.fmt](att, *o.bits(), o_out)),
             cold(lambda: ds.attend(np.ascontiguousarray(qkv_out[:, : a.heads * a.head_dim]), a.heads, a.kv_heads,
                                    a.head_dim, p.attn_tail[0], p.attn_tail[1], context, *attn.span, attn.scale,
                                    attn.sinks, att))]
    print(f"attention block {block:.0f} us: q/k/v {parts[0]:.0f} + o_proj {parts[1]:.0f} + attention {parts[2]:.0f}; "
          f"the rest {block - sum(parts):.0f} us")
    moe, m = layer.mlp, compiled.mlp
    hh, logits, ids, w, routed = p.mlp[-8:-3]
    e = moe.experts
    bits = (*e.gate.bits(), *e.up.bits(), *e.down.bits(), *_expert_extras(e))
    block = cold(lambda: ds.moe_block(out, *p.mlp))
    parts = [cold(lambda: EXPERTS[e.fmt](hh, ids, w, *bits, routed)),
             cold(lambda: ds.router_logits(hh, m.router, m.router_bias, logits))]
    print(f"MoE block {block:.0f} us: experts {parts[0]:.0f} + router logits {parts[1]:.0f}; the rest "
          f"{block - sum(parts):.0f} us")


def deltanet_split(model, clock) -> None:
    """For the first Gated DeltaNet layer: its compiled block against the two projections it calls and against the
    torch path's x + GatedDeltaNet(RMSNorm(x)), each call with cold caches (the state put back afterwards)."""
    LINEAR, _ = _kernels()
    t = model.transformer
    found = next(((layer, cache) for layer, cache in zip(t.layers, t.caches) if isinstance(layer.attn, GatedDeltaNet)
                  and layer.__dict__.get("_compiled_step") is not None), None)
    if found is None:
        return
    layer, cache = found
    compiled, net = layer.__dict__["_compiled_step"], layer.attn
    p = next(iter(compiled._prepared.values()))
    saved = [(cache, cache.conv.clone(), cache.state.clone(), cache.position)]
    cold = cold_timer(clock)
    x = torch.randn(1, t.cfg.hidden_size)
    out = np.empty((1, t.cfg.hidden_size), np.float32)
    h, proj_out, _, _, core, o_out = p.attn_head[-6:]
    in_proj, out_proj = net.in_proj.packed, net.out_proj.packed
    with torch.inference_mode():
        block = cold(lambda: compiled.attn.run(p, x.numpy(), out, cache.position))
        torch_path = cold(lambda: x + net(layer.input_norm(x), cache.position, cache))
    parts = [cold(lambda: LINEAR[in_proj.fmt](h, *in_proj.bits(), proj_out)),
             cold(lambda: LINEAR[out_proj.fmt](core, *out_proj.bits(), o_out))]
    rewind(saved)
    print(f"Gated DeltaNet block {block:.0f} us: in_proj {parts[0]:.0f} + out_proj {parts[1]:.0f}; the rest "
          f"(convolution, delta rule, norms) {block - sum(parts):.0f} us; the torch path's layer {torch_path:.0f} us")


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
    after_prompt = recurrent_states(model)
    clock = CLOCKS[args.clock]
    for compiled in (True, False):  # compile / first-call costs out of the rounds
        step_times(model, args.prompt, 2, compiled, clock, after_prompt)
    context = args.prompt + args.tokens // 2
    kernel_seconds(model, 1, clock, context)  # compile / first-call costs out of the rounds
    buf = torch.ones(1 << 28)
    bandwidth = statistics.median(read_bandwidth(buf, clock) for _ in range(5))
    floor = step_bytes(model, context) / bandwidth
    print(f"{args.checkpoint.name}: {L} layers, experts {model.load_info.expert_format}, dense "
          f"{model.load_info.dense_format}; prompt {args.prompt}, {args.tokens} steps per round; {args.clock} clock")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; bandwidth floor {floor * 1e3:.2f} ms/token")
    # Per round: the kernels replayed, then both paths in alternating order; "outside" is per round, so a round
    # the host slowed down slows its kernels and its steps alike.
    steps: dict[str, list[float]] = {"compiled": [], "torch": []}
    outside: dict[str, list[float]] = {"compiled": [], "torch": []}
    for r in range(args.rounds):
        kernels, attention = kernel_seconds(model, 3, clock, context)
        print(f"round {r + 1}: weight kernels replayed alone {kernels * 1e3:.2f} ms/token, attention over {context} "
              f"positions {attention * 1e3:.2f}", end="")
        for compiled in (True, False) if r % 2 == 0 else (False, True):
            name = "compiled" if compiled else "torch"
            seconds = statistics.median(step_times(model, args.prompt, args.tokens, compiled, clock, after_prompt))
            steps[name].append(seconds * 1e3)
            outside[name].append((seconds - kernels - attention) / L * 1e6)
            print(f"; {name} {seconds * 1e3:.2f} ms/token", end="")
        print()
    for name in steps:
        ms = statistics.median(steps[name])
        print(f"{name:9s} {ms:7.2f} ms/token; outside the kernels {statistics.median(outside[name]):6.0f} us/layer "
              f"(rounds: {', '.join(f'{v:.0f}' for v in outside[name])}); {floor * 1e3 / ms:.0%} of the bandwidth "
              f"floor")
    print(f"torch / compiled: {statistics.median(steps['torch']) / statistics.median(steps['compiled']):.2f}x")
    block_split(model, clock, context)
    deltanet_split(model, clock)
    compiled_step.set_enabled(True)


if __name__ == "__main__":
    main()

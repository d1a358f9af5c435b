"""Decode time per token against context length, split by layer kind, and peak RSS.

    python tools/bench_context.py /data/qwen3.5-4-int4 --contexts 1024 4096 16384 32768 --tokens 8 --rounds 3

For each context N the caches are set to stand at position N instead of being prefilled (attention layers' K/V
filled with random values up to N, Gated DeltaNet layers' recurrent states set to random values at position N),
so long contexts cost no prefill; the decode work per token is the same as after a real prefill of N tokens.
Contexts are interleaved round by round (machine noise hits them alike) and each figure is the median over rounds
(`--stat min`: the fastest round, the better estimate of the work itself on a loaded machine): ms per token in
total and in the attention layers' and the DeltaNet layers' token mixers ("rest": MoE, norms, LM head). An
attention layer's time grows with N; a DeltaNet layer's should not.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections import defaultdict

import torch

import offload
from offload.model.kv_cache import KVCache, LatentCache, RecurrentState


def stand_at(caches: list, position: int, generator: torch.Generator) -> None:
    """Every layer's cache as if `position` tokens had been processed (values random, not a real prefill)."""
    for cache in caches:
        if isinstance(cache, KVCache):
            for tensor in (cache.k, cache.v):
                tensor[:, :position].normal_(generator=generator)
        elif isinstance(cache, LatentCache):
            for tensor in (cache.c_kv, cache.k_rope):
                tensor[:position].normal_(generator=generator)
        elif isinstance(cache, RecurrentState):
            cache.state.normal_(generator=generator).mul_(0.1)
            cache.position = position


def timed_mixers(transformer) -> dict[str, float]:
    """Seconds spent in each kind of token mixer (GatedDeltaNet, Attention, MLA), accumulated by forward hooks."""
    seconds: dict[str, float] = defaultdict(float)
    for layer in transformer.layers:
        kind = type(layer.attn).__name__
        started: list[float] = []
        layer.attn.register_forward_pre_hook(lambda module, args, started=started: started.append(time.perf_counter()))

        def done(module, args, out, kind=kind, started=started):
            seconds[kind] += time.perf_counter() - started.pop()

        layer.attn.register_forward_hook(done)
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--tokens", type=int, default=8, help="decode steps per context and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch and the kernels; default all)")
    parser.add_argument("--stat", choices=("median", "min"), default="median", help="of each figure over rounds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    model = offload.load(args.folder, device="cpu", max_context=max(args.contexts) + args.tokens + 1,
                         cpu_threads=args.threads)
    transformer = model.transformer
    seconds = timed_mixers(transformer)
    generator = torch.Generator().manual_seed(0)
    token = torch.tensor([1])
    rounds: dict[int, list[dict[str, float]]] = defaultdict(list)
    with torch.inference_mode():
        transformer(token, 0)  # first-call costs out of the measurement
        for _ in range(args.rounds):
            for context in args.contexts:
                stand_at(transformer.caches, context, generator)
                seconds.clear()
                t0 = time.perf_counter()
                for i in range(args.tokens):
                    transformer(token, context + i, last_only=True)
                total = time.perf_counter() - t0
                rounds[context].append({"total": total, **seconds})
    stat = statistics.median if args.stat == "median" else min
    rows = []
    for context in args.contexts:
        figures = {k: stat(r[k] for r in rounds[context]) for k in rounds[context][0]}
        rows.append({"context": context, **{k: 1000 * v / args.tokens for k, v in figures.items()}})
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.json:
        print(json.dumps({"rows": rows, "peak_rss_bytes": peak_rss, "cache_bytes": transformer.cache_nbytes}))
        return
    kinds = sorted({k for row in rows for k in row} - {"context", "total"})
    print("| context | ms/token | " + " | ".join(f"{k} ms" for k in kinds) + " | rest ms |")
    print("|---" * (3 + len(kinds)) + "|")
    for row in rows:
        parts = [row.get(k, 0.0) for k in kinds]
        print(f"| {row['context']} | {row['total']:.1f} | " + " | ".join(f"{p:.1f}" for p in parts)
              + f" | {row['total'] - sum(parts):.1f} |")
    print(f"{args.stat} of {args.rounds} rounds x {args.tokens} tokens; peak RSS {peak_rss / 2**30:.2f} GiB; caches "
          f"at max_context {transformer.cache_nbytes / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()

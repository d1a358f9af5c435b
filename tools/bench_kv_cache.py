"""A float32 against a bf16 KV cache (load's kv_cache), each pair measured in one process so that the memory
system's swings between processes do not enter the ratio.

    python tools/bench_kv_cache.py --kernels                          # attend / latent_attend, cold and warm
    python tools/bench_kv_cache.py STORE --prompt-tokens 4096 --new-tokens 48 --rounds 6

--kernels: the compiled step's attention over the cache (csrc_py.decode_step.attend, the Qwen3-30B-A3B and
Mixtral 4.7B shapes; latent_attend, DeepSeek-V2-Lite's) at 640 and 4096 positions, two threads, the two caches
called in turn: cold (a 256 MB read before the call) and warm (the call again at once), medians.
STORE: the checkpoint loaded twice on the CPU (kv_cache float32 and bf16); a prompt, then generations alternating
between the two (the first order reversed every other round), each continuing the cached prompt, so each round
decodes new-tokens positions past it: decode ms a token, medians. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import numba  # noqa: E402  (after torch)

from cold_caches import wake_threads  # tools/, beside this file
from csrc_py import decode_step

GQA_SHAPES = {"qwen3": (32, 4, 128), "mixtral-4.7b": (32, 8, 64)}  # heads, KV heads, head dim
MLA_SHAPE = (16, 128, 64, 512, 128)  # DeepSeek-V2-Lite: heads, nope, rope, kv_lora_rank, v
EVICT = np.ones(64 << 20, np.float32)  # 256 MB read before a cold call
SCRATCH = np.zeros(64, np.float32)


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def cold_and_warm(calls: dict, rounds: int) -> dict:
    """{name: (cold us, warm us)}: the calls in turn, each cold (after EVICT is read) and then warm."""
    times = {name: ([], []) for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            EVICT.sum()
            wake_threads(SCRATCH)
            for kind in (0, 1):
                start = time.perf_counter()
                call()
                times[name][kind].append(time.perf_counter() - start)
    return {name: tuple(1e6 * statistics.median(t[2:]) for t in pair) for name, pair in times.items()}


def kernels(rounds: int) -> None:
    rng = np.random.default_rng(0)
    no_sinks = np.zeros(0, np.float32)
    print(f"# {numba.get_num_threads()} threads, medians of {rounds} calls; us")
    print("| kernel, shape | positions | float32 cold / warm | bf16 cold / warm |\n|---|---|---|---|")
    for positions in (640, 4096):
        for name, (heads, kv_heads, d) in GQA_SHAPES.items():
            k, v = torch.randn(kv_heads, positions, d), torch.randn(kv_heads, positions, d)
            q = rng.standard_normal((1, heads * d), dtype=np.float32)
            out = np.empty_like(q)
            caches = {"float32": (k.numpy(), v.numpy()), "bf16": (bf16_bits(k), bf16_bits(v))}
            calls = {kind: (lambda kc=kc, vc=vc: decode_step.attend(q, heads, kv_heads, d, kc, vc, positions - 1, 0,
                                                                       0, d**-0.5, no_sinks, out))
                     for kind, (kc, vc) in caches.items()}
            row(f"attend, {name}", positions, cold_and_warm(calls, rounds))
        heads, nope, rope, rank, v_dim = MLA_SHAPE
        c, r = torch.randn(positions, rank) * 0.3, torch.randn(positions, rope)
        w_kv = bf16_bits(torch.randn(heads, nope + v_dim, rank))
        q = rng.standard_normal((1, heads * (nope + rope)), dtype=np.float32)
        out = np.empty((1, heads * v_dim), np.float32)
        no_selection = np.zeros((1, 0), np.int64)
        caches = {"float32": (c.numpy(), r.numpy()), "bf16": (bf16_bits(c), bf16_bits(r))}
        calls = {kind: (lambda cc=cc, rc=rc: decode_step.latent_attend(q, heads, nope, w_kv, cc, rc, positions - 1,
                                                                         0.1, no_selection, 0, out))
                 for kind, (cc, rc) in caches.items()}
        row("latent_attend, deepseek-v2-lite", positions, cold_and_warm(calls, rounds))


def row(name: str, positions: int, times: dict) -> None:
    cells = " | ".join(f"{times[kind][0]:.1f} / {times[kind][1]:.1f}" for kind in ("float32", "bf16"))
    print(f"| {name} | {positions} | {cells} |", flush=True)


def end_to_end(store: Path, prompt_tokens: int, new_tokens: int, rounds: int, threads: int) -> None:
    import offload

    ids = torch.randint(100, 1000, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    models = {kind: offload.load(store, device="cpu", max_context=prompt_tokens + new_tokens + 64, kv_cache=kind,
                                 cpu_threads=threads, decode_threads=threads) for kind in ("float32", "bf16")}
    for model in models.values():  # the prompt, once: every round continues it
        model.generate(ids, max_new_tokens=2, ignore_eos=True)
    ms = {kind: [] for kind in models}
    for i in range(rounds):
        for kind, model in (models.items() if i % 2 == 0 else reversed(models.items())):
            stats = model.generate(ids, max_new_tokens=new_tokens, ignore_eos=True, reuse_cache=True).stats
            ms[kind].append(1e3 / stats.decode_tokens_per_s)
    for kind, values in ms.items():
        print(f"{store.name} {kind:8s} decode ms/token {' / '.join(f'{x:.2f}' for x in values)} "
              f"(median {statistics.median(values):.2f})")
    print(f"float32 / bf16: {statistics.median(ms['float32']) / statistics.median(ms['bf16']):.2f}x "
          f"({prompt_tokens} prompt positions, {new_tokens} new, {rounds} rounds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", type=Path, nargs="?", help="a checkpoint or store to run end to end")
    parser.add_argument("--kernels", action="store_true", help="time the attention kernels alone")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2, help="cpu_threads and decode_threads of both loads")
    args = parser.parse_args()
    if args.kernels:
        kernels(max(args.rounds, 25))
    if args.store is not None:
        end_to_end(args.store, args.prompt_tokens, args.new_tokens, args.rounds, args.threads)
    if not args.kernels and args.store is None:
        parser.error("give a STORE, --kernels, or both")


if __name__ == "__main__":
    main()

"""Load a (large) checkpoint or store on the CPU and report what a user feels: load time, time to first token,
decode tokens/s, and peak resident memory against the checkpoint's weight bytes.

    python tools/make_checkpoint.py qwen3-30b-a3b /data/qwen3-int4 --experts-format int4 --dense int8
    python tools/run_store.py /data/qwen3-int4 --prompt-tokens 128 --new-tokens 32

Peak RSS is the process's high-water mark (getrusage), which counts the store's memory-mapped pages the run
touched; weight bytes are the safetensors files' sizes. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import psutil
import torch

import offload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    weight_bytes = sum(p.stat().st_size for p in args.model.glob("*.safetensors"))
    start = time.perf_counter()
    model = offload.load(args.model, device="cpu", max_context=args.prompt_tokens + args.new_tokens + 8,
                         cpu_threads=args.threads)
    load_s = time.perf_counter() - start
    rss_loaded = psutil.Process().memory_info().rss
    info = model.load_info
    print(f"{args.model}: {model.config.model_type}, {model.config.num_hidden_layers} layers, "
          f"{model.config.router.num_experts} experts top-{model.config.router.top_k}; experts {info.expert_format}, "
          f"dense {info.dense_format or 'torch'}, store {info.store}, {info.cpu_threads} threads")
    print(f"weights {weight_bytes / 2**30:.2f} GiB; loaded in {load_s:.1f} s (JIT {info.jit_seconds:.1f} s); "
          f"RSS after load {rss_loaded / 2**30:.2f} GiB")

    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(args.seed))
    for label in ("cold (pages read from disk)", "warm"):
        g = model.generate(prompt.tolist(), max_new_tokens=args.new_tokens, ignore_eos=True, reuse_cache=False)
        s = g.stats
        print(f"{label}: time to first token {s.prefill_seconds:.2f} s for {args.prompt_tokens} prompt tokens "
              f"({s.prefill_tokens_per_s:.1f} tok/s), decode {s.decode_tokens_per_s:.2f} tok/s over "
              f"{s.generated_tokens} tokens")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"peak RSS {peak / 2**30:.2f} GiB = {peak / weight_bytes:.3f} x the weight bytes")


if __name__ == "__main__":
    main()

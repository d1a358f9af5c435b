"""Decode time per token against context length with DeepSeek Sparse Attention and without, in one run.

    python tools/bench_dsa.py --contexts 1024 4096 16384 32768 --rounds 5

The model has DeepSeek-V3.2's attention shape per layer (128 heads, q_lora_rank 1536, kv_lora_rank 512, qk head
dim 128 nope + 64 rope, v head dim 128, a 64 x 128 lightning indexer, index_topk 2048) in a small body (hidden
2048, 2 layers, 8 small experts) so that attention dominates a decode step. The same random weights load twice:
once with index_topk 2048 (sparse) and once with an index_topk above every context (each query attends to every
position: DeepSeek-V3's dense MLA, plus the indexer key writes). Each layer's cache is filled with random values
up to the context (a decode step's cost does not depend on what the cache holds, and prefilling 32K positions
would take minutes on a CPU), then one-token steps at that position are timed, the two models interleaved.

Timed as CPU time of the one compute thread (torch at 1 thread, time.thread_time): on a shared machine wall time
swings with the other processes while a thread's own CPU time stays near the work done. Prints, per context, the
least over rounds of the median CPU ms per token, for each model, and their ratio. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import offload
from offload.synthetic import write_synthetic_checkpoint

INDEX_TOPK = 2048
CONFIG = {
    "model_type": "deepseek_v32", "architectures": ["DeepseekV32ForCausalLM"], "vocab_size": 4096,
    "hidden_size": 2048, "intermediate_size": 2048, "moe_intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 8, "num_experts_per_tok": 2,
    "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 0, "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "index_topk": INDEX_TOPK, "index_head_dim": 128, "index_n_heads": 64, "routed_scaling_factor": 2.5,
    "max_position_embeddings": 65536, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "bos_token_id": 0,
    "eos_token_id": 1,
}


def fill_caches(model: offload.Model, context: int, seed: int = 0) -> None:
    """Random cache contents for positions 0..context-1 of every layer (latent, rope key, indexer key)."""
    generator = torch.Generator().manual_seed(seed)
    for cache in model.transformer.caches:
        for tensor in (cache.c_kv, cache.k_rope, getattr(cache, "index_k", None)):
            if tensor is not None:
                tensor[:context] = torch.randn(context, tensor.shape[1], generator=generator).to(tensor.dtype)


def step_ms(model: offload.Model, context: int, steps: int) -> float:
    """Median CPU ms of this thread per one-token step at position `context`."""
    transformer, ids = model.transformer, torch.tensor([7])
    times = []
    with torch.inference_mode():
        for _ in range(steps):
            start = time.thread_time()
            transformer(ids, context)
            times.append(time.thread_time() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per context")
    parser.add_argument("--steps", type=int, default=3, help="timed one-token steps per round")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    torch.set_num_threads(1)
    max_context = max(args.contexts) + 1
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for name, topk in (("sparse", INDEX_TOPK), ("dense", 1 << 30)):
            folders[name] = Path(tmp) / name
            write_synthetic_checkpoint(folders[name], {**CONFIG, "index_topk": topk},
                                       dtype=getattr(torch, args.dtype), seed=0)
        models = {name: offload.load(folder, device="cpu", max_context=max_context, dtype=args.dtype,
                                     cpu_threads=1) for name, folder in folders.items()}
        print(f"CPU ms per token, 1 thread, dtype {args.dtype}, index_topk {INDEX_TOPK}")
        print(f"{'context':>8} {'sparse':>10} {'dense':>10} {'dense/sparse':>13}")
        for context in args.contexts:
            for model in models.values():
                fill_caches(model, context)
            runs = {name: [] for name in models}
            for _ in range(args.rounds):
                for name, model in models.items():
                    runs[name].append(step_ms(model, context, args.steps))
            sparse, dense = (min(runs[name]) for name in ("sparse", "dense"))
            print(f"{context:>8} {sparse:>10.1f} {dense:>10.1f} {dense / sparse:>12.2f}x")


if __name__ == "__main__":
    main()

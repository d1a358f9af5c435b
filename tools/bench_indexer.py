"""The lightning indexer's time per layer at decode, compiled (csrc_py.indexer_step) against torch
(offload.model.indexer), interleaved in one run.

    python tools/bench_indexer.py --contexts 1024 4096 16384 --rounds 7

One indexer layer of DeepSeek-V3.2's shape is built in memory with random weights (hidden 7168, q_lora_rank 1536,
64 heads x 128, RoPE on 64 channels, index_topk 2048; wq_b and wk packed in --dense, weights_proj float32), its
key cache filled with random keys up to the context. Each round times --steps one-token calls at that position
on each path, the paths taking turns; prints, per context, the median over rounds of each round's median wall ms,
and their ratio. Both paths do the same work: the key projection, norm, RoPE and cache write, the query
projection, the head weights, the scores over every cached key and the top-k. Both use --threads threads
(torch's pool and Numba's). A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from offload.arch import config_from_hf
from offload.model.compiled_indexer import IndexerPlan
from offload.model.indexer import LightningIndexer
from offload.model.kv_cache import LatentIndexCache
from offload.model.rope import RotaryTable
from offload.weights.source import InventedSource

import csrc_py  # noqa: F401  (torch before numba)
from csrc_py import indexer_step, threads
from csrc_py.simd import isa_tier

CONFIG = {  # DeepSeek-V3.2-Exp's attention and indexer fields (tests/test_dsa.py holds the whole config.json)
    "model_type": "deepseek_v32", "architectures": ["DeepseekV32ForCausalLM"], "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 1,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "first_k_dense_replace": 0, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc",
    "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5, "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "index_topk": 2048,
    "index_head_dim": 128, "index_n_heads": 64, "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
    "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                          "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                          "type": "yarn"},
}


def build_indexer(dense: str, seed: int = 0) -> tuple[LightningIndexer, object]:
    """Layer 0's indexer with random weights (dense projections packed in `dense`), and the config."""
    cfg = config_from_hf(CONFIG)
    generator = torch.Generator().manual_seed(seed)
    src = InventedSource(lambda name, shape: torch.randn(shape, generator=generator) * shape[-1] ** -0.5)
    src.dense_format = dense
    return LightningIndexer(cfg, 0, src), cfg


def timed_ms(call, steps: int) -> float:
    """Median wall ms of `steps` calls."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per context")
    parser.add_argument("--steps", type=int, default=5, help="timed one-token calls per round and path")
    parser.add_argument("--dense", default="int8", choices=["int8", "int4"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    threads.set_threads(args.threads)
    ix, cfg = build_indexer(args.dense)
    plan = IndexerPlan.build(ix)
    P = max(args.contexts) + 1
    rope = RotaryTable(cfg.rope, cfg.mla.qk_rope_head_dim, P, torch.device("cpu"), torch.float32)
    cache = LatentIndexCache(P, cfg.mla.kv_lora_rank, cfg.mla.qk_rope_head_dim, ix.head_dim, torch.float32,
                             torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    h, q_latent = (torch.randn(1, n, generator=generator) for n in (cfg.hidden_size, cfg.mla.q_lora_rank))
    cos, sin = rope.cos.numpy(), rope.sin.numpy()
    args_1, index_k = plan.args(1, P), cache.index_k.numpy()
    selection = np.zeros((1, ix.topk), np.int64)
    print(f"lightning indexer, DeepSeek-V3.2 shape, {args.dense} projections, {args.threads} thread(s), "
          f"ISA path {isa_tier()}; ms per layer per token (median of {args.rounds} rounds x {args.steps} calls)")
    print(f"{'context':>8} {'torch':>9} {'compiled':>9} {'torch/compiled':>15}")
    for context in args.contexts:
        cache.index_k[:context] = torch.randn(context, ix.head_dim, generator=generator)

        def torch_step():
            with torch.inference_mode():
                ix(h, q_latent, context, cache, rope)

        def compiled_step():
            indexer_step.index_step(h.numpy(), q_latent.numpy(), context, cos, sin, args_1, index_k, selection)

        compiled_step(), torch_step()  # compile / warm up
        runs = {"torch": [], "compiled": []}
        for _ in range(args.rounds):
            runs["torch"].append(timed_ms(torch_step, args.steps))
            runs["compiled"].append(timed_ms(compiled_step, args.steps))
        t, c = (statistics.median(runs[name]) for name in ("torch", "compiled"))
        print(f"{context:>8} {t:>9.2f} {c:>9.2f} {t / c:>14.2f}x")


if __name__ == "__main__":
    main()

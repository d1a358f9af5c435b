"""Prefill and decode tokens/s of offload and of transformers on the same synthetic checkpoint, in one run.

    python tools/bench_generate.py --shape mixtral-small --device cpu --threads 2
    python tools/bench_generate.py --shape mixtral-small --device cuda --dtype bfloat16

Prints medians of interleaved rounds and the offload/transformers ratios. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import offload
from offload.demo import default_cache_dir
from offload.synthetic import write_synthetic_checkpoint

SHAPES = {
    # ../shared/notes/baselines.md: 0.64 B parameters, 0.19 B active per token.
    "mixtral-small": {
        "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": 32000, "hidden_size": 1024,
        "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4,
        "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,
    },
    "deepseek-tiny": {
        "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 32000,
        "hidden_size": 1024, "intermediate_size": 2816, "moe_intermediate_size": 512, "num_hidden_layers": 8,
        "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 32, "num_experts_per_tok": 4,
        "n_shared_experts": 1, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1, "q_lora_rank": 384,
        "kv_lora_rank": 256, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64,
        "routed_scaling_factor": 2.5, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "bos_token_id": 0, "eos_token_id": 1,
    },
}


def checkpoint(shape: str) -> Path:
    folder = default_cache_dir() / f"bench-{shape}"
    if not (folder / "config.json").exists():
        write_synthetic_checkpoint(folder, SHAPES[shape], dtype=torch.bfloat16, std=0.02, seed=0)
    return folder


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def offload_round(model, prompt: list[int], new_tokens: int, device: str) -> tuple[float, float]:
    prefill = model.generate(prompt, max_new_tokens=1, ignore_eos=True, reuse_cache=False).stats.prefill_tokens_per_s
    g = model.generate(prompt[:16], max_new_tokens=new_tokens + 1, ignore_eos=True)
    return prefill, g.stats.decode_tokens_per_s


def transformers_round(model, prompt: list[int], new_tokens: int, device: str) -> tuple[float, float]:
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        model(ids, logits_to_keep=1)  # like a generation's prefill: only the last position's logits
        sync(device)
        prefill = len(prompt) / (time.perf_counter() - t0)
        out = model(ids[:, :16], use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(device)
        decode = new_tokens / (time.perf_counter() - t0)
    return prefill, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mixtral-small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--experts", default=None, choices=["bf16", "int8", "int4"],
                        help="offload's routed experts on the CPU workers in this format (default: torch)")
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = checkpoint(args.shape)
    engines = {"offload": (offload.load(folder, device=args.device, dtype=args.dtype, experts=args.experts,
                                        max_context=args.prompt + 128), offload_round)}
    if not args.no_transformers:
        from transformers import AutoModelForCausalLM
        ref = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).to(args.device).eval()
        engines["transformers"] = (ref, transformers_round)
    prompt = torch.randint(3, 32000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    for name, (model, run) in engines.items():
        run(model, prompt[:32], 4, args.device)  # warm-up
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    for _ in range(args.rounds):  # interleaved, so both engines see the same machine noise
        for name, (model, run) in engines.items():
            results[name].append(run(model, prompt, args.new, args.device))

    gpu = f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""
    experts = f"offload experts {args.experts} on the CPU workers" if args.experts else "offload experts in torch"
    print(f"# {args.shape}, {args.dtype}, {experts}, device {args.device}{gpu}, threads {torch.get_num_threads()}, "
          f"prompt {args.prompt}, decode {args.new} tokens, median of {args.rounds} rounds")
    print("| engine | prefill tok/s | decode tok/s |\n|---|---|---|")
    medians = {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
               for name, rs in results.items()}
    for name, (p, d) in medians.items():
        print(f"| {name} | {p:.1f} | {d:.1f} |")
    if "transformers" in medians:
        (op, od), (tp, td) = medians["offload"], medians["transformers"]
        print(f"| offload / transformers | {op / tp:.2f}x | {od / td:.2f}x |")


if __name__ == "__main__":
    main()

"""The expert cache and prefetcher under load: sweep cache slots per layer and prefetch on/off, on a synthetic
checkpoint with uniform routing and one with skewed, layer-correlated routing (offload.synthetic.skew_routing).

    python tools/bench_hybrid.py                      # CPU: the device tier is simulated (torch on the CPU)
    python tools/bench_hybrid.py --device cuda        # a real GPU tier: slots in GPU memory, async copies

Each row: decode of --new tokens after a --prompt-token prompt, no experts pinned, so every hit is the cache's.
Prints expert hit rate, prefetch precision / recall, bytes copied per decoded token and decode tokens/s.
A benchmark, not a test.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import offload
from offload.arch import architecture
from offload.demo import default_cache_dir
from offload.experts.device import STAGING_RING_ENTRIES
from offload.placement import PlanRequest, expert_host_bytes, inventory, kv_cache_bytes, make_plan
from offload.synthetic import write_synthetic_checkpoint

CONFIG = {
    "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 8192, "hidden_size": 1024,
    "intermediate_size": 2048, "moe_intermediate_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
    "num_key_value_heads": 2, "head_dim": 128, "num_experts": 32, "num_experts_per_tok": 4, "norm_topk_prob": True,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "bos_token_id": 0, "eos_token_id": 1,
}


def checkpoint(skew: float) -> Path:
    folder = default_cache_dir() / f"bench-hybrid-skew{skew:g}"
    if not (folder / "config.json").exists():
        write_synthetic_checkpoint(folder, CONFIG, std=0.02, seed=0, skew=skew)
    return folder


def cache_only_plan(folder: Path, slots: int, max_context: int, dtype: torch.dtype, fmt: str,
                    slot_format: str | None = None):
    """A plan with exactly `slots` cache slots per MoE layer and nothing pinned, beside the device buffers of
    uploads (the staging ring's landing entries and the streaming double buffer); the slots' and the double
    buffer's rows in `slot_format` (None: the device dtype)."""
    arch = architecture(CONFIG["model_type"])
    cfg = arch.config_from_hf(CONFIG)
    inv = inventory(cfg, arch.names)
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    kv = kv_cache_bytes(cfg, max_context, dtype_bytes)
    fixed = sum(inv.device_bytes(dtype_bytes).values()) + kv
    host_bytes = expert_host_bytes(cfg, fmt)
    row = inv.slot_bytes(dtype_bytes, slot_format)
    buffers = STAGING_RING_ENTRIES * host_bytes + 2 * inv.top_k * row
    request = PlanRequest(fixed + buffers + slots * len(inv.moe_layers) * row, 2**40, max_context, kv, dtype_bytes,
                          fmt, host_bytes, slots_per_layer=slots, slot_formats=(slot_format,),
                          stream_buffer_experts=2 * inv.top_k, device_landing_entries=STAGING_RING_ENTRIES)
    return make_plan(inv, request)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--experts", default="int8", choices=["bf16", "int8", "int4"])
    parser.add_argument("--slots", default="0,2,4,8,16")
    parser.add_argument("--skews", default="0,4")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=48)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    max_context = args.prompt + args.new + 8
    gpu = f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else " (simulated device tier)"
    print(f"# qwen3_moe-shaped synthetic: hidden 1024, 8 layers, 32 experts top-4, I=512; experts on host as "
          f"{args.experts}; device {args.device}{gpu}; decode {args.new} tokens after {args.prompt}")
    print("| routing | slots/layer | prefetch | hit rate | precision | recall | MB copied/token | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    prompt = torch.randint(2, CONFIG["vocab_size"], (args.prompt,), generator=torch.Generator().manual_seed(0))
    for skew in (float(s) for s in args.skews.split(",")):
        folder = checkpoint(skew)
        for slots in (int(s) for s in args.slots.split(",")):
            plan = cache_only_plan(folder, slots, max_context, dtype, args.experts)
            for prefetch in ((False, True) if slots else (False,)):
                model = offload.load(folder, device=args.device, max_context=max_context, plan=plan,
                                     prefetch=prefetch)
                model.generate(prompt.tolist(), max_new_tokens=4, ignore_eos=True)  # warm-up
                model.logits(prompt.tolist())  # the prefill's traffic is not decode's
                model.reset_stats()
                g = model.generate(prompt.tolist(), max_new_tokens=args.new, ignore_eos=True, reuse_cache=False)
                t = model.stats()["totals"]
                per_token = t["bytes_copied"] / g.stats.generated_tokens / 1e6
                precision = "-" if t["prefetch_precision"] is None else f"{t['prefetch_precision']:.2f}"
                recall = "-" if t["prefetch_recall"] is None else f"{t['prefetch_recall']:.2f}"
                routing = "uniform" if skew == 0 else f"skewed ({skew:g})"
                print(f"| {routing} | {slots} | {'on' if prefetch else 'off'} | {t['hit_rate']:.2f} | {precision} | "
                      f"{recall} | {per_token:.2f} | {g.stats.decode_tokens_per_s:.1f} |", flush=True)


if __name__ == "__main__":
    main()

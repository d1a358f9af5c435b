"""What the shipped demo model does with its experts: the figures docs/benchmarks.md records for it.

    python tools/demo_model_report.py [--model offload/demo_model] [--prompts tools/demo_prompts.txt]

Prints, in one run: the training record (validation loss); per-layer routing entropy over the chat
completions of the prompts (mean per-token router entropy, and the entropy of each layer's expert-usage
histogram, both in bits against the uniform log2(E)); and, on a simulated device tier with nothing pinned,
the expert cache hit rate and prefetch precision / recall for several cache sizes, with prefetch off and on.
`offload profile` gives the tuned-vs-default plan comparison on the same prompts. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import offload
from offload.arch import architecture
from offload.placement import PlanRequest, expert_host_bytes, inventory, kv_cache_bytes, make_plan

ROOT = Path(__file__).resolve().parents[1]


def cache_only_plan(hf_config: dict, slots: int, max_context: int, fmt: str):
    """A plan with exactly `slots` cache slots per MoE layer and nothing pinned (fp32 simulated device tier)."""
    arch = architecture(hf_config["model_type"])
    cfg = arch.config_from_hf(hf_config)
    inv = inventory(cfg, arch.names)
    kv = kv_cache_bytes(cfg, max_context, 4)
    fixed = sum(inv.device_bytes(4).values()) + kv
    request = PlanRequest(fixed + slots * len(inv.moe_layers) * inv.expert_params * 4, 2**40, max_context, kv, 4,
                          fmt, expert_host_bytes(cfg, fmt), slots_per_layer=slots)
    return make_plan(inv, request)


def entropy_bits(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log2()).sum(-1)


def routing_entropy(folder: Path, sequences: list[list[int]]) -> list[tuple[float, float]]:
    """Per MoE layer: (mean per-token router entropy, entropy of the top-k usage histogram), in bits."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    per_token: list[list[torch.Tensor]] = []
    usage: list[torch.Tensor] = []
    top_k = reference.config.num_experts_per_tok
    with torch.no_grad():
        for ids in sequences:
            logits = reference(torch.tensor([ids]), output_router_logits=True).router_logits  # layers x [T, E]
            for layer, router in enumerate(logits):
                probs = router.float().softmax(-1)
                if layer == len(per_token):
                    per_token.append([])
                    usage.append(torch.zeros(probs.shape[-1]))
                per_token[layer].append(entropy_bits(probs))
                usage[layer] += torch.bincount(probs.topk(top_k, -1).indices.reshape(-1), minlength=probs.shape[-1])
    return [(torch.cat(t).mean().item(), entropy_bits(u / u.sum()).item()) for t, u in zip(per_token, usage)]


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "offload" / "demo_model")
    parser.add_argument("--prompts", type=Path, default=ROOT / "tools" / "demo_prompts.txt")
    parser.add_argument("--new", type=int, default=48, help="tokens generated per prompt")
    parser.add_argument("--slots", default="2,4,8")
    parser.add_argument("--experts", default="int8", choices=["bf16", "int8", "int4"])
    args = parser.parse_args()
    prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    hf_config = json.loads((args.model / "config.json").read_text())
    training = args.model / "training.json"
    if training.exists():
        record = json.loads(training.read_text())
        print(f"training: {record['steps']} steps x {record['batch']}x{record['seq']} tokens, "
              f"{record['minutes']} min; validation loss {record['validation_loss']:.3f} "
              f"(perplexity {math.exp(record['validation_loss']):.1f})")

    model = offload.load(args.model, device="cpu", max_context=512)
    sequences = []
    for prompt in prompts:
        ids = model.chat_prompt([{"role": "user", "content": prompt}])
        sequences.append(ids + model.generate(ids, max_new_tokens=args.new).token_ids)
    E = model.config.router.num_experts
    print(f"\nrouting entropy over {sum(map(len, sequences))} tokens (bits; uniform over {E} experts = "
          f"{math.log2(E):.2f})")
    print("| layer | per-token router entropy | usage-histogram entropy |")
    print("|---|---|---|")
    for layer, (token, hist) in enumerate(routing_entropy(args.model, sequences)):
        print(f"| {layer} | {token:.2f} | {hist:.2f} |")

    print(f"\nexpert cache on a simulated device tier, nothing pinned, host experts {args.experts}; decode "
          f"{args.new} tokens per prompt ({len(prompts)} prompts)")
    print("| slots/layer | prefetch | hit rate | precision | recall |  (means over prompts)")
    print("|---|---|---|---|---|")
    for slots in (int(s) for s in args.slots.split(",")):
        plan = cache_only_plan(hf_config, slots, 512, args.experts)
        for prefetch in (False, True):
            model = offload.load(args.model, device="cpu", max_context=512, plan=plan, prefetch=prefetch)
            runs = []  # per prompt: (hit rate, precision, recall)
            for prompt in prompts:
                ids = model.chat_prompt([{"role": "user", "content": prompt}])
                model.logits(ids)  # prefill traffic is not decode's
                model.reset_stats()
                model.generate(ids, max_new_tokens=args.new, ignore_eos=True)
                t = model.stats()["totals"]
                runs.append((t["hit_rate"], t["prefetch_precision"], t["prefetch_recall"]))
            hit = mean([r[0] for r in runs])
            precision, recall = (mean([r[i] for r in runs if r[i] is not None]) for i in (1, 2))
            precision = "-" if precision is None else f"{precision:.2f}"
            recall = "-" if recall is None else f"{recall:.2f}"
            print(f"| {slots} | {'on' if prefetch else 'off'} | {hit:.2f} | {precision} | {recall} |", flush=True)


if __name__ == "__main__":
    main()

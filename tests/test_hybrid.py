"""Invariance: every placement computes the same model. Plans that put all experts on the device, all on the
CPU workers, pinned subsets, or a tiny cache with prefetch on and off (LRU and LFU) give the reference logits
and the same greedy tokens; the counters add up."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import offload
from offload.arch import architecture
from offload.experts.builder import ExpertsBuilder
from offload.experts.cost import CostModel
from offload.experts.device import STAGING_RING_ENTRIES
from offload.placement import PlanRequest, expert_host_bytes, inventory, kv_cache_bytes, make_plan
from offload.placement.planner import device_buffers
from tiny_models import landing_bytes

IDS = torch.arange(3, 27)
GPU_LIKE_COSTS = CostModel(cpu_bytes_per_s=40e9, cpu_flops=200e9, copy_bytes_per_s=25e9, device_flops=400e12)


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def plan(folder, device_experts: int, slots_per_layer: int | None, heat=None, fmt: str = "bf16",
         slot_format: str | None = None):
    """A plan with room for `device_experts` routed experts on the (simulated) device tier, their rows in
    `slot_format` (None: the device dtype), and, where experts stay on the host, for the device buffers their
    uploads go through (the streaming double buffer, its rows in the slot format, and the staging ring's landing
    buffers) beside them."""
    model = offload.load(folder, device="cpu", max_context=64)
    cfg = model.config
    arch = architecture(cfg.model_type)
    inv = inventory(cfg, arch.names)
    fixed = sum(inv.device_bytes(4).values()) + kv_cache_bytes(cfg, 64, 4)
    request = PlanRequest(device_budget=fixed + device_experts * inv.slot_bytes(4, slot_format), host_budget=2**34,
                          max_context=64, kv_cache_bytes=kv_cache_bytes(cfg, 64, 4), dtype_bytes=4,
                          expert_format=fmt, expert_host_bytes=expert_host_bytes(cfg, fmt),
                          slots_per_layer=slots_per_layer, slot_formats=(slot_format,))
    placed = make_plan(inv, request, heat)
    if not any(layer.host_experts for layer in placed.layers):
        return placed
    buffers = device_buffers(replace(request, device_budget=2**40, stream_buffer_experts=2 * inv.top_k,
                                     device_landing_entries=STAGING_RING_ENTRIES), 0, inv.slot_bytes(4, slot_format))
    return replace(placed, device_budget=placed.device_budget + sum(buffers.values()), device_buffers=buffers,
                   stream_buffer_experts=2 * inv.top_k, stream_buffer_format=slot_format)


PLANS = {
    # name: (device experts, slots per layer, cache policy, prefetch)
    "all_on_device": (10_000, None, "lru", True),
    "all_on_cpu": (0, 0, "lru", False),
    "pinned_subset_no_cache": (5, 0, "lru", False),
    "tiny_cache_prefetch_lru": (3, 1, "lru", True),
    "tiny_cache_no_prefetch_lru": (3, 1, "lru", False),
    "tiny_cache_prefetch_lfu": (3, 1, "lfu", True),
    "cache_and_pinned_lfu": (9, 2, "lfu", True),
}


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "qwen2_moe", "glm4_moe", "minimax_m2", "dots1",
                                  "glm_moe_dsa", "ernie4_5_moe", "hunyuan_v1_moe", "gpt_oss"])
@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_every_plan_matches_the_reference(bf16_checkpoints, name, plan_name, monkeypatch):
    check_plan_matches_the_reference(bf16_checkpoints(name), plan_name, monkeypatch)


@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_every_plan_matches_the_reference_with_input_scaled_routing(bf16_checkpoints, plan_name, monkeypatch):
    """Llama-4 scales each routed expert's input and calls the experts once per routed slot: about 3 tokens per
    expert and call in the tiny model's prefill, below the copy crossover, so its small caches may see no hit."""
    check_plan_matches_the_reference(bf16_checkpoints("llama4"), plan_name, monkeypatch, expect_cache_hits=False)


def check_plan_matches_the_reference(folder, plan_name: str, monkeypatch, expect_cache_hits: bool = True,
                                     stream: bool = False) -> None:
    # The miss decisions follow a GPU-like cost model (prefill chunks copy, decode computes on the CPU workers)
    # rather than one measured at load, whose crossover moves with the machine's load: every run then exercises
    # the same copies and cache hits. Without `stream` no chunk streams, so the prefill takes the per-call slot
    # copies; with it a prefill chunk from the cost model's stream threshold on streams its experts
    # (tests/test_stream.py).
    monkeypatch.setattr(ExpertsBuilder, "_measure_costs", lambda *args: GPU_LIKE_COSTS)
    if not stream:
        monkeypatch.setattr(ExpertsBuilder, "stream_threshold", property(lambda self: None))
    device_experts, slots, policy, prefetch = PLANS[plan_name]
    reference = offload.load(folder, device="cpu", max_context=64)
    hybrid = offload.load(folder, device="cpu", max_context=64, plan=plan(folder, device_experts, slots),
                          cache_policy=policy, prefetch=prefetch)
    expected = reference.logits(IDS)
    assert rel_err(hybrid.logits(IDS), expected) <= 1e-4
    with torch.inference_mode():
        steps = torch.cat([hybrid.transformer(IDS[i : i + 1], i) for i in range(len(IDS))])
    assert rel_err(steps, expected) <= 1e-4
    kwargs = dict(max_new_tokens=16, ignore_eos=True)
    expected_tokens = reference.generate(IDS[:6].tolist(), **kwargs).token_ids
    assert hybrid.generate(IDS[:6].tolist(), **kwargs).token_ids == expected_tokens

    stats = hybrid.stats()
    layers = stats["layers"]
    assert layers and all(l["hits"] + l["misses"] == l["expert_uses"] > 0 for l in layers)
    if plan_name == "all_on_device":
        assert stats["totals"]["hit_rate"] == 1.0
    if plan_name == "all_on_cpu":
        assert stats["totals"]["hit_rate"] == 0.0
        assert all(l["cpu_misses"] + l["streamed_misses"] == l["expert_uses"] for l in layers)
    if stream and plan_name != "all_on_device":
        assert stats["totals"]["bytes_streamed"] > 0
    if plan_name.startswith("tiny_cache") or plan_name.startswith("cache_and"):
        assert any(l["cache_hits"] > 0 for l in layers) or not expect_cache_hits or stream
        assert (stats["totals"]["prefetch_precision"] is not None) == prefetch
        assert stats["totals"]["bytes_copied"] > 0 or not expect_cache_hits


def test_cost_model_copies_for_prefill_and_computes_decode_on_the_cpu():
    # A GPU-like device: fast matmuls, copies over a 25 GB/s link; CPU workers at 40 GB/s and 200 GFLOP/s.
    cost = GPU_LIKE_COSTS
    host, device, flops = 12_000_000, 24_000_000, 2 * 3 * 2048 * 1024  # an int8 host copy, a bf16 device copy
    assert not cost.prefer_copy(1, host, device, flops)  # decode: reading 12 MB beats moving 24 MB
    assert cost.prefer_copy(512, host, device, flops)  # prefill: the CPU's FLOPs dominate
    crossover = next(t for t in range(1, 512) if cost.prefer_copy(t, host, device, flops))
    assert 1 < crossover < 512


def test_plan_for_another_model_is_refused(bf16_checkpoints, checkpoint_dir):
    other = plan(bf16_checkpoints("qwen2_moe"), 3, 1)
    folder, _ = checkpoint_dir("mixtral")
    with pytest.raises(offload.OffloadError, match="different model"):
        offload.load(folder, device="cpu", plan=other)


def test_simulated_gpu_budget_plans_before_reading_weights(checkpoint_dir):
    folder, _ = checkpoint_dir("mixtral")
    with pytest.raises(offload.OffloadError, match="budget is .* lower max_context"):
        offload.load(folder, device="cpu", gpu_memory="10KiB", max_context=64)
    model = offload.load(folder, device="cpu", gpu_memory="3MiB", max_context=64, experts="bf16")
    assert model.plan is not None and model.plan.device_bytes <= 3 * 2**20
    assert "kv_cache" in model.plan.table()


def test_layers_without_slots_or_host_experts_mix_with_caching_layers(bf16_checkpoints):
    """First MoE layer: everything pinned (no CPU part); second: nothing pinned, no slots; third: a cache."""
    import dataclasses

    folder = bf16_checkpoints("mixtral")
    base = plan(folder, 10_000, None)
    E = base.layers[0].num_experts
    layers = (dataclasses.replace(base.layers[0], pinned=tuple(range(E)), cache_slots=0),
              dataclasses.replace(base.layers[1], pinned=(), cache_slots=0),
              dataclasses.replace(base.layers[2], pinned=(1,), cache_slots=2))
    mixed = dataclasses.replace(base, layers=layers)
    reference = offload.load(folder, device="cpu", max_context=64)
    model = offload.load(folder, device="cpu", max_context=64, plan=mixed)
    assert rel_err(model.logits(IDS), reference.logits(IDS)) <= 1e-4
    kwargs = dict(max_new_tokens=12, ignore_eos=True)
    expected_tokens = reference.generate(IDS[:6].tolist(), **kwargs).token_ids
    assert model.generate(IDS[:6].tolist(), **kwargs).token_ids == expected_tokens
    layers = model.stats()["layers"]
    assert layers[0]["hit_rate"] == 1.0 and layers[1]["hit_rate"] == 0.0
    assert model._experts.cost is not None  # measured on the third layer


@pytest.mark.parametrize("fmt, max_err", [("int8", 4e-2), ("int4", 0.6)])
def test_quantized_host_experts_stay_within_their_bounds_under_a_plan(bf16_checkpoints, fmt, max_err):
    """Pinned experts keep full precision, cached ones are dequantized copies, the rest run quantized on the CPU:
    the error stays within the format's whole-model bound (docs/formats.md)."""
    folder = bf16_checkpoints("qwen2_moe")
    reference = offload.load(folder, device="cpu", max_context=64)
    model = offload.load(folder, device="cpu", max_context=64, plan=plan(folder, 9, 2, fmt=fmt))
    expected = reference.logits(IDS)
    got = model.logits(IDS)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= max_err
    with torch.inference_mode():
        steps = torch.cat([model.transformer(IDS[i : i + 1], i) for i in range(len(IDS))])
    assert ((steps - expected).abs().max() / expected.abs().max()).item() <= max_err
    assert model.stats()["totals"]["hit_rate"] > 0


FP32_PLANS = {  # name: (device experts, slots per layer)
    "pinned_subset": (5, 0),
    "cache_slots": (3, 1),
    "cache_and_pinned": (9, 2),
}


@pytest.mark.parametrize("plan_name", sorted(FP32_PLANS))
def test_fp32_checkpoint_gives_the_same_logits_under_every_plan(checkpoint_dir, plan_name, monkeypatch):
    """Placement never changes the numbers: a float32 model's host experts stay float32 (no bf16 rounding), so
    pinned, cached and host experts all compute with the checkpoint's weights. The misses follow the GPU-like cost
    model (prefill copies into the slots, decode computes on the CPU workers), so that every run exercises both: with
    the one measured at load, a busy host could price every copy out and leave the slots empty."""
    monkeypatch.setattr(ExpertsBuilder, "_measure_costs", lambda *args: GPU_LIKE_COSTS)
    monkeypatch.setattr(ExpertsBuilder, "stream_threshold", property(lambda self: None))
    folder, _ = checkpoint_dir("qwen2_moe")
    reference = offload.load(folder, device="cpu", max_context=64)
    device_experts, slots = FP32_PLANS[plan_name]
    placed = plan(folder, device_experts, slots, fmt="float32")
    model = offload.load(folder, device="cpu", max_context=64, plan=placed)
    expected = reference.logits(IDS)
    assert rel_err(model.logits(IDS), expected) <= 1e-6
    with torch.inference_mode():
        steps = torch.cat([model.transformer(IDS[i : i + 1], i) for i in range(len(IDS))])
    assert rel_err(steps, expected) <= 1e-6
    layers = model.stats()["layers"]
    assert any(l["cpu_misses"] > 0 for l in layers) and any(l["pinned_hits"] + l["cache_hits"] > 0 for l in layers)


def test_a_device_budget_keeps_host_experts_in_the_model_dtype_unless_asked(checkpoint_dir):
    """The default plan for a float32 model offloads float32 experts; --experts bf16 still asks for bf16. (Four
    device experts are fewer than top-k slots per layer: the rows stay float32 because slots="bf16" asks for the
    model dtype, tests/test_quant_slots.py has the planner's own choice.)"""
    folder, _ = checkpoint_dir("mixtral")
    reference = offload.load(folder, device="cpu", max_context=64)
    cfg = reference.config
    inv = inventory(cfg, architecture(cfg.model_type).names)
    buffers = 2 * inv.top_k * inv.expert_params * 4 + landing_bytes(cfg)  # the streaming double buffer, the landing
    budget = sum(inv.device_bytes(4).values()) + kv_cache_bytes(cfg, 64, 4) + buffers + 4 * inv.expert_params * 4
    model = offload.load(folder, device="cpu", max_context=64, gpu_memory=budget, slots="bf16")
    assert model.plan.expert_format == "float32" and model.load_info.expert_format == "float32"
    assert any(l.host_experts for l in model.plan.layers)
    assert rel_err(model.logits(IDS), reference.logits(IDS)) <= 1e-6
    assert offload.plan(folder, gpu_memory=budget, max_context=64, device="cpu").expert_format == "float32"
    asked = offload.load(folder, device="cpu", max_context=64, gpu_memory=budget, experts="bf16", slots="bf16")
    assert asked.plan.expert_format == "bf16"

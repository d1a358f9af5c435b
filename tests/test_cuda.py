"""The CUDA device tier: the same logits and tokens on a GPU. Skipped without one."""
from __future__ import annotations

import pytest
import torch

import offload

pytestmark = pytest.mark.cuda

IDS = torch.arange(5, 29)


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe_clip", "deepseek_v2_group_yarn",
                                  "deepseek_v3"])
def test_cuda_fp32_matches_transformers_and_cpu_tokens(checkpoint_dir, name):
    folder, ref = checkpoint_dir(name)
    gpu = offload.load(folder, device="cuda", dtype="float32", max_context=64)
    assert gpu.device.type == "cuda"
    with torch.no_grad():
        expected = ref(IDS[None]).logits[0]
    assert rel_err(gpu.logits(IDS), expected) <= 1e-4
    with torch.inference_mode():
        steps = torch.cat([gpu.transformer(IDS[i : i + 1].cuda(), i) for i in range(len(IDS))]).cpu()
    assert rel_err(steps, expected) <= 1e-4
    cpu = offload.load(folder, device="cpu", max_context=64)
    kwargs = dict(max_new_tokens=24, ignore_eos=True)
    assert gpu.generate(IDS[:8].tolist(), **kwargs).token_ids == cpu.generate(IDS[:8].tolist(), **kwargs).token_ids


def test_cuda_default_dtype_is_bf16_and_close(checkpoint_dir):
    folder, ref = checkpoint_dir("deepseek_v3")
    gpu = offload.load(folder, device="cuda", max_context=64)
    assert gpu.transformer.embed.dtype == torch.bfloat16
    with torch.no_grad():
        expected = ref(IDS[None]).logits[0]
    assert rel_err(gpu.logits(IDS), expected) <= 5e-2


@pytest.mark.parametrize("slots, prefetch, policy", [(1, True, "lru"), (2, False, "lfu"), (0, False, "lru")])
def test_cuda_hybrid_plans_match_the_reference(checkpoint_dir, tmp_path, slots, prefetch, policy):
    """GPU slots filled through pinned staging and a side stream; CPU workers for the rest."""
    import copy

    from offload.arch import architecture
    from offload.placement import PlanRequest, inventory, kv_cache_bytes, make_plan

    _, ref = checkpoint_dir("deepseek_v3")
    folder = tmp_path / "bf16"
    copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(folder)
    reference = offload.load(folder, device="cuda", dtype="float32", max_context=64)
    cfg = reference.config
    arch = architecture(cfg.model_type)
    inv = inventory(cfg, arch.names)
    kv = kv_cache_bytes(cfg, 64, 4)
    budget = sum(inv.device_bytes(4).values()) + kv + (3 + slots * len(inv.moe_layers)) * inv.expert_params * 4
    plan = make_plan(inv, PlanRequest(budget, 2**34, 64, kv, 4, "bf16", inv.expert_params * 2, slots_per_layer=slots))
    hybrid = offload.load(folder, device="cuda", dtype="float32", max_context=64, plan=plan, prefetch=prefetch,
                          cache_policy=policy)
    assert rel_err(hybrid.logits(IDS), reference.logits(IDS)) <= 1e-4
    kwargs = dict(max_new_tokens=16, ignore_eos=True)
    prompt = IDS[:6].tolist()
    assert hybrid.generate(prompt, **kwargs).token_ids == reference.generate(prompt, **kwargs).token_ids
    stats = hybrid.stats()
    assert all(l["hits"] + l["misses"] == l["expert_uses"] for l in stats["layers"])
    if prefetch:
        assert stats["totals"]["prefetch_precision"] is not None and stats["totals"]["bytes_copied"] > 0


@pytest.mark.parametrize("variant, experts, dense", [("qwen3_moe", "int8", "int8"), ("deepseek_v3", "int4", "int4")])
def test_cuda_store_dequantizes_to_the_device_and_matches_the_simulated_tier(checkpoint_dir, tmp_path, monkeypatch,
                                                                              variant, experts, dense):
    """A store's packed dense weights are dequantized onto the GPU (the CPU kernels are not used there); with
    host experts (a hybrid plan) the packed experts stay on the CPU workers. Both compute what the same plans
    compute on the simulated device tier. (A CPU-only run differs by its format: its kernels quantize the
    activations.)"""
    from offload.experts.builder import ExpertsBuilder
    from offload.weights.store import convert
    from test_hybrid import GPU_LIKE_COSTS

    folder, _ = checkpoint_dir(variant)
    store = convert(folder, tmp_path / "store", experts, dense)
    gpu = offload.load(store, device="cuda", dtype="float32", max_context=64)
    simulated = offload.load(store, device="cpu", dtype="float32", max_context=64, gpu_memory="1GiB")
    assert gpu.load_info.store and gpu.load_info.dense_format is None
    assert not any(layer.host_experts for layer in simulated.plan.layers)
    assert rel_err(gpu.logits(IDS), simulated.logits(IDS)) <= 1e-4
    plan = hybrid_plan(gpu.config, experts)
    assert all(layer.pinned and layer.host_experts for layer in plan.layers)
    # One cost model for both tiers: whether a miss is copied to a slot (the device computes with the dequantized
    # weights) or computed by the CPU workers (which quantize the activations) then does not depend on the machine.
    monkeypatch.setattr(ExpertsBuilder, "_measure_costs", lambda *args: GPU_LIKE_COSTS)
    hybrid = offload.load(store, device="cuda", dtype="float32", max_context=64, plan=plan, prefetch=False)
    simulated = offload.load(store, device="cpu", dtype="float32", max_context=64, plan=plan, prefetch=False)
    assert rel_err(hybrid.logits(IDS), simulated.logits(IDS)) <= 1e-3


def hybrid_plan(cfg, experts: str, max_context: int = 64):
    """A float32 plan that pins half of each MoE layer's experts beside one cache slot and leaves the others on the
    host in `experts` format."""
    from offload.arch import architecture
    from offload.placement import PlanRequest, expert_host_bytes, inventory, kv_cache_bytes, make_plan

    inv = inventory(cfg, architecture(cfg.model_type).names)
    kv = kv_cache_bytes(cfg, max_context, 4)
    rows = len(inv.moe_layers) * (1 + inv.num_experts // 2)
    budget = sum(inv.device_bytes(4).values()) + kv + rows * inv.slot_bytes(4)
    return make_plan(inv, PlanRequest(budget, 2**34, max_context, kv, 4, experts, expert_host_bytes(cfg, experts),
                                      slots_per_layer=1))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_cuda_quantized_linear_is_the_dequantized_matmul(fmt):
    """torch's CUDA int8 / int4 weight-only kernels through DeviceQuantLinear, odd shapes padded as on the CPU."""
    from offload.model.device_quant import DeviceQuantLinear, int4_grid, quantize

    w, x = torch.randn(40, 72, device="cuda"), torch.randn(5, 72, device="cuda", dtype=torch.bfloat16)
    linear = DeviceQuantLinear(quantize(w, fmt, torch.bfloat16))
    if fmt == "int8":
        dequantized = linear.weight.dequantize()
    else:
        q, scale, zero = int4_grid(w, torch.bfloat16)
        groups = q.shape[1] // 32
        dequantized = ((q.float().reshape(-1, groups, 32) - 8) * scale.float()[..., None]
                       + zero.float()[..., None]).reshape(q.shape)[:40, :72]
    assert rel_err(linear(x).float(), x.float() @ dequantized.T) <= 2e-2


def test_cuda_dense_int8_model_is_close(checkpoint_dir):
    from offload.model.device_quant import DeviceQuantLinear

    folder, ref = checkpoint_dir("deepseek_v3")
    with torch.no_grad():
        expected = ref(IDS[None]).logits[0]
    for dense in ("int8", "int4"):
        gpu = offload.load(folder, device="cuda", max_context=64, dense=dense)
        assert gpu.plan.dense_format == dense and type(gpu.transformer.lm_head) is DeviceQuantLinear
        got = gpu.logits(IDS)
        error = (got - expected).abs().max(-1).values / expected.abs().max(-1).values
        assert error.median() < (0.06 if dense == "int8" else 0.45), (dense, error.median())


@pytest.mark.parametrize("dtype, graphs", [("float32", False), ("bfloat16", False), ("float32", True),
                                           ("bfloat16", True)])
def test_cuda_hybrid_moe_blocks_queue_decode_steps_without_a_synchronisation(checkpoint_dir, tmp_path, dtype,
                                                                              graphs):
    """Decode steps of a hybrid model: every MoE block (router, heat, device-table lookups, the CPU workers'
    packed copies down and up, the resident experts: gathered in float32, read in place by the grouped kernel in
    bf16 where the GPU has it) runs under torch's sync debug mode "error", which raises on any host
    synchronisation; with CUDA graphs the router ran in the replayed block and the rest is checked the same way.
    In float32 the tokens equal the reference's."""
    import copy

    from offload.arch import architecture
    from offload.placement import PlanRequest, inventory, kv_cache_bytes, make_plan

    _, ref = checkpoint_dir("deepseek_v3")
    folder = tmp_path / "bf16"
    copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(folder)
    size = 4 if dtype == "float32" else 2
    cfg = offload.load(folder, device="cpu", max_context=64).config
    inv = inventory(cfg, architecture(cfg.model_type).names)
    kv = kv_cache_bytes(cfg, 64, size)
    budget = sum(inv.device_bytes(size).values()) + kv + (3 + len(inv.moe_layers)) * inv.expert_params * size
    plan = make_plan(inv, PlanRequest(budget, 2**34, 64, kv, size, "bf16", inv.expert_params * 2,
                                      slots_per_layer=1))
    hybrid = offload.load(folder, device="cuda", dtype=dtype, max_context=64, plan=plan, cuda_graphs=graphs)
    assert any(h.cpu is not None for h in hybrid._experts.hybrids.values())
    assert any(layer.graphs is not None for layer in hybrid.transformer.layers) == graphs
    prompt, new = IDS[:6].tolist(), 12
    tokens = hybrid.stream(prompt, max_new_tokens=new, ignore_eos=True).token_ids()
    produced = [next(tokens)]  # the prefill may decide per call (host reads allowed there)
    handles = []
    for layer in hybrid.transformer.layers:
        if layer.mlp in hybrid.transformer.moe_blocks():
            handles.append(layer.mlp.register_forward_pre_hook(
                lambda *args: torch.cuda.set_sync_debug_mode("error")))
            handles.append(layer.mlp.register_forward_hook(lambda *args: torch.cuda.set_sync_debug_mode(0)))
    try:
        produced += list(tokens)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        for handle in handles:
            handle.remove()
    assert len(produced) == new
    if dtype == "float32":
        reference = offload.load(folder, device="cuda", dtype="float32", max_context=64)
        assert produced == reference.generate(prompt, max_new_tokens=new, ignore_eos=True).token_ids


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4s"])
def test_cuda_unpack_of_uploaded_tiles_equals_the_cpu_unpack(fmt):
    import numpy as np

    from csrc_py.formats import expert_arrays, pack, unpack, unpack_arrays

    w = torch.randn(2, 40, 72)
    pm = pack(w, fmt)
    got = unpack_arrays(fmt, 40, 72, *(t.cuda() for t in expert_arrays(pm, 1))).cpu().numpy()
    assert np.array_equal(got.view(np.uint32), unpack(pm, 1).view(np.uint32))


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_cuda_streamed_prefill_through_the_double_buffer_matches_the_reference(checkpoint_dir, tmp_path, fmt,
                                                                              monkeypatch):
    """A long prefill chunk streams each layer's used experts as packed bytes through the double buffer on the
    side stream (batch b+1's copies overlapping batch b's compute) and gives the reference's logits; the bytes
    copied are the streamed experts' packed bytes."""
    import copy

    from offload.arch import architecture
    from offload.experts.builder import ExpertsBuilder
    from offload.experts.cost import CostModel
    from offload.placement import PlanRequest, inventory, kv_cache_bytes, make_plan
    from tiny_models import landing_bytes

    _, ref = checkpoint_dir("qwen2_moe")
    folder = tmp_path / "bf16"
    copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(folder)
    reference = offload.load(folder, device="cuda", dtype="float32", max_context=64)
    cfg = reference.config
    inv = inventory(cfg, architecture(cfg.model_type).names)
    kv = kv_cache_bytes(cfg, 64, 4)
    buffers = 2 * inv.top_k * inv.expert_params * 4 + landing_bytes(cfg, "bf16")  # the double buffer, the landing
    budget = sum(inv.device_bytes(4).values()) + kv + buffers + (2 + len(inv.moe_layers)) * inv.expert_params * 4
    plan = make_plan(inv, PlanRequest(budget, 2**34, 64, kv, 4, fmt, inv.expert_params * 2, slots_per_layer=1,
                                      stream_buffer_experts=2 * inv.top_k, device_landing_entries=8))
    assert plan.stream_buffer_experts == 2 * inv.top_k
    fast_link = CostModel(cpu_bytes_per_s=40e9, cpu_flops=200e9, copy_bytes_per_s=80e9, device_flops=400e12)
    monkeypatch.setattr(ExpertsBuilder, "_measure_costs", lambda *args: fast_link)
    hybrid = offload.load(folder, device="cuda", dtype="float32", max_context=64, plan=plan, prefill_chunk=12)
    assert hybrid._experts.stream_buffer is not None
    ring = hybrid._experts.ring
    before = ring.bytes_copied
    got = hybrid.logits(IDS)
    torch.cuda.synchronize()
    stats = hybrid.stats()["totals"]
    assert stats["bytes_streamed"] > 0 and ring.bytes_copied - before == stats["bytes_streamed"]
    assert rel_err(got, reference.logits(IDS)) <= (1e-4 if fmt == "bf16" else 4e-2)


@pytest.mark.parametrize("host, rows", [("int4", "int4"), ("bf16", "int8")])
def test_cuda_stream_buffer_in_the_slot_format_computes_what_the_cpu_workers_do(bf16_checkpoints, monkeypatch, host,
                                                                                rows):
    """The double buffer's rows in the plan's slot format on the side stream: int4 rows re-laid from the host's
    nibbles (bf16 scales on CUDA), int8 rows quantized on the device; a long chunk's logits stay within int8's bound
    of the same plan with streaming off."""
    from offload.experts.builder import ExpertsBuilder
    from offload.experts.quant_pool import QuantExpertPool
    from test_hybrid import plan
    from test_stream import FAST_LINK_COSTS

    folder = bf16_checkpoints("qwen2_moe")
    placed = plan(folder, 3, 1, fmt=host, slot_format=rows)
    monkeypatch.setattr(ExpertsBuilder, "_measure_costs", lambda *args: FAST_LINK_COSTS)
    streamed = offload.load(folder, device="cuda", dtype="float32", max_context=64, plan=placed)
    assert isinstance(streamed._experts.stream_buffer.pool, QuantExpertPool)
    got = streamed.logits(IDS)
    torch.cuda.synchronize()
    assert streamed.stats()["totals"]["bytes_streamed"] > 0
    monkeypatch.setattr(ExpertsBuilder, "stream_threshold", property(lambda self: None))
    on_cpu = offload.load(folder, device="cuda", dtype="float32", max_context=64, plan=placed)
    assert rel_err(got, on_cpu.logits(IDS)) <= 4e-2

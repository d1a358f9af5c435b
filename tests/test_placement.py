"""Planner properties: within budget, attention and KV always on the device, clear errors, heat-driven pinning."""
from __future__ import annotations

import re

import pytest

from offload.arch import architecture
from offload.demo import RANDOM_DEMO_CONFIG
from offload.placement.budget import parse_bytes
from offload.placement.inventory import inventory, kv_cache_bytes
from offload.placement.planner import Plan, PlanError, PlanRequest, make_plan
from tiny_models import COMMON, VARIANTS

MiB = 2**20


def demo_inventory():
    arch = architecture("qwen3_moe")
    cfg = arch.config_from_hf(RANDOM_DEMO_CONFIG)
    return cfg, inventory(cfg, arch.names)


def request(device_budget: int, cfg, max_context: int = 512, **kw) -> PlanRequest:
    return PlanRequest(device_budget=device_budget, host_budget=64 * 2**30, max_context=max_context,
                       kv_cache_bytes=kv_cache_bytes(cfg, max_context, 2), dtype_bytes=2, expert_format="bf16",
                       expert_host_bytes=98304 * 2, **kw)


def test_inventory_counts_every_parameter_once():
    from offload.synthetic import random_tensors

    cfg, inv = demo_inventory()
    total = sum(t.numel() for t in random_tensors(RANDOM_DEMO_CONFIG).values())
    experts = inv.expert_params * inv.num_experts * len(inv.moe_layers)
    assert sum(inv.params.values()) + experts == total
    assert inv.expert_params == 3 * 256 * 128
    assert inv.params["embeddings"] == inv.params["lm_head"] == 1024 * 256


@pytest.mark.parametrize("budget_mib", [6, 7, 8, 10, 13, 20, 40])
def test_plan_never_exceeds_the_device_budget(budget_mib):
    cfg, inv = demo_inventory()
    plan = make_plan(inv, request(budget_mib * MiB, cfg))
    assert plan.device_bytes <= budget_mib * MiB
    assert plan.device_groups["attention"] > 0 and plan.device_groups["kv_cache"] > 0
    for layer in plan.layers:
        assert len(layer.pinned) + layer.cache_slots <= layer.num_experts
        assert len(set(layer.pinned)) == len(layer.pinned)
    # a budget that fits everything pins everything and needs no cache
    if budget_mib == 40:
        assert all(len(l.pinned) == 16 and l.cache_slots == 0 for l in plan.layers)


def test_slots_come_before_pinning_and_spread_evenly():
    cfg, inv = demo_inventory()
    expert = inv.expert_params * 2
    fixed = sum(inv.device_bytes(2).values()) + kv_cache_bytes(cfg, 512, 2)
    plan = make_plan(inv, request(fixed + 10 * expert, cfg))  # room for 10 experts over 4 layers
    assert [l.cache_slots for l in plan.layers] == [3, 3, 2, 2]
    assert all(not l.pinned for l in plan.layers)
    plan = make_plan(inv, request(fixed + 40 * expert, cfg))  # 8 slots per layer (2 x top-4), then 8 pinned
    assert [l.cache_slots for l in plan.layers] == [8, 8, 8, 8]
    assert sum(len(l.pinned) for l in plan.layers) == 8
    assert [len(l.pinned) for l in plan.layers] == [2, 2, 2, 2]  # evenly without heat


def test_heat_pins_the_hottest_experts():
    cfg, inv = demo_inventory()
    heat = [[0.0] * 16 for _ in range(4)]
    hot = {(0, 5), (0, 9), (2, 1), (3, 15), (3, 14), (1, 7)}
    for layer, e in hot:
        heat[layer][e] = 100.0 + e
    expert = inv.expert_params * 2
    fixed = sum(inv.device_bytes(2).values()) + kv_cache_bytes(cfg, 512, 2)
    plan = make_plan(inv, request(fixed + 6 * expert, cfg, slots_per_layer=0), heat=heat)
    assert {(i, e) for i, l in enumerate(plan.layers) for e in l.pinned} == hot


def test_impossible_budget_is_a_plan_error_with_numbers():
    cfg, inv = demo_inventory()
    with pytest.raises(PlanError,
                       match=r"need .*MiB.*KV cache.*max_context 4096.*budget is 4.00 MiB.*lower max_context"):
        make_plan(inv, request(4 * MiB, cfg, max_context=4096))
    with pytest.raises(PlanError, match="heat must be 4 MoE layers x 16 experts"):
        make_plan(inv, request(40 * MiB, cfg), heat=[[1.0] * 16])
    tight = PlanRequest(device_budget=7 * MiB, host_budget=1 * MiB, max_context=512,
                        kv_cache_bytes=kv_cache_bytes(cfg, 512, 2), dtype_bytes=2, expert_format="bf16",
                        expert_host_bytes=196608)
    with pytest.raises(PlanError, match="RAM is available; use a smaller expert format"):
        make_plan(inv, tight)


def test_plan_json_round_trip_and_table(tmp_path):
    cfg, inv = demo_inventory()
    plan = make_plan(inv, request(9 * MiB, cfg))
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.load(path) == plan
    table = plan.table()
    assert "kv_cache" in table and "pinned + cache slots" in table
    assert len([line for line in table.splitlines() if line.strip().startswith(("0 ", "1 ", "2 ", "3 "))]) == 4
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(PlanError, match="not a plan file"):
        Plan.load(tmp_path / "bad.json")


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen2_moe_sparse_step"])
def test_inventory_skips_dense_layers_and_sizes_mla_cache(name):
    import transformers

    model_type, overrides = VARIANTS[name]
    hf = transformers.CONFIG_MAPPING[model_type](**{**COMMON, **overrides}).to_dict()
    arch = architecture(model_type)
    cfg = arch.config_from_hf(hf)
    inv = inventory(cfg, arch.names)
    assert inv.moe_layers == tuple(i for i, moe in enumerate(cfg.moe_layers) if moe)
    assert len(inv.moe_layers) < cfg.num_hidden_layers
    assert inv.params["dense_mlp"] > 0
    if cfg.mla:
        assert kv_cache_bytes(cfg, 100, 2) == cfg.num_hidden_layers * 100 * (16 + 8) * 2


def test_parse_bytes():
    assert parse_bytes("12GiB") == 12 * 2**30
    assert parse_bytes("1.5 GB") == 1_500_000_000
    assert parse_bytes(77) == 77
    with pytest.raises(Exception, match="write it like 12GiB"):
        parse_bytes("twelve gigs")


def test_heat_pins_where_the_cache_would_miss():
    """Layer 0 has two hot experts (its two slots catch them); layer 1 has four warm ones. One pin is worth more
    in layer 1, where the third-hottest expert would otherwise miss the cache."""
    cfg, inv = demo_inventory()
    heat = [[0.0] * 16 for _ in range(4)]
    heat[0][3], heat[0][4] = 100.0, 90.0
    for e, h in zip((7, 8, 9, 10), (50.0, 40.0, 30.0, 20.0)):
        heat[1][e] = h
    expert = inv.expert_params * 2
    fixed = sum(inv.device_bytes(2).values()) + kv_cache_bytes(cfg, 512, 2)
    plan = make_plan(inv, request(fixed + 9 * expert, cfg, slots_per_layer=2), heat=heat)  # 8 slots + 1 pin
    assert [l.cache_slots for l in plan.layers] == [2, 2, 2, 2]
    assert [l.pinned for l in plan.layers] == [(), (7,), (), ()]


@pytest.mark.parametrize("budget, unit", [(9 * MiB, "MiB"), (64 * MiB, "MiB"), (2 * 2**30, "GiB")])
def test_plan_table_gives_every_size_in_one_unit_and_names_the_dtype(budget, unit):
    cfg, inv = demo_inventory()
    plan = make_plan(inv, request(budget, cfg, device_dtype="bfloat16"))
    table = plan.table()
    column = re.findall(r"\d (MiB|GiB)$", table, re.M)  # the size column, one per tier row
    assert len(column) >= 5 and set(column) == {unit}, table
    assert "device tier (bfloat16)" in table and "host tier (bf16)" in table
    assert Plan.from_json(plan.to_json()) == plan


def test_staging_buffers_count_in_the_host_budget(tmp_path):
    """The pinned staging ring (entries x one expert's packed host bytes) and the CPU workers' shared link buffers
    (a whole prompt of inputs and results) are part of the host tier: in the plan, its table, and its RAM check."""
    import json

    import offload
    from offload.experts.device import STAGING_RING_ENTRIES
    from offload.experts.link import HostLink

    (tmp_path / "config.json").write_text(json.dumps(RANDOM_DEMO_CONFIG))
    kwargs = dict(gpu_memory="9MiB", max_context=512, device="cpu", dtype="bfloat16")
    plan = offload.plan(tmp_path, host_memory="1GiB", **kwargs)
    H, K = RANDOM_DEMO_CONFIG["hidden_size"], RANDOM_DEMO_CONFIG["num_experts_per_tok"]
    assert HostLink.buffer_bytes(H, K, 512) == 512 * (2 * H + 2 * K) * 4  # float32 [T, H + 2K] in, [T, H] out
    assert plan.host_staging == {"staging ring": STAGING_RING_ENTRIES * plan.expert_host_bytes,
                                 "host link": HostLink.buffer_bytes(H, K, 512)}
    assert re.search(r"staging ring +\d+\.\d+ MiB\n  host link +\d+\.\d+ MiB\n  total", plan.table())
    assert Plan.from_json(plan.to_json()) == plan
    need = plan.host_bytes + plan.host_staging_bytes
    assert offload.plan(tmp_path, host_memory=need, **kwargs).host_staging == plan.host_staging
    with pytest.raises(PlanError) as refused:
        offload.plan(tmp_path, host_memory=need - 1, **kwargs)  # room for the experts, not for their staging
    message = str(refused.value)
    assert "\n" not in message and plan.host_bytes < need - 1
    everything_pinned = offload.plan(tmp_path, host_memory="1GiB", **{**kwargs, "gpu_memory": "1GiB"})
    assert everything_pinned.host_bytes == 0 and everything_pinned.host_staging == {}
    assert re.search(r"experts left on the host need [\d.]+ MiB as bf16 plus [\d.]+ MiB of staging buffers but only "
                     r"[\d.]+ MiB of RAM is available; .*lower max_context", message)

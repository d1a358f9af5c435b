"""`offload profile`: the tuned plan beats the default plan's hit rate on skewed routing, the profile feeds
`offload plan --profile`, the tokens/s prediction on known numbers, the heat map and the command's error paths."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import offload
import offload.synthetic
from offload import profiling
from offload.cli import app
from offload.demo import random_demo_checkpoint
from offload.errors import OffloadError
from offload.experts.cost import CostModel
from offload.experts.device import STAGING_RING_ENTRIES
from offload.experts.hybrid import ExpertSizes
from offload.placement.planner import LayerPlan, Plan
from offload.profiling import (
    DecodeCounters,
    UseCosts,
    expected_hit_share,
    heat_level,
    heatmap_text,
    measured_use_costs,
    predict_hit_rate,
    predict_tokens_per_s,
    read_heat,
    read_prompts,
    run_profile,
    write_profile,
)

# Qwen3-MoE at a toy size. 32 experts top-2: with skewed routing a layer uses a handful of experts, more than its
# 2 * top_k = 4 cache slots hold, so which ones are pinned shows in the hit rate (with 16 experts the slots
# alone catch nearly every use, and both plans hit about 99%).
SKEWED_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 256, "hidden_size": 64,
    "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "num_experts": 32, "num_experts_per_tok": 2, "norm_topk_prob": True,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "bos_token_id": 0, "eos_token_id": 1,
}
MAX_CONTEXT = 128


@pytest.fixture(scope="module")
def skewed(tmp_path_factory) -> tuple[Path, int]:
    """The skewed checkpoint and a device budget for its dense part, the upload buffers (the staging ring's landing
    entries and the streaming double buffer, each a float32 expert's bytes a row), the cache slots and 2 pinned
    experts a layer."""
    folder = tmp_path_factory.mktemp("skewed")
    offload.synthetic.write_synthetic_checkpoint(folder, SKEWED_CONFIG, skew=4.0)
    roomy = offload.plan(folder, gpu_memory="1GiB", max_context=MAX_CONTEXT, device="cpu")
    layers, top_k = len(roomy.layers), SKEWED_CONFIG["num_experts_per_tok"]
    buffer_rows = STAGING_RING_ENTRIES + 2 * top_k
    return folder, roomy.device_fixed_bytes + (buffer_rows + layers * (2 * top_k + 2)) * roomy.expert_device_bytes


@pytest.fixture(scope="module")
def skewed_profile(skewed) -> profiling.Profile:
    folder, budget = skewed
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 256, (12,), generator=generator).tolist() for _ in range(3)]
    return run_profile(folder, prompts, 24, device="cpu", max_context=MAX_CONTEXT, gpu_memory=budget, prefetch=True)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return random_demo_checkpoint(tmp_path_factory.mktemp("cache"))


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    """One red line, last on stderr (after the progress lines of an error found once the model is loaded)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


# --- the acceptance test: tuning to the heat pays on skewed routing ---

def test_tuned_plan_beats_the_default_plans_hit_rate_on_skewed_routing(skewed, skewed_profile):
    default, tuned = skewed_profile.report
    assert (default.plan, tuned.plan) == ("default", "tuned")
    assert default.pinned == tuned.pinned == 8 and default.cache_slots == tuned.cache_slots == 16
    assert tuned.hit_rate > default.hit_rate
    assert tuned.predicted_hit_rate > default.predicted_hit_rate
    folder, budget = skewed
    again = offload.plan(folder, gpu_memory=budget, max_context=MAX_CONTEXT, device="cpu", heat=skewed_profile.heat)
    assert skewed_profile.tuned.layers == again.layers  # the host budget is free RAM, which moves between calls
    assert skewed_profile.runs[1].plan == skewed_profile.tuned


def test_profile_records_heat_counters_and_time(skewed_profile):
    p = skewed_profile
    assert len(p.heat) == 4 and all(len(row) == 32 for row in p.heat)
    assert sum(map(sum, p.heat)) > 0
    for run in p.runs:
        assert run.decode.steps == 3 * 23  # the first token of each reply comes out of the prefill
        assert run.decode.expert_uses == run.decode.steps * 4 * 2  # top-2 in each of 4 MoE layers
        assert {"attention", "experts", "router"} <= set(run.decode.components)
        assert run.stats["totals"]["prefetch_precision"] is not None
    assert p.fixed_seconds_per_token > 0


# --- the outputs ---

def test_profile_files_round_trip_through_read_heat_and_offload_plan(skewed, skewed_profile, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setattr(profiling, "have_matplotlib", lambda: False)
    written = write_profile(skewed_profile, tmp_path / "new" / "folder")
    assert [path.name for path in written] == ["profile.json", "plan.json", "heatmap.txt"]
    profile_json, plan_json, heatmap = written
    assert read_heat(profile_json) == skewed_profile.heat
    assert Plan.load(plan_json) == skewed_profile.tuned
    data = json.loads(profile_json.read_text())
    assert [row["plan"] for row in data["report"]] == ["default", "tuned"]
    assert {"cost_model", "expert_sizes", "fixed_seconds_per_token", "runs"} <= set(data)
    assert {"layers", "totals", "seconds"} <= set(data["runs"][0]["stats"])
    assert heatmap.read_text().splitlines()[1].startswith("layer 0 ")

    folder, budget = skewed
    result = invoke("plan", folder, "--gpu-memory", budget, "--max-context", MAX_CONTEXT, "--device", "cpu",
                    "--profile", profile_json, "--json")
    assert result.exit_code == 0, result.output
    assert Plan.from_json(result.stdout).layers == skewed_profile.tuned.layers


def test_heat_map_rows_and_shades():
    assert [heat_level(v, 100) for v in (0, 1, 24, 25, 50, 74, 75, 100)] == [0, 1, 1, 2, 3, 3, 4, 4]
    lines = heatmap_text([[0, 10, 100], [50, 0, 0]], [1, 3]).plain.splitlines()
    assert lines[1:3] == ["layer 1  ░█", "layer 3 ▓  "]


# --- the prediction on hand-made numbers ---

def hand_plan(*layers: LayerPlan) -> Plan:
    return Plan(device_budget=0, host_budget=0, max_context=1, expert_format="bf16", device_groups={},
                expert_device_bytes=0, expert_host_bytes=0, layers=layers)


def test_expected_hit_share_counts_pinned_then_the_hottest_others_for_the_cache():
    row = [6, 2, 1, 1]
    assert expected_hit_share((0,), 1, row) == pytest.approx((6 + 2) / 10)
    assert expected_hit_share((3,), 2, row) == pytest.approx((1 + 6 + 2) / 10)
    assert expected_hit_share((), 0, row) == 0
    assert expected_hit_share((), 1, [0, 0, 0, 0]) == pytest.approx(1 / 4)  # no heat: uniform


def test_predict_tokens_per_s_on_known_numbers():
    plan = hand_plan(LayerPlan(0, (0,), 1, 4), LayerPlan(2, (), 0, 4))
    heat = [[6, 2, 1, 1], [1, 1, 1, 1]]
    use = UseCosts(hit_seconds=0.002, miss_seconds=0.010)
    # Layer 0 hits 80%, layer 2 never; top-2 uses per layer: 4 ms + 2 x (0.8 x 2 + 0.2 x 10) ms + 2 x 10 ms
    # = 31.2 ms per token.
    assert predict_tokens_per_s(plan, heat, use, 0.004, top_k=2) == pytest.approx(1 / 0.0312)
    assert predict_hit_rate(plan, heat) == pytest.approx(0.4)
    with pytest.raises(OffloadError, match="profile this model again"):
        predict_tokens_per_s(plan, heat[:1], use, 0.004, top_k=2)


def test_use_costs_come_from_the_measured_run_and_fall_back_to_the_cost_model():
    cost = CostModel(cpu_bytes_per_s=1e9, cpu_flops=1e9, copy_bytes_per_s=1e9, device_flops=1e12)
    sizes = ExpertSizes(host_bytes=10_000_000, device_bytes=20_000_000, flops_per_token=2_000_000_000)
    run = DecodeCounters(steps=10, seconds=1.0, expert_uses=100, hits=60,
                         components={"experts": 0.5, "device_experts": 0.12, "cpu_experts": 0.2})
    assert measured_use_costs(run, cost, sizes) == UseCosts(pytest.approx(0.002), pytest.approx(0.005))
    assert run.non_expert_seconds_per_token == pytest.approx((1.0 - 0.32) / 10)
    all_hits = DecodeCounters(steps=10, seconds=1.0, expert_uses=100, hits=100, components={"device_experts": 0.1})
    # no miss was seen: the cost model prices one (1e7 bytes at 1e9 B/s)
    assert measured_use_costs(all_hits, cost, sizes).miss_seconds == pytest.approx(0.01)
    assert measured_use_costs(all_hits, None, sizes) is None


# --- the command ---

def test_read_prompts_skips_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first\n\n   \n second \n")
    assert read_prompts(path) == ["first", "second"]


def test_profile_command_on_the_demo_checkpoint(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(profiling, "have_matplotlib", lambda: False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is a router?\n\nWhy cache experts?\n")
    out = tmp_path / "profile"
    result = invoke("profile", demo_dir, "--prompts", prompts, "--out", out, "--max-new-tokens", 6,
                    "--device", "cpu", "--gpu-memory", "24MiB", "--max-context", 256)
    assert result.exit_code == 0, result.output
    assert "default" in result.stdout and "tuned" in result.stdout and "predicted" in result.stdout
    assert "layer 3 " in result.stdout  # the heat map, drawn in the terminal without matplotlib
    assert sorted(p.name for p in out.iterdir()) == ["heatmap.txt", "plan.json", "profile.json"]
    assert json.loads((out / "profile.json").read_text())["prompts"] == 2


def test_profile_command_errors(demo_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n")
    common = ("--out", tmp_path / "out", "--device", "cpu")
    assert_one_line_error(invoke("profile", demo_dir, "--prompts", tmp_path / "missing.txt", *common),
                          "cannot read prompts file", "No such file")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    assert_one_line_error(invoke("profile", demo_dir, "--prompts", blank, *common), "no prompts")
    assert_one_line_error(invoke("profile", demo_dir, "--prompts", prompts, *common),
                          "no GPU is visible", "--gpu-memory")
    assert_one_line_error(invoke("profile", demo_dir, "--prompts", prompts, *common, "--gpu-memory", "24MiB",
                                 "--max-new-tokens", 1), "at least 2")
    assert_one_line_error(invoke("profile", demo_dir, "--prompts", prompts, *common, "--gpu-memory", "24MiB",
                                 "--max-context", 8, "--max-new-tokens", 8), "exceeds max_context=8")



def test_text_prompts_need_a_tokenizer(skewed):
    folder, budget = skewed
    with pytest.raises(OffloadError, match="no tokenizer.json"):
        run_profile(folder, ["hello"], 4, device="cpu", gpu_memory=budget)


def test_a_budget_that_pins_every_expert_measures_without_predicting(skewed, tmp_path):
    folder, _ = skewed
    profile = run_profile(folder, [[5, 6, 7]], 3, device="cpu", max_context=MAX_CONTEXT, gpu_memory="1GiB")
    assert profile.cost is None and [r.predicted_tokens_per_s for r in profile.report] == [None, None]
    assert [r.hit_rate for r in profile.report] == [1.0, 1.0]
    assert json.loads(write_profile(profile, tmp_path)[0].read_text())["cost_model"] is None


def test_heat_map_picture_with_matplotlib(skewed_profile, tmp_path):
    pytest.importorskip("matplotlib")
    written = write_profile(skewed_profile, tmp_path)
    assert written[-1].name == "heatmap.png" and written[-1].read_bytes().startswith(b"\x89PNG")

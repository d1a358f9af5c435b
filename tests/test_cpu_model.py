"""Whole models with their routed experts on the CPU workers (device="cpu", experts=bf16/int8/int4) against
transformers. bf16 holds a bf16 checkpoint exactly, so it matches like the reference path; int8 and int4 stay
within the bounds measured on these tiny models (docs/formats.md, "Whole-model error")."""
from __future__ import annotations

import pytest
import torch

import offload
from tiny_models import build_reference, share_within

IDS = torch.arange(3, 27)
# (max |logit error| / max |logit|, least share of positions whose argmax agrees), measured worst case x ~2-3
# (int8's top-1 share: the random tiny models have near-tie argmaxes; GLM-4.5's agrees at 21 of 24 positions whose
# logits are within 0.7%.)
BOUNDS = {"bf16": (1e-4, 1.0), "int8": (4e-2, 0.85), "int4": (0.6, 0.6), "int4s": (0.6, 0.6)}
# Least share of positions within that error: int8 may flip a near-tie router choice at a position or two.
MIN_WITHIN = {"bf16": 1.0, "int8": 0.9, "int4": 1.0, "int4s": 1.0}


@pytest.fixture(scope="module")
def bf16_reference(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(name):
        if name not in cache:
            folder = tmp_path_factory.mktemp(f"{name}_bf16_ckpt")
            build_reference(name).to(torch.bfloat16).save_pretrained(folder)
            ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            with torch.no_grad():
                cache[name] = (folder, ref, ref(IDS[None]).logits[0])
        return cache[name]

    return get


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
                                  "glm4_moe", "minimax_m2", "dots1", "deepseek_v32", "glm_moe_dsa", "ernie4_5_moe",
                                  "hunyuan_v1_moe", "gpt_oss"])
def test_cpu_experts_model_matches_transformers(bf16_reference, name, fmt):
    check_cpu_experts_model(bf16_reference, name, fmt)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_cpu_int4s_experts_model_matches_transformers(bf16_reference, name):
    """Symmetric int4 (Q4_0's grid) within int4's bound: the GQA, MLA, and biased clamped-SwiGLU expert paths."""
    check_cpu_experts_model(bf16_reference, name, "int4s")


def assert_within_bounds(model, expected: torch.Tensor, fmt: str, ids: torch.Tensor) -> None:
    """Prefill and step-by-step logits of `model` for `ids` within BOUNDS[fmt] of `expected` (transformers')."""
    max_err, min_top1 = BOUNDS[fmt]
    prefill = model.logits(ids)
    with torch.inference_mode():
        steps = torch.cat([model.transformer(ids[i : i + 1], i) for i in range(len(ids))])
    for got in (prefill, steps):
        assert share_within(got, expected, max_err) >= MIN_WITHIN[fmt]
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() >= min_top1


def check_cpu_experts_model(bf16_reference, name: str, fmt: str) -> None:
    """Prefill and step-by-step logits with `fmt` experts within BOUNDS of transformers' (bf16 also greedy)."""
    folder, ref, expected = bf16_reference(name)
    model = offload.load(folder, device="cpu", experts=fmt, max_context=64)
    assert_within_bounds(model, expected, fmt, IDS)
    if fmt == "bf16":
        with torch.no_grad():
            out = ref.generate(IDS[:6][None], max_new_tokens=16, do_sample=False, eos_token_id=None,
                               pad_token_id=0, attention_mask=torch.ones(1, 6, dtype=torch.long))
        assert model.generate(IDS[:6].tolist(), max_new_tokens=16, ignore_eos=True).token_ids == out[0, 6:].tolist()


def test_cpu_experts_report_jit_time_and_threads(bf16_reference):
    from csrc_py.threads import set_threads

    folder, _, _ = bf16_reference("mixtral")
    try:
        model = offload.load(folder, device="cpu", experts="int8", cpu_threads=1)
        assert model.load_info.cpu_threads == 1 and torch.get_num_threads() == 1
    finally:
        set_threads(None)  # back to the default for the tests that follow
    assert model.load_info.jit_seconds > 0
    assert model.stats()["load"]["jit_seconds"] == model.load_info.jit_seconds


def test_unknown_expert_format_is_a_clear_error(bf16_reference):
    folder, _, _ = bf16_reference("mixtral")
    with pytest.raises(offload.OffloadError, match="experts must be one of bf16, int8, int4"):
        offload.load(folder, device="cpu", experts="fp8")

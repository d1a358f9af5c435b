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

"""Every architecture and variant matches transformers: prefill logits, step-by-step decode, greedy tokens."""
from __future__ import annotations

import pytest
import torch

import offload
from tiny_models import VARIANTS


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def prompt(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_prefill_and_decode_logits_match_transformers(checkpoint_dir, name):
    folder, ref = checkpoint_dir(name)
    model = offload.load(folder, device="cpu", max_context=64)
    ids = prompt(24)
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    prefill = model.logits(ids)
    assert prefill.shape == (24, 96)
    assert rel_err(prefill, expected) <= 1e-4

    with torch.inference_mode():  # one token at a time through the cache
        steps = torch.cat([model.transformer(ids[i : i + 1], i) for i in range(len(ids))])
        chunks = torch.cat([model.transformer(ids[:10], 0), model.transformer(ids[10:], 10)])  # chunked prefill
    assert rel_err(steps, expected) <= 1e-4
    assert rel_err(chunks, expected) <= 1e-4


def reference_greedy(ref, ids: torch.Tensor, max_new_tokens: int, stop_at_eos: bool) -> list[int]:
    config = ref.generation_config
    with torch.no_grad():
        out = ref.generate(ids[None], max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                           eos_token_id=config.eos_token_id if stop_at_eos else None,
                           attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_greedy_tokens_match_transformers_generate(checkpoint_dir, name):
    folder, ref = checkpoint_dir(name)
    model = offload.load(folder, device="cpu", max_context=64)
    ids = prompt(8, seed=2)
    got = model.generate(ids.tolist(), max_new_tokens=32, ignore_eos=True)
    assert got.token_ids == reference_greedy(ref, ids, 32, stop_at_eos=False)
    assert got.finish_reason == "length"
    assert got.stats.generated_tokens == 32 and got.stats.prompt_tokens == 8


@pytest.mark.parametrize("name", ["deepseek_v3_no_interleave", "mixtral_window_linear_rope"])
def test_generation_stops_at_eos_like_transformers(checkpoint_dir, name):
    """These two variants reach an eos id within 32 greedy tokens from this prompt."""
    folder, ref = checkpoint_dir(name)
    model = offload.load(folder, device="cpu", max_context=64)
    ids = prompt(8, seed=2)
    expected = reference_greedy(ref, ids, 32, stop_at_eos=True)
    got = model.generate(ids.tolist(), max_new_tokens=32)
    assert len(expected) < 32 and expected[-1] in model.eos_token_ids
    assert got.token_ids == expected
    assert got.finish_reason == "stop"


def test_routing_is_decisive_in_the_tiny_models(checkpoint_dir):
    """Guard for the tests above: routing margins far above float noise, so a routing bug changes logits."""
    folder, _ = checkpoint_dir("mixtral")
    model = offload.load(folder, device="cpu")
    moe = model.transformer.layers[1].mlp
    h = torch.randn(64, 64)
    probs = (h @ moe.router.T).softmax(-1).sort(dim=-1, descending=True).values
    gap = probs[:, 1] - probs[:, 2]  # between the last chosen and the first rejected expert
    assert gap.median() > 1e-3


@pytest.mark.parametrize("name", ["deepseek_v2", "deepseek_v3", "deepseek_v2_group_yarn"])
def test_mla_absorbed_form_equals_naive_form(checkpoint_dir, name):
    folder, _ = checkpoint_dir(name)
    model = offload.load(folder, device="cpu", max_context=64)
    mla = model.transformer.layers[0].attn
    rope = model.transformer.rope
    x = torch.randn(12, 64)
    results = []
    for absorbed in (False, True):
        cache = mla.new_cache(64, torch.float32, torch.device("cpu"))
        with torch.inference_mode():
            first = mla(x[:9], 0, cache, rope, absorbed=absorbed)  # multi-token prefill
            rest = [mla(x[i : i + 1], i, cache, rope, absorbed=absorbed) for i in range(9, 12)]  # decode
        results.append(torch.cat([first, *rest]))
    assert rel_err(results[1], results[0]) <= 1e-5


def test_mla_cache_holds_the_latent_not_expanded_kv(checkpoint_dir):
    folder, _ = checkpoint_dir("deepseek_v3")
    model = offload.load(folder, device="cpu", max_context=32)
    cache = model.transformer.caches[0]
    mla = model.config.mla
    assert cache.c_kv.shape == (32, mla.kv_lora_rank)
    assert cache.k_rope.shape == (32, mla.qk_rope_head_dim)
    assert not hasattr(cache, "k")

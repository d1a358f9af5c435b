"""Prompt-cache reuse: a prompt sharing a prefix with what the caches hold resumes there, and gives the logits and
tokens of a cold run; anything that leaves the caches half-written leaves nothing to reuse."""
from __future__ import annotations

import pytest
import torch

import offload
from offload.demo import random_demo_checkpoint
from offload.generate import common_prefix_length, resume_position
from tiny_models import rel_err


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return offload.load(random_demo_checkpoint(tmp_path_factory.mktemp("cache")), device="cpu", max_context=256)


def resumed_logits(model, ids: list[int]) -> tuple[int, torch.Tensor]:
    """(resume position, last-token logits [V]) of a prefill of ids on top of whatever the caches hold."""
    start = resume_position(model.transformer, ids)
    with torch.inference_mode():
        logits = model.transformer(torch.tensor(ids[start:]), start, last_only=True)[0]
    return start, logits


def test_common_prefix_length_stops_at_the_first_difference_and_the_limit():
    assert common_prefix_length([1, 2, 3, 4], [1, 2, 9, 4], 10) == 2
    assert common_prefix_length([1, 2, 3], [1, 2, 3, 4, 5], 10) == 3
    assert common_prefix_length([1, 2, 3, 4], [1, 2, 3, 4], 3) == 3
    assert common_prefix_length([], [1], 0) == 0


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3", "mixtral_window_linear_rope"])
def test_a_resumed_prefill_gives_the_cold_logits(checkpoint_dir, name):
    """GQA, MLA's latent cache and a sliding window: the prefill of the new tokens over the cached prefix equals
    a prefill of the whole sequence."""
    folder, _ = checkpoint_dir(name)
    model = offload.load(folder, device="cpu", max_context=64)
    first = list(range(3, 23))
    second = first[:14] + list(range(40, 52))  # shares 14 tokens, then differs
    model.generate(first, max_new_tokens=4, ignore_eos=True)
    start, logits = resumed_logits(model, second)
    assert start == 14
    cold = model.logits(second)[-1]
    assert rel_err(logits, cold) < 1e-5


@pytest.mark.parametrize("name", ["qwen3_next", "deepseek_v32"])
def test_a_continued_sequence_resumes_where_the_caches_stand(checkpoint_dir, name):
    """Gated DeltaNet's recurrent state (beside full attention) and DeepSeek Sparse Attention's indexer keys:
    a prompt that continues what was processed resumes at its end, with the cold logits; one that differs
    earlier restarts where every layer can (a recurrent state only where it stands, else at 0)."""
    folder, _ = checkpoint_dir(name)
    model = offload.load(folder, device="cpu", max_context=64)
    first = list(range(3, 23))
    g = model.generate(first, max_new_tokens=4, ignore_eos=True)
    held = first + g.token_ids[:-1]
    follow = first + g.token_ids + list(range(40, 46))
    start, logits = resumed_logits(model, follow)
    assert start == len(held)
    assert rel_err(logits, model.logits(follow)[-1]) < 1e-4
    differs = first[:10] + list(range(60, 70))
    recurrent = name == "qwen3_next"
    again = model.generate(differs, max_new_tokens=4, ignore_eos=True)
    assert again.stats.cached_prompt_tokens == (0 if recurrent else 10)
    assert again.token_ids == model.generate(differs, max_new_tokens=4, ignore_eos=True, reuse_cache=False).token_ids


def test_the_second_chat_turn_computes_only_its_new_tokens(model):
    turn1 = [{"role": "user", "content": "What does the router do?"}]
    first = model.chat(turn1, max_new_tokens=12, ignore_eos=True)
    assert first.stats.cached_prompt_tokens == 0
    turn2 = turn1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And the cache?"}]
    prompt2 = model.chat_prompt(turn2)
    held = list(model.transformer.cached_ids)
    common = common_prefix_length(held, prompt2, len(prompt2) - 1)
    assert common >= len(model.chat_prompt(turn1))  # at least the first prompt (the reply too, where it
    # re-tokenizes to the ids it was generated as: random weights often produce text that does not)
    before = model.stats()["prompt_cache"]
    second = model.chat(turn2, max_new_tokens=12, ignore_eos=True)
    s = second.stats
    assert (s.cached_prompt_tokens, s.computed_prompt_tokens) == (common, len(prompt2) - common)
    after = model.stats()["prompt_cache"]
    assert after["reused_tokens"] - before["reused_tokens"] == common
    assert after["computed_tokens"] - before["computed_tokens"] == len(prompt2) - common
    assert model.stats()["last_generation"]["cached_prompt_tokens"] == common
    cold = model.chat(turn2, max_new_tokens=12, ignore_eos=True, reuse_cache=False)
    assert cold.stats.cached_prompt_tokens == 0 and cold.token_ids == second.token_ids


def test_the_last_prompt_token_is_always_recomputed(model):
    ids = model.encode("the same prompt twice")
    model.generate(ids, max_new_tokens=3, ignore_eos=True)
    again = model.generate(ids, max_new_tokens=3, ignore_eos=True)
    assert again.stats.cached_prompt_tokens == len(ids) - 1 and again.stats.computed_prompt_tokens == 1


def test_a_closed_stream_leaves_its_tokens_reusable_and_exact(model):
    prompt = model.encode("An interrupted reply")
    with model.stream(prompt, max_new_tokens=20, ignore_eos=True) as run:
        for _ in zip(range(5), run):
            pass
    assert run.result.finish_reason == "interrupted"
    produced = run.result.token_ids
    # The caches hold the prompt and every generated token fed back so far (not the last, only sampled).
    assert model.transformer.cached_ids == prompt + produced[:-1]
    follow = prompt + produced + model.encode(" then more")
    start, logits = resumed_logits(model, follow)
    assert start == len(prompt) + len(produced) - 1
    assert rel_err(logits, model.logits(follow)[-1]) < 1e-5


def test_a_step_that_fails_half_way_leaves_nothing_to_reuse(model, monkeypatch):
    ids = model.encode("A step that fails")
    model.generate(ids, max_new_tokens=2, ignore_eos=True)
    layer = model.transformer.layers[-1]
    calls = {"n": 0}
    forward = layer.forward

    def fail_on_the_second_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of a decode step: earlier layers were written
        return forward(*args, **kwargs)

    monkeypatch.setattr(layer, "forward", fail_on_the_second_step)
    with pytest.raises(KeyboardInterrupt):
        model.generate(ids + model.encode(" more"), max_new_tokens=5, ignore_eos=True)
    monkeypatch.undo()
    assert model.transformer.cached_ids == []
    again = model.generate(ids, max_new_tokens=6, ignore_eos=True)
    assert again.stats.cached_prompt_tokens == 0
    assert again.token_ids == model.generate(ids, max_new_tokens=6, ignore_eos=True, reuse_cache=False).token_ids


def test_the_loop_resumes_where_the_caches_say(model, monkeypatch):
    """A cache kind that can only resume at saved points (a recurrent state) answers resume_point with less than
    the common prefix; the loop recomputes from there and the tokens stay those of a cold run."""
    ids = model.encode("Resume only at multiples of four, please")
    model.generate(ids, max_new_tokens=2, ignore_eos=True)
    monkeypatch.setattr(model.transformer.caches[0], "resume_point", lambda common: common // 4 * 4, raising=False)
    g = model.generate(ids + model.encode(" yes"), max_new_tokens=6, ignore_eos=True)
    assert g.stats.cached_prompt_tokens == (len(ids) + 1) // 4 * 4
    monkeypatch.undo()
    cold = model.generate(ids + model.encode(" yes"), max_new_tokens=6, ignore_eos=True, reuse_cache=False)
    assert g.token_ids == cold.token_ids


def test_logits_of_another_sequence_replace_what_is_held(model):
    a, b = model.encode("first sequence here"), model.encode("second one instead")
    model.generate(a, max_new_tokens=2, ignore_eos=True)
    model.logits(b)
    assert model.transformer.cached_ids == b
    g = model.generate(a, max_new_tokens=4, ignore_eos=True)
    assert g.stats.cached_prompt_tokens == common_prefix_length(a, b, len(a) - 1)

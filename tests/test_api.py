"""The Python API and `offload demo` end to end on the built-in demo checkpoint (random weights, real tokenizer)."""
from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import offload
from offload.cli import app
from offload.demo import random_demo_checkpoint
from offload.errors import ContextLengthError, OffloadError


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return random_demo_checkpoint(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def model(demo_dir):
    return offload.load(demo_dir, device="cpu", max_context=128)


def test_demo_checkpoint_is_a_real_hub_folder_that_transformers_agrees_with(demo_dir, model):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()
    ids = torch.arange(10, 40)
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    got = model.logits(ids)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-4


def test_demo_model_stops_on_its_chat_end_token(model):
    end = model.tokenizer.encode("<|end|>", add_special_tokens=False)
    assert len(end) == 1 and end[0] in model.eos_token_ids
    assert model.tokenizer.eos_token_id in model.eos_token_ids


def test_demo_checkpoint_is_built_once(demo_dir):
    before = (demo_dir / "model.safetensors").stat().st_mtime_ns
    assert random_demo_checkpoint(demo_dir.parent) == demo_dir
    assert (demo_dir / "model.safetensors").stat().st_mtime_ns == before
    assert not [p for p in demo_dir.parent.iterdir() if p.name.startswith(".demo-")]


def test_stream_yields_the_generated_text(model):
    run = model.stream("The router picks", max_new_tokens=24, ignore_eos=True)
    pieces = list(run)
    full = model.generate("The router picks", max_new_tokens=24, ignore_eos=True)
    assert "".join(pieces) == full.text == run.result.text
    assert run.result.token_ids == full.token_ids and len(full.token_ids) == 24
    assert full.text == model.tokenizer.decode(full.token_ids)


def test_stop_string_cuts_the_text_before_it(model):
    full = model.generate("Hello", max_new_tokens=30, ignore_eos=True)
    stop = full.text[len(full.text) // 2 :][:3]
    assert stop, "the greedy continuation is empty"
    cut = model.generate("Hello", max_new_tokens=30, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert "".join(model.stream("Hello", max_new_tokens=30, ignore_eos=True, stop=stop)) == cut.text


def test_seeded_sampling_is_reproducible(model):
    kwargs = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9, ignore_eos=True)
    a = model.generate("Numbers:", seed=7, **kwargs)
    b = model.generate("Numbers:", seed=7, **kwargs)
    c = model.generate("Numbers:", seed=8, **kwargs)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_chat_applies_the_template(model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ids = model.chat_prompt(messages)
    text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == model.tokenizer.encode(text, add_special_tokens=False)
    assert model.chat(messages, max_new_tokens=8, ignore_eos=True).token_ids == \
        model.generate(ids, max_new_tokens=8, ignore_eos=True).token_ids
    assert "".join(model.chat_stream(messages, max_new_tokens=8, ignore_eos=True)) == \
        model.chat(messages, max_new_tokens=8, ignore_eos=True).text


def test_prompt_beyond_max_context_is_a_clear_error(model):
    with pytest.raises(ContextLengthError, match="max_context=128"):
        model.generate(list(range(100)), max_new_tokens=29)
    assert len(model.generate(list(range(100)), max_new_tokens=28, ignore_eos=True).token_ids) == 28


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    result = CliRunner().invoke(app, ["generate", str(tmp_path / "missing"), "--prompt", "hi"])
    assert result.exit_code == 2
    assert "is not a folder" in result.output
    assert "Traceback" not in result.output


def test_load_reports_progress_in_bytes(demo_dir):
    calls = []
    model = offload.load(demo_dir, device="cpu", on_progress=lambda done, total, name: calls.append((done, total, name)))
    assert calls and calls[-1][0] == calls[-1][1] == model.load_info.checkpoint_bytes
    assert all(a[0] < b[0] for a, b in zip(calls, calls[1:]))
    assert {name for _, _, name in calls} == {"model.safetensors"}


def test_routing_heat_counts_every_choice(model):
    model.reset_stats()
    g = model.generate(list(range(5, 15)), max_new_tokens=6, ignore_eos=True)
    heat = model.routing_heat()
    cfg = model.config
    assert len(heat) == cfg.num_moe_layers and all(len(row) == cfg.router.num_experts for row in heat)
    positions = 10 + len(g.token_ids) - 1  # the last sampled token is never fed back
    assert all(sum(row) == positions * cfg.router.top_k for row in heat)
    model.reset_stats()
    assert all(sum(row) == 0 for row in model.routing_heat())


def test_two_threads_on_one_model_get_the_single_thread_outputs(model):
    prompts = [list(range(10, 30)), list(range(200, 212))]
    kwargs = dict(max_new_tokens=12, ignore_eos=True)
    alone = [model.generate(p, **kwargs).token_ids for p in prompts]
    logits_alone = model.logits(prompts[0])
    start = threading.Barrier(2)
    got: dict[int, list] = {0: [], 1: []}

    def worker(i: int) -> None:
        start.wait()
        for _ in range(3):
            got[i].append(model.generate(prompts[i], **kwargs).token_ids)
            got[i].append("".join(model.stream(prompts[i], **kwargs)))
            got[i].append(model.logits(prompts[0]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        text = model.tokenizer.decode(alone[i])
        for ids, streamed, logits in zip(got[i][0::3], got[i][1::3], got[i][2::3]):
            assert ids == alone[i] and streamed == text
            assert torch.equal(logits, logits_alone)


def test_a_stream_holds_the_model_until_it_is_exhausted(model):
    """Another thread's generate waits for a half-read stream; the stream's tokens are those of a run alone."""
    kwargs = dict(max_new_tokens=16, ignore_eos=True)
    expected_a = model.generate("The router picks", **kwargs)
    expected_b = model.generate("Numbers:", **kwargs)
    run = model.stream("The router picks", **kwargs)
    first = next(run)
    other: list = []
    thread = threading.Thread(target=lambda: other.append(model.generate("Numbers:", **kwargs)))
    thread.start()
    rest = "".join(run)
    thread.join()
    assert first + rest == expected_a.text and run.result.token_ids == expected_a.token_ids
    assert other[0].token_ids == expected_b.token_ids


def test_a_call_in_the_thread_of_an_unfinished_stream_is_an_error_not_a_hang(model):
    run = model.stream("Hello", max_new_tokens=16, ignore_eos=True)
    next(run)
    with pytest.raises(OffloadError, match="unfinished stream"):
        model.generate("Hello", max_new_tokens=2)
    run.close()
    assert run.result.finish_reason == "interrupted" and 0 < len(run.result.token_ids) < 16
    assert len(model.generate("Hello", max_new_tokens=2, ignore_eos=True).token_ids) == 2


def test_an_interrupted_stream_reports_interrupted(model, monkeypatch):
    with model.stream("Hello", max_new_tokens=16, ignore_eos=True) as run:
        next(run)
    assert run.result.finish_reason == "interrupted"  # left the with block early

    import offload.generate as generate

    real = generate.check_finite  # once a token, on every path
    calls = []

    def ctrl_c_on_the_fifth_token(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(generate, "check_finite", ctrl_c_on_the_fifth_token)
    run = model.stream("Hello", max_new_tokens=16, ignore_eos=True)
    with pytest.raises(KeyboardInterrupt):
        for _ in run:
            pass
    assert run.result.finish_reason == "interrupted" and len(run.result.token_ids) == 4
    monkeypatch.undo()
    assert model.generate("Hello", max_new_tokens=3, ignore_eos=True).finish_reason == "length"  # released


def test_generate_json_interrupted_prints_the_partial_result_and_exits_130(demo_dir, monkeypatch):
    import offload.generate as generate

    real = generate.check_finite  # once a token, on every path
    calls = []

    def ctrl_c_on_the_fourth_token(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(generate, "check_finite", ctrl_c_on_the_fourth_token)
    result = CliRunner().invoke(app, ["generate", str(demo_dir), "--device", "cpu", "--prompt", "Hello",
                                      "--max-new-tokens", "20", "--ignore-eos", "--json"])
    assert result.exit_code == 130
    printed = json.loads(result.stdout)
    assert printed["finish_reason"] == "interrupted" and len(printed["token_ids"]) == 3
    assert printed["stats"]["generated_tokens"] == 3


def test_nan_in_the_weights_stops_generation_with_a_clear_error(demo_dir, tmp_path):
    folder = tmp_path / "nan"
    shutil.copytree(demo_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj.weight"
    tensors[name][0, :4] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    model = offload.load(folder, device="cpu", max_context=64)
    with pytest.raises(OffloadError, match="logits at position .* hold NaN or inf.*weights probably contain NaN"):
        model.generate(list(range(10, 40)), max_new_tokens=8)
    result = CliRunner().invoke(app, ["generate", str(folder), "--device", "cpu", "--prompt", "Hello world, how are "
                                      "you today? The quick brown fox", "--max-new-tokens", "8"])
    assert result.exit_code == 2 and "NaN or inf" in result.output and "Traceback" not in result.output


def test_demo_says_how_it_samples_and_takes_other_values():
    from offload.demo import demo_model

    result = CliRunner().invoke(app, ["demo", "--device", "cpu", "--max-new-tokens", "12", "--top-k", "0",
                                      "--repetition-penalty", "1.0"])
    assert result.exit_code == 0, result.output
    assert "sampling: greedy, top-k off, repetition penalty 1 " in result.stderr
    question = "What is a list comprehension?"
    expected = offload.load(demo_model(), device="cpu", max_context=256).chat(
        [{"role": "user", "content": question}], max_new_tokens=12)
    assert result.stdout == f"user: {question}\nassistant: {expected.text}\n"
    default = CliRunner().invoke(app, ["demo", "--device", "cpu", "--max-new-tokens", "1"])
    assert "sampling: greedy, top-k 40, repetition penalty 1.3 " in default.stderr


def test_chat_takes_a_repetition_penalty_and_stop_strings(demo_dir, model):
    messages = [{"role": "user", "content": "What is a router?"}]
    sampling = dict(max_new_tokens=24, repetition_penalty=1.3)
    full = model.chat(messages, **sampling)
    stop = full.text[len(full.text) // 2:][:3]
    assert stop.strip(), "the greedy reply is too short to cut"
    cut = model.chat(messages, stop=stop, **sampling)
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    result = CliRunner().invoke(app, ["chat", str(demo_dir), "--device", "cpu", "--max-context", "128",
                                      "--temperature", "0", "--max-new-tokens", "24", "--repetition-penalty", "1.3",
                                      "--stop", stop, "--prompt", "What is a router?"])
    assert result.exit_code == 0, result.output
    assert result.stdout == cut.text + "\n" and "finish: stop" in result.stderr


def test_greedy_generation_applies_a_repetition_penalty(model):
    """A greedy token comes from the finiteness pass only without a penalty; with one, generate must sample from
    the penalised scores: with a huge penalty no token of the prompt or of the reply comes back."""
    prompt = "the the the the"
    ids = model.tokenizer.encode(prompt)
    plain = model.generate(prompt, max_new_tokens=24, temperature=0, ignore_eos=True).token_ids
    seen = set(ids) | set(plain)
    assert len(seen) < len(ids) + len(plain), "precondition: the plain greedy reply repeats a token"
    penalised = model.generate(prompt, max_new_tokens=24, temperature=0, repetition_penalty=1e6,
                               ignore_eos=True).token_ids
    assert len(set(ids) | set(penalised)) == len(set(ids)) + len(penalised)

"""Bad input is one line and exit code 2, found before a weight is read: checks.py, the CLI's one error path,
config translation and the chat template's bounds."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

import offload
import offload.chat_template as chat_template
from offload.checks import default_max_context
from offload.demo import random_demo_checkpoint
from offload.errors import CheckpointError, OffloadError
from test_cli import assert_one_line_error, invoke

GiB = 2**30


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return random_demo_checkpoint(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command gets as far as loading weights."""
    def load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the bad input was reported")

    monkeypatch.setattr(offload, "load", load)


def with_config(source: Path, folder: Path, **changes) -> Path:
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# --- cheap checks before any weight is read ---

@pytest.mark.parametrize("option, value, message", [
    ("--temperature", "-1", "temperature must be"),
    ("--top-p", "0", "top_p must be in (0, 1]"),
    ("--top-p", "1.5", "top_p must be in (0, 1]"),
    ("--top-k", "-3", "top_k must be an integer >= 0"),
    ("--repetition-penalty", "0", "repetition_penalty must be"),
    ("--max-new-tokens", "0", "max_new_tokens must be at least 1"),
    ("--prompt", "", "the prompt is empty"),
    ("--max-context", "0", "max_context must be positive"),
])
def test_generate_rejects_bad_values_before_loading(demo_dir, no_loading, option, value, message):
    args = ["--prompt", "hello", option, value] if option != "--prompt" else [option, value]
    assert_one_line_error(invoke("generate", demo_dir, "--device", "cpu", *args), message)


def test_a_prompt_longer_than_the_context_is_reported_before_loading(demo_dir, no_loading):
    result = invoke("generate", demo_dir, "--max-context", "16", "--prompt", "word " * 40)
    assert_one_line_error(result, "exceeds max_context=16")
    result = invoke("bench", demo_dir, "--max-context", "64", "--prompt-tokens", "100")
    assert_one_line_error(result, "max_context=64")
    result = invoke("chat", demo_dir, "--max-context", "64", "--prompt", "word " * 100, "--max-new-tokens", "8")
    assert_one_line_error(result, "max_context=64")
    result = invoke("chat", demo_dir, "--max-context", "64", "--top-p", "2")
    assert_one_line_error(result, "top_p")


def test_profile_checks_its_prompts_before_loading(demo_dir, no_loading, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("short\n" + "word " * 300 + "\n")
    result = invoke("profile", demo_dir, "--prompts", prompts, "--out", tmp_path / "out", "--gpu-memory", "8MiB",
                    "--max-context", "128")
    assert_one_line_error(result, "exceeds max_context=128")


def test_text_prompt_without_a_tokenizer_names_prompt_ids(checkpoint_dir, no_loading):
    folder, _ = checkpoint_dir("mixtral")
    assert_one_line_error(invoke("generate", folder, "--prompt", "hi"), "no tokenizer.json", "--prompt-ids")


def test_prompt_ids_generate_without_a_tokenizer(checkpoint_dir):
    folder, _ = checkpoint_dir("mixtral")
    result = invoke("generate", folder, "--device", "cpu", "--prompt-ids", "3, 4,5", "--max-new-tokens", "4",
                    "--ignore-eos", "--json")
    assert result.exit_code == 0, result.output
    expected = offload.load(folder, device="cpu").generate([3, 4, 5], max_new_tokens=4, ignore_eos=True)
    assert json.loads(result.stdout)["token_ids"] == expected.token_ids


def test_token_ids_outside_the_vocabulary(checkpoint_dir):
    folder, _ = checkpoint_dir("mixtral")  # vocab_size 96
    assert_one_line_error(invoke("generate", folder, "--prompt-ids", "3,96"), "token id 96", "0 to 95")
    assert_one_line_error(invoke("generate", folder, "--prompt-ids", "3,x"), "--prompt-ids", "1,2,3")
    model = offload.load(folder, device="cpu")
    for bad in ([1, 96], [-1]):
        with pytest.raises(OffloadError, match="outside the vocabulary"):
            model.generate(bad, max_new_tokens=2)
        with pytest.raises(OffloadError, match="outside the vocabulary"):
            model.logits(bad)


# --- max_context: the default, the position limit, the memory it needs ---

def test_default_max_context_is_the_same_for_every_command(checkpoint_dir, tmp_path):
    folder, _ = checkpoint_dir("mixtral")  # 256 positions
    assert default_max_context(offload.load(folder, device="cpu").config) == 256
    assert offload.load(folder, device="cpu").max_context == 256
    assert offload.plan(folder, gpu_memory="64MiB", device="cpu").max_context == 256
    result = invoke("plan", folder, "--gpu-memory", "64MiB", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["max_context"] == 256


def test_a_context_past_the_position_limit_warns(checkpoint_dir, caplog):
    folder, _ = checkpoint_dir("mixtral")
    with caplog.at_level(logging.WARNING, logger="offload"):
        model = offload.load(folder, device="cpu", max_context=300)
    assert model.max_context == 300 and "exceeds the model's 256 positions" in caplog.text


def test_a_yarn_rope_cannot_run_past_its_scaled_length(checkpoint_dir):
    folder, _ = checkpoint_dir("deepseek_v3")  # YaRN, 256 positions
    with pytest.raises(OffloadError, match="YaRN rope is scaled for.*rope factor"):
        offload.load(folder, device="cpu", max_context=257)
    assert offload.load(folder, device="cpu", max_context=256).max_context == 256


def test_a_context_that_cannot_fit_in_memory_fails_fast_naming_the_bytes(demo_dir, tmp_path, monkeypatch):
    result = invoke("generate", demo_dir, "--device", "cpu", "--max-context", "1000000000", "--prompt", "hi")
    assert_one_line_error(result, "max_context 1000000000 needs", "GiB", "lower max_context")
    small = with_config(demo_dir, tmp_path / "small", max_position_embeddings=2048)
    monkeypatch.setattr("psutil.virtual_memory", lambda: SimpleNamespace(available=2 * GiB))
    result = invoke("generate", small, "--device", "cpu", "--max-context", "2000000", "--prompt", "hi")
    line = assert_one_line_error(result, "max_context 2000000 needs", "2.0 GiB of RAM is free", "fits")
    fits = int(line.split("at most ")[1].split()[0])
    assert 2048 < fits < 2000000


def test_a_bf16_kv_cache_fits_about_twice_the_context_and_the_error_says_so(demo_dir, tmp_path, monkeypatch):
    small = with_config(demo_dir, tmp_path / "small", max_position_embeddings=2048)
    monkeypatch.setattr("psutil.virtual_memory", lambda: SimpleNamespace(available=2 * GiB))
    fits = {}
    for kv_cache in ("float32", "bf16"):
        result = invoke("generate", small, "--device", "cpu", "--max-context", "2000000", "--kv-cache", kv_cache,
                        "--prompt", "hi")
        line = assert_one_line_error(result, "max_context 2000000 needs", "lower max_context")
        fits[kv_cache] = int(line.split("at most ")[1].split()[0])
        assert ("--kv-cache bf16" in line) == (kv_cache == "float32")
    assert 1.8 < fits["bf16"] / fits["float32"] <= 2  # the rope table stays float32


def test_a_store_larger_than_free_ram_loads_memory_mapped(checkpoint_dir, tmp_path, monkeypatch):
    """A store's packed experts stay memory-mapped, so only what loading copies is held against free RAM."""
    from offload.checks import resident_weight_bytes
    from offload.weights.checkpoint import Checkpoint

    folder, _ = checkpoint_dir("qwen3_moe")
    store = offload.convert(folder, tmp_path / "store", experts="int8")
    checkpoint = Checkpoint(store)
    resident = resident_weight_bytes(checkpoint)
    assert resident < checkpoint.nbytes()
    free = resident + (checkpoint.nbytes() - resident) // 2  # less than the store, more than what is copied
    monkeypatch.setattr("psutil.virtual_memory", lambda: SimpleNamespace(available=free))
    offload.load(store, device="cpu", max_context=8)
    with pytest.raises(OffloadError, match="of RAM is free"):
        offload.load(folder, device="cpu", max_context=8)  # the same model unpacked is copied whole


# --- one error path: I/O errors ---

def test_convert_onto_a_full_disk_is_one_line(demo_dir, tmp_path, monkeypatch):
    import offload.weights.store as store

    def full(path, tensors, jobs, metadata):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(store, "write_safetensors", full)
    result = invoke("convert", demo_dir, tmp_path / "out", "--experts", "int8")
    assert_one_line_error(result, str(tmp_path / "out"), "the disk is full", "free space")
    result = invoke("--debug", "convert", demo_dir, tmp_path / "out2", "--experts", "int8")
    assert isinstance(result.exception, OSError) and result.exception.errno == errno.ENOSPC


def test_convert_onto_a_read_only_file_system_is_one_line(demo_dir, tmp_path, monkeypatch):
    import offload.weights.store as store

    def read_only(path, tensors, jobs, metadata):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(store, "write_safetensors", read_only)
    assert_one_line_error(invoke("convert", demo_dir, tmp_path / "out", "--experts", "int8"), "read-only")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_convert_into_a_folder_without_write_permission_is_one_line(demo_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = invoke("convert", demo_dir, locked / "out", "--experts", "int8")
    finally:
        locked.chmod(0o700)
    assert_one_line_error(result, "permission denied")


# --- checkpoints: config keys ---

@pytest.mark.parametrize("name, keys", [("qwen3_moe", ("num_experts", "num_local_experts")),
                                        ("mixtral", ("num_local_experts", "num_experts")),
                                        ("deepseek_v3", ("n_routed_experts",))])
def test_a_config_without_the_expert_count_is_named(checkpoint_dir, tmp_path, name, keys):
    folder, _ = checkpoint_dir(name)
    broken = with_config(folder, tmp_path / "broken", **dict.fromkeys(keys))
    with pytest.raises(CheckpointError, match=f"config.json has no '{keys[0]}'"):
        offload.load(broken, device="cpu")
    assert_one_line_error(invoke("inspect", broken), f"no '{keys[0]}'")


# --- chat templates: bounded in size and time ---

def render(template: str) -> str:
    return chat_template.render_chat_template(template, [{"role": "user", "content": "hi"}], True, None, None)


@pytest.mark.parametrize("template, message", [
    ("{{ 'a' * 10000000000 }}", "repeats a value"),
    ("{{ 'a'.ljust(10000000000) }}", "asks for a size of 10000000000"),
    ("{{ 'a' | center(10000000000) }}", "asks for a size of 10000000000"),
    ("{{ '%2000000000d' % 1 }}", "asks for a size of 2000000000"),
    ("{% set s = 'ab' %}" + "{% set s = s ~ s %}" * 40 + "{{ s }}", "builds a value of more than"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
     "builds a value of more than"),
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "renders more than"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed too deeply"),
])
def test_chat_templates_cannot_build_huge_values(template, message):
    with pytest.raises(OffloadError, match=message):
        render(template)


def test_chat_templates_cannot_loop_for_ever(monkeypatch):
    monkeypatch.setattr(chat_template, "MAX_RENDER_SECONDS", 0.2)
    with pytest.raises(OffloadError, match="took more than 0.2 s to render"):
        render("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    assert render("{% for m in messages %}{{ m.content }}{% endfor %}") == "hi"

"""Every command through typer's CliRunner on tiny checkpoints, the error paths, and one real terminal session."""
from __future__ import annotations

import json
import math
import os
import re
import select
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import offload
import offload.chat as chat_module
from offload.arch import architecture, config_from_hf
from offload.cli import LoadOptions, app, with_load_options
from offload.demo import RANDOM_DEMO_CONFIG, random_demo_checkpoint
from offload.errors import CheckpointError, OffloadError
from offload.placement import PlanError
from offload.inspect import param_counts
from offload.weights.checkpoint import Checkpoint
from tiny_models import VARIANTS


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return random_demo_checkpoint(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def demo_model(demo_dir):
    return offload.load(demo_dir, device="cpu", max_context=4096)


def invoke(*args, input: str | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit 2, no traceback, one red line holding every fragment; returns the line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# --- the app itself ---

def test_help_lists_the_commands_and_shell_completion(monkeypatch):
    import shellingham

    result = invoke("--help")
    assert result.exit_code == 0
    for word in ("chat", "generate", "inspect", "bench", "demo", "--install-completion", "--show-completion"):
        assert word in result.output
    # The completion script is for the shell typer detects from the process tree; a test run need not have one.
    monkeypatch.setattr(shellingham, "detect_shell", lambda: ("bash", "/bin/bash"))
    assert "complete -o default" in invoke("--show-completion").output


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"offload {offload.__version__}"


@pytest.mark.parametrize("command", ["chat", "generate", "serve", "bench"])
def test_commands_that_load_share_the_load_options(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "--device" in result.output and "--max-context" in result.output


def test_with_load_options_hands_the_command_a_load_options_object():
    seen = []
    mini = typer.Typer()

    @mini.command()
    @with_load_options
    def run(name: str = typer.Argument(...), *, load_options: LoadOptions) -> None:
        seen.append((name, load_options))

    @mini.command()
    def other() -> None:
        """A second command, so that typer keeps command names."""

    assert CliRunner().invoke(mini, ["run", "x", "--max-context", "7", "--device", "cpu"]).exit_code == 0
    assert CliRunner().invoke(mini, ["run", "y"]).exit_code == 0
    assert seen == [("x", LoadOptions(device="cpu", max_context=7)), ("y", LoadOptions())]


# --- chat ---

@pytest.fixture(autouse=True)
def chat_data_home(tmp_path, monkeypatch):
    """Chat sessions autosave under $XDG_DATA_HOME: keep the tests' out of the user's."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))

def test_chat_scripted_session(demo_dir, demo_model, tmp_path):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    script = f"hello\n/stats\n/save {first}\n/reset\n/save {second}\n/exit\nnever read\n"
    result = invoke("chat", demo_dir, "--device", "cpu", "--temperature", "0", "--max-new-tokens", "8",
                    "--system", "Be brief.", input=script)
    assert result.exit_code == 0, result.output
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    reply = demo_model.chat(messages, max_new_tokens=8)
    assert result.stdout.startswith(f"you> hello\nassistant> {reply.text}\nyou> /stats\n")
    assert re.search(r"prompt tokens +\d+", result.stdout) and re.search(r"finish +length", result.stdout)
    assert "never read" not in result.stdout
    conversation = messages + [{"role": "assistant", "content": reply.text}]
    assert json.loads(first.read_text()) == {"model": str(demo_dir), "messages": conversation, "context_start": 0}
    # /reset: the model forgets the turn, the saved conversation keeps it
    assert json.loads(second.read_text()) == {"model": str(demo_dir), "messages": conversation, "context_start": 1}
    assert "qwen3_moe: 4 layers (4 MoE), 16 experts top-4, GQA attention, on cpu" in result.stderr
    assert "8 tokens, prefill" in result.stderr and "finish: length" in result.stderr
    assert "saved 1 turn to" in result.stderr and "conversation cleared" in result.stderr


def test_chat_single_turn_prints_only_the_reply(demo_dir, demo_model):
    result = invoke("chat", demo_dir, "--device", "cpu", "--temperature", "0", "--max-new-tokens", "8",
                    "--prompt", "What is an expert?")
    assert result.exit_code == 0, result.output
    expected = demo_model.chat([{"role": "user", "content": "What is an expert?"}], max_new_tokens=8)
    assert result.stdout == expected.text + "\n"
    assert "finish:" in result.stderr


def test_chat_trims_old_turns_and_keeps_the_system_prompt(demo_dir, tmp_path):
    saved = tmp_path / "chat.json"
    questions = [f"question {i}: tell me about experts" for i in range(6)]
    result = invoke("chat", demo_dir, "--device", "cpu", "--temperature", "0", "--max-new-tokens", "8",
                    "--max-context", "80", "--system", "Be brief.", input="\n".join(questions + [f"/save {saved}"]))
    assert result.exit_code == 0, result.output
    assert "oldest turn" in result.stderr and "max_context=80" in result.stderr
    saved = json.loads(saved.read_text())
    assert saved["messages"][0] == {"role": "system", "content": "Be brief."}
    users = [m["content"] for m in saved["messages"] if m["role"] == "user"]
    assert users == questions and 0 < saved["context_start"] < len(questions)  # trimmed the prompt, not the file


def test_chat_errors_inside_a_turn_keep_the_session(demo_dir, tmp_path):
    script = "word " * 200 + f"\n/save {tmp_path}/missing/chat.json\n/save {tmp_path}\nhi\n"
    result = invoke("chat", demo_dir, "--device", "cpu", "--max-new-tokens", "4", "--max-context", "64",
                    input=script)
    assert result.exit_code == 0, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3
    assert "does not fit max_context=64" in errors[0]
    assert "cannot write" in errors[1] and "cannot write" in errors[2]
    assert "you> hi\nassistant> " in result.stdout and "4 tokens" in result.stderr


def test_chat_two_ctrl_c_at_the_prompt_leave_with_0(demo_dir, monkeypatch):
    def ctrl_c(prompt: str) -> str:
        signal.raise_signal(signal.SIGINT)  # handled before the next line, as while input() waits
        return "never sent"

    monkeypatch.setattr(chat_module, "terminal_input", lambda: ctrl_c)
    result = invoke("chat", demo_dir, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("Ctrl-C again within a second") == 1 and "never sent" not in result.stdout


def test_chat_single_turn_too_long_is_exit_2(demo_dir):
    result = invoke("chat", demo_dir, "--device", "cpu", "--max-context", "32", "--prompt", "word " * 100)
    assert_one_line_error(result, "max_context=32", "--max-new-tokens")


def test_chat_needs_a_chat_template(checkpoint_dir):
    folder, _ = checkpoint_dir("mixtral")
    assert_one_line_error(invoke("chat", folder, "--prompt", "hi"), "no tokenizer.json")


# --- generate ---

def test_generate_passes_the_load_options(demo_dir):
    result = invoke("generate", demo_dir, "--device", "cpu", "--max-context", "16", "--prompt", "word " * 20)
    assert_one_line_error(result, "max_context=16")
    result = invoke("generate", demo_dir, "--device", "cpu", "--max-new-tokens", "5", "--ignore-eos", "--json",
                    "--prompt", "Hello")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["token_ids"]) == 5


def test_generate_unreadable_prompt_file(demo_dir, tmp_path):
    assert_one_line_error(invoke("generate", demo_dir, "--prompt-file", tmp_path / "none.txt"),
                          "cannot read --prompt-file", "No such file")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    assert_one_line_error(invoke("generate", demo_dir, "--prompt-file", binary), "not UTF-8 text")


# --- inspect ---

@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_parameter_counts_match_the_checkpoint(checkpoint_dir, name):
    """The text model's parameters: a multimodal checkpoint's vision tower is not counted."""
    folder, _ = checkpoint_dir(name)
    checkpoint = Checkpoint(folder)
    skipped = architecture(checkpoint.config_json["model_type"]).skipped_prefixes
    numel = sum(math.prod(info.shape) for tensor, info in checkpoint.tensors.items() if not tensor.startswith(skipped))
    assert param_counts(config_from_hf(checkpoint.config_json)).total == numel


# Published sizes: Mixtral-8x7B 46.7B total / 12.9B active, DeepSeek-V3 671B / 37B, Qwen3-30B-A3B 30.5B / 3.3B.
MIXTRAL_8X7B = {"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
                "num_experts_per_tok": 2, "rope_theta": 1e6}
DEEPSEEK_V3 = {"model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
               "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
               "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
               "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
               "v_head_dim": 128, "n_group": 8, "topk_group": 4, "max_position_embeddings": 163840}
QWEN3_30B_A3B = {"model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
                 "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
                 "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8}


@pytest.mark.parametrize("hf, total, active", [
    (MIXTRAL_8X7B, 46.7e9, 12.9e9), (DEEPSEEK_V3, 671e9, 37e9), (QWEN3_30B_A3B, 30.5e9, 3.3e9)])
def test_parameter_counts_of_published_models(hf, total, active):
    counts = param_counts(config_from_hf(hf))
    assert counts.total == pytest.approx(total, rel=0.02)
    assert counts.active == pytest.approx(active, rel=0.02)


def test_mixtral_parameter_count_is_exact():
    # Mixtral-8x7B's model.safetensors.index.json says total_size 93405585408: that many bf16 bytes.
    assert param_counts(config_from_hf(MIXTRAL_8X7B)).total * 2 == 93405585408


def test_expert_format_bytes():
    from csrc_py.formats import empty

    def matrix_bytes(rows, cols, fmt):
        return empty(fmt, 1, rows, cols).nbytes

    assert matrix_bytes(4096, 14336, "bf16") == 4096 * 14336 * 2
    assert matrix_bytes(4096, 14336, "int8") == 4096 * 14336 * 34 // 32
    assert matrix_bytes(4096, 14336, "int4") == 4096 * 14336 * 20 // 32
    assert matrix_bytes(24, 64, "int4") == 32 * 64 * 20 // 32  # rows padded to a whole group
    assert matrix_bytes(4096, 14336, "int4s") == 4096 * 14336 * 18 // 32  # Q4_0's 18 bytes per 32 weights


def test_inspect_mla_checkpoint(checkpoint_dir, monkeypatch):
    folder, _ = checkpoint_dir("deepseek_v3")
    monkeypatch.setattr(Checkpoint, "read", lambda self, name: pytest.fail("inspect read a weight"))
    result = invoke("inspect", folder)
    assert result.exit_code == 0, result.output
    text = re.sub(r"\s+", " ", result.stdout)
    assert "deepseek_v3 (DeepseekV3ForCausalLM)" in text
    assert "layers 3 (2 MoE, dense: [0])" in text
    assert "MLA, 4 heads, q_lora_rank 20, kv_lora_rank 16, qk head dim 12 nope + 8 rope, v head dim 10" in text
    assert "8 routed, top-2, sigmoid scores, noaux_tc (2 of 4 groups), selection bias, weights x 2.5" in text
    assert "shared experts 1 x intermediate 24" in text
    assert "rope yarn, theta 10000, factor 4 (from 64)" in text
    assert "tokenizer none" in text

    report = json.loads(invoke("inspect", folder, "--json").stdout)
    numel = sum(math.prod(info.shape) for info in Checkpoint(folder).tensors.values())
    assert report["parameters"]["total"] == numel
    assert report["attention"]["kind"] == "MLA" and report["attention"]["kv_lora_rank"] == 16
    assert report["memory"]["kv_cache_bytes_per_token"] == 3 * (16 + 8) * 2
    formats = report["memory"]["by_expert_format"]
    assert formats["bf16"]["experts"] > formats["int8"]["experts"] > formats["int4"]["experts"] > \
        formats["int4s"]["experts"]
    assert report["checkpoint"]["bytes"] == numel * 4  # transformers saved float32


def test_inspect_demo_checkpoint_has_a_chat_template(demo_dir):
    report = json.loads(invoke("inspect", demo_dir, "--json").stdout)
    assert report["tokenizer"] == {"present": True, "vocab_size": report["tokenizer"]["vocab_size"],
                                   "chat_template": True}
    assert report["attention"] == {"kind": "GQA", "heads": 8, "kv_heads": 2, "head_dim": 32, "rope_dim": 32,
                                   "rope_interleaved": False, "qkv_bias": False, "o_bias": False, "qk_norm": "head",
                                   "qk_norm_after_rope": False, "sinks": False, "sliding_window": None,
                                   "output_gate": False, "attention_chunk": None, "no_rope_layers": [],
                                   "qk_l2_norm": False, "temperature_tuning": False}
    assert report["experts"]["routed"] == RANDOM_DEMO_CONFIG["num_experts"] and report["layers"]["moe"] == 4


# --- bench ---

def test_bench_json(demo_dir):
    result = invoke("bench", demo_dir, "--device", "cpu", "--prompt-tokens", "16", "--gen-tokens", "4",
                    "--repeat", "2", "--warmup", "0", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["repeat"] == 2 and len(report["runs"]) == 2
    assert all(run["prompt_tokens"] == 16 and run["generated_tokens"] == 4 for run in report["runs"])
    assert report["prefill_tokens_per_s"] > 0 and report["decode_tokens_per_s"] > 0
    from csrc_py.simd import TIER

    assert report["kernel_isa"] == TIER


def test_bench_table(demo_dir):
    result = invoke("bench", demo_dir, "--device", "cpu", "--prompt-tokens", "8", "--gen-tokens", "3", "--repeat", "1")
    assert result.exit_code == 0, result.output
    assert re.search(r"prefill\s.*\s8\s", result.stdout) and re.search(r"decode\s.*\s2\s", result.stdout)
    assert "CPU kernels " in result.stdout


def test_bench_rejects_bad_counts(demo_dir):
    assert_one_line_error(invoke("bench", demo_dir, "--gen-tokens", "1"), "--gen-tokens must be at least 2")
    assert_one_line_error(invoke("bench", demo_dir, "--prompt-tokens", "100", "--max-context", "64"),
                          "max_context=64")


# --- checkpoint errors, for every command that reads one ---

def bad_checkpoints(demo_dir: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (folder, what the error must say)."""
    empty = root / "empty"
    empty.mkdir()
    truncated = root / "truncated"
    shutil.copytree(demo_dir, truncated)
    with (truncated / "model.safetensors").open("r+b") as f:
        f.truncate(1000)
    llama = root / "llama"
    shutil.copytree(demo_dir, llama)
    (llama / "config.json").write_text(json.dumps({**RANDOM_DEMO_CONFIG, "model_type": "llama"}))
    corrupt_json = root / "corrupt_json"
    shutil.copytree(demo_dir, corrupt_json)
    (corrupt_json / "config.json").write_text("{not json")
    return {
        "missing": (root / "missing", "is not a folder"),
        "empty": (empty, "config.json is missing"),
        "truncated": (truncated, "re-download"),
        "unsupported": (llama, "model_type 'llama' is not supported"),
        "corrupt_json": (corrupt_json, "is not valid JSON"),
    }


@pytest.mark.parametrize("command", [["inspect"], ["generate", "--prompt", "hi"], ["bench"],
                                     ["chat", "--prompt", "hi"]])
def test_bad_checkpoints_are_one_line_errors(demo_dir, tmp_path, command):
    for name, (folder, message) in bad_checkpoints(demo_dir, tmp_path).items():
        if command[0] == "chat" and name in ("missing", "empty"):
            message = "does not exist" if name == "missing" else "no tokenizer.json"  # the template is checked first
        result = invoke(command[0], folder, *command[1:])
        assert_one_line_error(result, message)


def test_debug_shows_the_traceback(tmp_path):
    result = invoke("--debug", "inspect", tmp_path / "missing")
    assert isinstance(result.exception, CheckpointError)


# --- a real terminal: Ctrl-C in the middle of a reply ---

ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][A-Z0-9]|[=>])")


class Terminal:
    """A child process on a pseudo-terminal, read with bounded waits."""

    def __init__(self, argv: list[str]):
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become the command at once
            os.execv(argv[0], argv)
        self.text = ""

    def expect(self, pattern: str, start: int = 0, timeout: float = 120.0) -> re.Match:
        """Wait until pattern appears in the screen text after position start; fail after timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.compile(pattern).search(self.text, start)
            if match:
                return match
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                pytest.fail(f"no {pattern!r} within {timeout} s; the screen so far:\n{self.text}")
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                pytest.fail(f"the session ended before {pattern!r}; the screen:\n{self.text}")
            self.text += ANSI.sub("", chunk.decode("utf-8", "replace")).replace("\r", "")

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait_exit(self, timeout: float = 60.0) -> int:
        """Read the terminal until the child closes it, then return the child's exit code."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not select.select([self.fd], [], [], 0.5)[0]:
                continue
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # EIO: the child has closed its side
                chunk = b""
            if not chunk:
                return os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            self.text += ANSI.sub("", chunk.decode("utf-8", "replace")).replace("\r", "")
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        pytest.fail(f"the session did not end; the screen:\n{self.text}")

    def close(self) -> None:
        os.close(self.fd)


def test_ctrl_c_in_a_real_terminal_stops_the_reply_and_keeps_the_conversation(demo_dir, tmp_path):
    saved = tmp_path / "chat.json"
    term = Terminal([sys.executable, "-m", "offload.cli", "chat", str(demo_dir), "--device", "cpu",
                     "--temperature", "0", "--max-new-tokens", "3000"])
    try:
        end = term.expect(r"you> ").end()
        for turn, message in enumerate(["hello", "and then?"], start=1):
            term.send(message + "\r")
            start = term.expect(r"assistant> ", end).end()
            term.expect(r"\S", start)  # the reply is streaming (3000 tokens take seconds: Ctrl-C lands mid-reply)
            term.send("\x03")
            end = term.expect(r"finish: interrupted\n", start).end()
            end = term.expect(r"you> ", end).end()
            term.send(f"/save {saved}\r")
            end = term.expect(rf"saved {turn} turns? to", end).end()
            end = term.expect(r"you> ", end).end()
        # Ctrl-D leaves (so do two Ctrl-C within a second: test_chat_two_ctrl_c_at_the_prompt_leave_with_0).
        term.send("\x04")
        assert term.wait_exit() == 0
    finally:
        term.close()
    messages = json.loads(saved.read_text())["messages"]
    assert [(m["role"], m["content"]) for m in messages[::2]] == [("user", "hello"), ("user", "and then?")]
    assert all(m["role"] == "assistant" and m["content"] for m in messages[1::2])


def test_plan_prints_a_table_and_writes_json_without_loading(demo_dir, tmp_path):
    from offload.placement import Plan

    out = tmp_path / "plan.json"
    result = invoke("plan", str(demo_dir), "--gpu-memory", "8MiB", "--max-context", "1024", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "kv_cache" in result.output and "pinned ids" in result.output
    assert "staging ring" in result.output and "host link" in result.output
    plan = Plan.load(out)
    assert plan.copies_possible and "prefetch decided at load: on where copying an expert" in result.output
    assert plan.device_budget == 8 * 2**20 and plan.max_context == 1024 and len(plan.layers) == 4
    assert plan.device_bytes <= plan.device_budget


def test_plan_sizes_the_kv_cache_at_the_kv_cache_dtype(demo_dir, tmp_path):
    from offload.placement import Plan

    sizes = {}
    for kv_cache in ("float32", "bf16"):
        out = tmp_path / f"plan-{kv_cache}.json"
        result = invoke("plan", str(demo_dir), "--gpu-memory", "64MiB", "--dtype", "float32", "--max-context", "1024",
                        "--kv-cache", kv_cache, "--out", str(out))
        assert result.exit_code == 0, result.output
        sizes[kv_cache] = Plan.load(out).device_groups["kv_cache"]
    assert sizes["bf16"] * 2 == sizes["float32"] > 0
    with pytest.raises(PlanError, match="KV cache.*--kv-cache"):  # a float32 cache would overrun the bf16 plan
        offload.load(demo_dir, plan=tmp_path / "plan-bf16.json", max_context=1024, dtype="float32")
    offload.load(demo_dir, plan=tmp_path / "plan-bf16.json", max_context=1024, dtype="float32",
                 kv_cache="bf16")  # the fix the error names loads
    result = invoke("plan", str(demo_dir), "--gpu-memory", "64MiB", "--kv-cache", "fp16")
    assert result.exit_code == 2 and "fp16" in result.output
    with pytest.raises(OffloadError, match="kv_cache must be one of"):
        offload.plan(demo_dir, gpu_memory="64MiB", kv_cache="fp16")


def test_plan_errors(demo_dir, tmp_path):
    import torch

    if not torch.cuda.is_available():
        assert_one_line_error(invoke("plan", str(demo_dir)), "no GPU is visible", "--gpu-memory")
    assert_one_line_error(invoke("plan", str(demo_dir), "--gpu-memory", "1MiB"), "device budget", "max_context")
    assert_one_line_error(invoke("plan", str(demo_dir), "--gpu-memory", "lots"), "cannot read memory size")
    profile = tmp_path / "profile.json"
    profile.write_text("{}")
    assert_one_line_error(invoke("plan", str(demo_dir), "--gpu-memory", "8MiB", "--profile", str(profile)),
                          "not a profile")


def test_a_profile_for_the_prefetch_estimate_is_checked_before_loading(demo_dir, tmp_path):
    common = ("generate", str(demo_dir), "--prompt", "hi", "--gpu-memory", "9MiB", "--max-context", "1024",
              "--profile")
    assert_one_line_error(invoke(*common, tmp_path / "missing.json"), "cannot read profile")
    wrong = tmp_path / "profile.json"
    wrong.write_text(json.dumps({"heat": [[1, 2, 3]]}))
    assert_one_line_error(invoke(*common, wrong), "the heat is 1 MoE layers x 3 experts", "profile this model again")


def test_chat_with_a_simulated_gpu_budget_reports_the_expert_hit_rate(demo_dir):
    result = invoke("chat", str(demo_dir), "--gpu-memory", "9MiB", "--max-context", "1024", "--prompt", "hi",
                    "--max-new-tokens", "4", "--temperature", "0")
    assert result.exit_code == 0, result.output
    assert "expert hit rate" in result.output


# GLM-4.5-Air's published config.json (the keys that size it); no weights: what a user checks before downloading.
GLM_45_AIR_CONFIG = {
    "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "hidden_size": 4096, "num_attention_heads": 96,
    "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 46, "first_k_dense_replace": 1,
    "n_routed_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 1408, "intermediate_size": 10944,
    "partial_rotary_factor": 0.5, "vocab_size": 151552, "max_position_embeddings": 131072, "n_shared_experts": 1,
    "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "use_qk_norm": False, "attention_bias": True,
    "rope_theta": 1000000, "num_nextn_predict_layers": 1, "norm_topk_prob": True, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5, "eos_token_id": [151329, 151336, 151338]}


def test_inspect_and_plan_a_config_only_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GLM_45_AIR_CONFIG))
    result = invoke("inspect", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "no weights in this folder" in result.output and "106.85B total" in result.output
    report = json.loads(invoke("inspect", str(tmp_path), "--json").output)
    assert report["checkpoint"] is None and report["layers"]["moe"] == 45

    # A 24 GB GPU from a machine without one: bf16 device tier, RAM of the machine being sized.
    result = invoke("plan", str(tmp_path), "--gpu-memory", "24GiB", "--dtype", "bfloat16", "--host-memory", "256GiB",
                    "--experts", "int4", "--json")
    assert result.exit_code == 0, result.output
    plan = offload.Plan.from_json(result.output)
    assert plan.device_dtype == "bfloat16" and plan.host_budget == 256 * 2**30
    assert len(plan.layers) == 45 and plan.device_bytes <= plan.device_budget == 24 * 2**30
    assert plan.expert_format == "int4" and sum(layer.cache_slots for layer in plan.layers) > 0
    # The RAM check still applies to the machine planned for.
    assert_one_line_error(invoke("plan", str(tmp_path), "--gpu-memory", "24GiB", "--dtype", "bfloat16",
                                 "--host-memory", "32GiB", "--experts", "int4"), "RAM", "int4")


def test_a_folder_with_an_index_but_no_shards_is_still_an_error_for_inspect(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GLM_45_AIR_CONFIG))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    assert_one_line_error(invoke("inspect", str(tmp_path)), "model-1.safetensors", "missing")

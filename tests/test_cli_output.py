"""What the commands show and write besides their results: a fast --version, progress bars with real totals from
the first frame, progress for profile and bench, and output files that others can read (0644)."""
from __future__ import annotations

import io
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

# Numba wraps sys.stdout with colorama when it compiles; inside a bar that is the bar's proxy of pytest's capture,
# which is closed by the time colorama resets it at exit (a harmless but noisy traceback).
os.environ.setdefault("NUMBA_DISABLE_ERROR_MESSAGE_HIGHLIGHTING", "1")
from rich.console import Console

import offload
import offload.cli as cli
from offload.bench import run_bench
from offload.demo import random_demo_checkpoint
from offload.files import write_json_atomic
from offload.profiling import run_profile


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return random_demo_checkpoint(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def terminal(monkeypatch) -> io.StringIO:
    """cli's stderr console as a terminal writing into a buffer: what a user would see, bars included."""
    screen = io.StringIO()
    monkeypatch.setattr(cli, "err", Console(file=screen, force_terminal=True, width=200))
    return screen


@pytest.fixture
def usual_umask():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_version_does_not_import_the_runtime():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "offload.cli", "--version"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"offload {offload.__version__}"
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert not {"torch", "numba", "numpy", "offload.api"} & imported


def test_load_bar_shows_the_checkpoint_bytes_from_its_first_frame(demo_dir, terminal):
    cli.load_model(demo_dir, cli.LoadOptions(device="cpu", max_context=64), progress=True)
    frames = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.getvalue()).split("\r")
    first = next(frame for frame in frames if "loading" in frame)
    assert re.search(r" 0\.0/\d+(\.\d+)? [kMG]?B ", first), first


def test_convert_bar_counts_shards_from_its_first_frame(demo_dir, terminal, tmp_path):
    cli.convert(demo_dir, tmp_path / "store", experts="int8", dense="bf16")
    frames = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.getvalue()).split("\r")
    shards = len(list((tmp_path / "store").glob("model-*.safetensors")))
    assert any(f"0/{shards} shards" in frame for frame in frames), frames[:3]
    assert not any("None" in frame or "/?" in frame for frame in frames)


def test_bench_and_profile_report_each_run_and_prompt(demo_dir):
    model = offload.load(demo_dir, device="cpu", max_context=64)
    runs: list[tuple[int, int]] = []
    run_bench(model, 4, 3, repeat=2, warmup=1, on_run=lambda done, total: runs.append((done, total)))
    assert runs == [(1, 3), (2, 3), (3, 3)]
    prompts: list[tuple[str, int, int]] = []
    run_profile(demo_dir, ["a b", "c d"], 3, on_prompt=lambda *step: prompts.append(step), device="cpu",
                max_context=64, gpu_memory="24MiB")
    assert prompts == [("default", 1, 2), ("default", 2, 2), ("tuned", 1, 2), ("tuned", 2, 2)]


def test_output_files_are_readable_by_others(demo_dir, usual_umask, tmp_path):
    """plan.json, profile.json and transcripts go through write_json_atomic, the heat map through profiling's
    writer, stores through convert: all 0644 like any file the user's umask gives."""
    import offload.profiling as profiling

    offload.plan(demo_dir, gpu_memory="24MiB", device="cpu", max_context=64).save(tmp_path / "plan.json")
    write_json_atomic(tmp_path / "transcript.json", {"turns": []})
    profiling._write_atomic(tmp_path / "heatmap.txt", lambda tmp: tmp.write_text("heat\n"))
    cli.convert(demo_dir, tmp_path / "store", experts="int8", dense="bf16")
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert len(written) > 5
    assert {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in written
            if stat.S_IMODE(path.stat().st_mode) != 0o644} == {}

"""tools/kernels_at.py: another commit's kernels load as a package of their own, beside this tree's, for the A/B
tools (bench_kernels_against, bench_attend, bench_latent; bench_host_link's one file)."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import bench_attend  # noqa: E402
import kernels_at  # noqa: E402
from csrc_py import decode_step, expert_ffn, simd  # noqa: E402


def test_the_imports_of_the_package_point_at_its_new_name():
    source = "from csrc_py import simd\nfrom csrc_py.simd import TIER\nimport csrc_py.formats\nmy_csrc_pyx = 1\n"
    assert kernels_at.renamed(source, "csrc_at_x") == ("from csrc_at_x import simd\nfrom csrc_at_x.simd import TIER\n"
                                                       "import csrc_at_x.formats\nmy_csrc_pyx = 1\n")


def test_a_commit_s_kernels_are_their_own_modules(tmp_path):
    ref = kernels_at.csrc_py_at("HEAD", tmp_path)
    ref_ffn = importlib.import_module(f"{ref.__name__}.expert_ffn")
    assert ref.__name__ == f"csrc_at_{kernels_at.commit_of('HEAD')[:12]}"
    assert Path(ref.__file__).parent.parent == tmp_path / kernels_at.commit_of("HEAD")
    # Its kernels and what they call are the copy's, not this tree's (a missed import would mix the two).
    assert ref_ffn.moe_q8 is not expert_ffn.moe_q8
    assert ref_ffn.matmul_q8.py_func.__module__ == f"{ref.__name__}.grouped_matmul"
    assert not any("csrc_py" in path.read_text() for path in Path(ref.__file__).parent.glob("*.py"))


def test_bench_attend_s_ref_attention_calls_the_ref_s_helpers(tmp_path, monkeypatch):
    # A lone copy of decode_step.py imported this tree's simd: a change to a prefetch hint or a tile in REF was not
    # what REF's attend ran.
    monkeypatch.setattr(kernels_at, "CACHE", tmp_path)
    at = bench_attend.decode_step_at("HEAD")
    package = at.__name__.rpartition(".")[0]
    assert package == f"csrc_at_{kernels_at.commit_of('HEAD')[:12]}"
    assert at.attend is not decode_step.attend
    assert at.prefetch is sys.modules[f"{package}.simd"].prefetch
    assert at.prefetch is not simd.prefetch



def test_one_file_of_a_commit_is_a_module_of_its_own():
    from offload.experts import link
    at = kernels_at.lone_module_at("HEAD", "offload/experts/link.py", "offload.experts.link_at_ref")
    assert at.__name__ == "offload.experts.link_at_ref"
    assert at.HostLink is not link.HostLink
    assert at.HostLink.__module__ == "offload.experts.link_at_ref"


def _run_tool(tool: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(TOOLS.parent)}  # as the tools are run: from the repository
    return subprocess.run([sys.executable, str(TOOLS / tool), *args], capture_output=True, text=True,
                          cwd=TOOLS.parent, env=env, timeout=300)


@pytest.mark.parametrize("tool", ["bench_attend.py", "bench_latent.py", "bench_kernels_against.py",
                                  "bench_host_link.py"])
def test_a_ref_that_is_not_a_commit_is_one_line_and_exit_2(tool):
    run = _run_tool(tool, "--against", "no-such-ref-xyz")
    assert run.returncode == 2
    assert "--against no-such-ref-xyz: not a commit of this repository" in run.stderr
    assert "Traceback" not in run.stderr


def test_an_unknown_layer_is_one_line_and_exit_2():
    run = _run_tool("bench_kernels_against.py", "--against", "HEAD", "--layers", "qwen3,no-such-layer")
    assert run.returncode == 2
    assert "unknown layer(s) no-such-layer" in run.stderr and "Traceback" not in run.stderr

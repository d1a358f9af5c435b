"""tools/bench_kernels_against.py: another commit's kernels load as a package of their own, beside this tree's."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_kernels_against as against  # noqa: E402
from csrc_py import expert_ffn  # noqa: E402


def test_the_imports_of_the_package_point_at_its_new_name():
    source = "from csrc_py import simd\nfrom csrc_py.simd import TIER\nimport csrc_py.formats\nmy_csrc_pyx = 1\n"
    assert against.renamed(source, "csrc_at_x") == ("from csrc_at_x import simd\nfrom csrc_at_x.simd import TIER\n"
                                                    "import csrc_at_x.formats\nmy_csrc_pyx = 1\n")


def test_a_commit_s_kernels_are_their_own_modules(tmp_path):
    ref = against.csrc_py_at("HEAD", tmp_path)
    ref_ffn = importlib.import_module(f"{ref.__name__}.expert_ffn")
    assert ref.__name__ == f"csrc_at_{against.commit_of('HEAD')[:12]}"
    assert Path(ref.__file__).parent.parent == tmp_path / against.commit_of("HEAD")
    # Its kernels and what they call are the copy's, not this tree's (a missed import would mix the two).
    assert ref_ffn.moe_q8 is not expert_ffn.moe_q8
    assert ref_ffn.matmul_q8.py_func.__module__ == f"{ref.__name__}.grouped_matmul"
    assert not any("csrc_py" in path.read_text() for path in Path(ref.__file__).parent.glob("*.py"))

"""Another commit's code, importable beside this tree's: the A/B tools (bench_kernels_against, bench_attend,
bench_latent, bench_host_link) time both in one process.

REF's whole csrc_py is exported with `git archive` into ~/.cache/offload/kernels-at/<commit>/ under the name
csrc_at_<commit prefix>, its imports of csrc_py rewritten, so a REF kernel calls REF's helpers (its SIMD tiles,
prefetch hints, fast math), never this tree's; Numba's cache there keeps its compiled kernels between runs.
`lone_module_at` imports one file of REF alone (bench_host_link's offload/experts/link.py): its imports resolve to
this tree's modules, so it measures a change in that file only.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "offload" / "kernels-at"


def commit_of(ref: str) -> str:
    return subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout.strip()


def is_commit(ref: str) -> bool:
    """Whether `ref` names a commit of this repository (a hash, branch, tag or HEAD~n)."""
    try:
        commit_of(ref)
    except subprocess.CalledProcessError:
        return False
    return True


def renamed(source: str, name: str) -> str:
    """A csrc_py module's source with its imports of the package pointing at `name`."""
    return re.sub(r"\bcsrc_py\b", name, source)


def csrc_py_at(ref: str, cache: Path | None = None):
    """REF's csrc_py package, imported under the name csrc_at_<commit prefix> from a copy in `cache` (CACHE)."""
    cache = CACHE if cache is None else cache
    commit = commit_of(ref)
    name = f"csrc_at_{commit[:12]}"
    root = cache / commit
    package = root / name
    if not package.is_dir():
        archive = subprocess.run(["git", "archive", commit, "csrc_py"], cwd=REPO, check=True,
                                 capture_output=True).stdout
        partial = root / f"{name}.partial"  # renamed when whole: an interrupted export is never imported
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            for member in (m for m in tar.getmembers() if m.isfile() and m.name.endswith(".py")):
                source = tar.extractfile(member).read().decode()
                (partial / Path(member.name).name).write_text(renamed(source, name))
        partial.rename(package)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(name)


def module_of_csrc_py_at(ref: str, module: str, cache: Path | None = None):
    """REF's csrc_py.<module> (e.g. "decode_step"), from csrc_py_at's copy."""
    return importlib.import_module(f"{csrc_py_at(ref, cache).__name__}.{module}")


def lone_module_at(ref: str, file: str, name: str):
    """The repository's `file` as of commit `ref`, executed as a module called `name` (a dotted name puts it in
    that package, for its relative imports) from a temporary copy."""
    source = subprocess.run(["git", "show", f"{ref}:{file}"], cwd=REPO, check=True, capture_output=True,
                            text=True).stdout
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{name.rpartition('.')[2]}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module

"""tools/cold_caches.py: a cold call in the benchmarks follows a read of twice the host's last-level cache."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import cold_caches  # noqa: E402


def fake_cpu_caches(root: Path, caches: list[tuple[int, str, str]]) -> Path:
    for i, (level, kind, size) in enumerate(caches):
        index = root / f"index{i}"
        index.mkdir(parents=True)
        (index / "level").write_text(f"{level}\n")
        (index / "type").write_text(f"{kind}\n")
        (index / "size").write_text(f"{size}\n")
    return root


def test_the_eviction_is_twice_the_largest_cache_and_never_below_256_mib(tmp_path):
    intel = fake_cpu_caches(tmp_path / "intel", [(1, "Data", "48K"), (1, "Instruction", "64K"),
                                                 (2, "Unified", "2048K"), (3, "Unified", "491520K")])
    assert cold_caches.last_level_cache_bytes(intel) == 480 << 20
    assert cold_caches.eviction_bytes(cold_caches.last_level_cache_bytes(intel)) == 960 << 20
    zen = fake_cpu_caches(tmp_path / "zen", [(1, "Data", "32K"), (2, "Unified", "1M"), (3, "Unified", "32M")])
    assert cold_caches.eviction_bytes(cold_caches.last_level_cache_bytes(zen)) == 256 << 20
    # An instruction cache is not a data cache, and a machine without sysfs caches still evicts 256 MiB.
    icache_only = fake_cpu_caches(tmp_path / "odd", [(1, "Instruction", "1G")])
    assert cold_caches.last_level_cache_bytes(icache_only) is None
    assert cold_caches.last_level_cache_bytes(tmp_path / "missing") is None
    assert cold_caches.eviction_bytes(0) == 256 << 20

"""Weights in transparent huge pages (offload/weights/hugepages.py): the decisions, the memory, matrices packed at
load allocated there, and a store read into it giving the memory-mapped load's numbers exactly."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import offload
from offload.weights import hugepages
from offload.weights.store import convert

PROMPT = [3, 17, 5, 9, 30, 2, 11, 8]


@pytest.mark.parametrize("setting, mode", [("always [madvise] never", "madvise"), ("[always] madvise never", "always"),
                                           ("always madvise [never]", "never"), ("", None), (None, None),
                                           ("garbled", None)])
def test_thp_mode_reads_the_bracketed_choice(setting, mode):
    assert hugepages.thp_mode(setting) == mode


@pytest.mark.parametrize("environ, mode, expected", [
    ({}, "madvise", True), ({}, "always", True), ({}, "never", False), ({}, None, False),
    ({hugepages.ENV_SWITCH: "0"}, "madvise", False), ({hugepages.ENV_SWITCH: "1"}, "always", True),
    ({hugepages.ENV_SWITCH: "1"}, "never", False)])
def test_huge_pages_are_offered_by_the_kernel_unless_turned_off(environ, mode, expected):
    assert hugepages.offered(environ, mode) is expected


def test_copies_must_leave_the_reserve():
    gib = 1 << 30
    assert hugepages.copies_fit(10 * gib, 10 * gib + hugepages.RESERVE_BYTES)
    assert not hugepages.copies_fit(10 * gib, 10 * gib + hugepages.RESERVE_BYTES - 1)


def test_empty_starts_on_a_huge_page_and_holds_the_shape(monkeypatch):
    monkeypatch.setattr(hugepages, "system_mode", lambda: "madvise")
    monkeypatch.delenv(hugepages.ENV_SWITCH, raising=False)
    a = hugepages.empty((3, 1 << 20), np.float16)  # 6 MiB
    assert a.shape == (3, 1 << 20) and a.dtype == np.float16 and a.flags.c_contiguous and a.flags.writeable
    assert a.ctypes.data % hugepages.HUGE_PAGE == 0
    a[:] = 1.5
    assert float(a.sum(dtype=np.float64)) == 1.5 * a.size
    small = hugepages.empty((4, 8), np.int8)  # under MIN_BYTES: an ordinary array
    assert small.shape == (4, 8) and small.dtype == np.int8
    monkeypatch.setattr(hugepages, "system_mode", lambda: "never")  # not offered: np.empty, whatever the size
    plain = hugepages.empty((3, 1 << 20), np.float16)
    assert plain.shape == (3, 1 << 20) and plain.base is None


def test_read_into_reads_the_bytes_at_the_offset(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, 5000, dtype=np.uint8)
    path = tmp_path / "blob"
    path.write_bytes(data.tobytes())
    out = np.empty((10, 100), np.uint8)
    hugepages.read_into(path, 1234, out)
    assert np.array_equal(out.reshape(-1), data[1234:2234])
    with pytest.raises(OSError, match="ended 234 bytes early"):
        hugepages.read_into(path, 4234, np.empty(1000, np.uint8))


def _mapping_of(array: np.ndarray) -> str:
    """The /proc/self/maps path of the mapping holding the array's first byte ("" for anonymous memory)."""
    address = array.ctypes.data
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(v, 16) for v in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5] if len(fields) > 5 else ""
    raise AssertionError("address not mapped")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_store_read_into_huge_pages_gives_the_mapped_numbers(checkpoint_dir, tmp_path, monkeypatch):
    folder, _ = checkpoint_dir("qwen3_moe")
    store = convert(folder, tmp_path / "store", "int4", "int8")
    monkeypatch.setattr(hugepages, "system_mode", lambda: "madvise")
    monkeypatch.setattr(hugepages, "MIN_BYTES", 0)  # the tiny model's arrays are all under one huge page
    monkeypatch.delenv(hugepages.ENV_SWITCH, raising=False)
    mapped = offload.load(store, device="cpu")  # by default a store stays memory-mapped
    monkeypatch.setenv(hugepages.ENV_SWITCH, "1")
    copied = offload.load(store, device="cpu")
    for model, kind in ((mapped, "mapped"), (copied, "copied")):
        experts = model.transformer.moe_blocks()[0].experts
        where = _mapping_of(experts.gate.q), _mapping_of(model.transformer.layers[0].attn.o_proj.packed.q)
        if kind == "mapped":
            assert all(w.endswith(".safetensors") for w in where)
        else:
            assert not any(w.endswith(".safetensors") for w in where)
    assert torch.equal(mapped.logits(PROMPT), copied.logits(PROMPT))
    assert mapped.generate(PROMPT, max_new_tokens=5, ignore_eos=True).token_ids == \
        copied.generate(PROMPT, max_new_tokens=5, ignore_eos=True).token_ids


def _aligned(model) -> list[bool]:
    """Whether each of a few packed arrays starts on a huge page: routed experts, the fused q/k/v, the LM head."""
    t = model.transformer
    arrays = [t.moe_blocks()[0].experts.gate.q, t.moe_blocks()[0].experts.down.d, t.layers[0].attn.qkv.packed.q,
              t.layers[0].attn.o_proj.packed.q, t.lm_head.packed.q]
    return [a.ctypes.data % hugepages.HUGE_PAGE == 0 for a in arrays]


def test_matrices_packed_at_load_lie_in_huge_pages(checkpoint_dir, monkeypatch):
    folder, _ = checkpoint_dir("qwen3_moe")
    monkeypatch.setattr(hugepages, "system_mode", lambda: "madvise")
    monkeypatch.setattr(hugepages, "MIN_BYTES", 0)  # the tiny model's arrays are all under one huge page
    monkeypatch.delenv(hugepages.ENV_SWITCH, raising=False)  # the default
    huge = offload.load(folder, device="cpu", experts="int8", dense="int8")
    assert all(_aligned(huge))
    monkeypatch.setenv(hugepages.ENV_SWITCH, "0")
    plain = offload.load(folder, device="cpu", experts="int8", dense="int8")
    assert not all(_aligned(plain))
    assert torch.equal(huge.logits(PROMPT), plain.logits(PROMPT))


def test_a_bad_setting_is_one_clear_error_before_any_weight(checkpoint_dir, tmp_path, monkeypatch):
    import subprocess

    from offload.errors import OffloadError

    folder, _ = checkpoint_dir("qwen3_moe")
    store = convert(folder, tmp_path / "store", "int4", "int8")
    monkeypatch.setenv(hugepages.ENV_SWITCH, "yes")
    with pytest.raises(OffloadError, match="OFFLOAD_HUGE_PAGES='yes' is not a setting: use 1"):
        offload.load(store, device="cpu")
    result = subprocess.run([sys.executable, "-m", "offload.cli", "generate", str(store), "--prompt-ids", "3,17,5"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "OFFLOAD_HUGE_PAGES" in result.stderr and "Traceback" not in result.stderr


def test_asked_but_not_offered_warns_and_keeps_the_map(checkpoint_dir, tmp_path, monkeypatch, caplog):
    folder, _ = checkpoint_dir("qwen3_moe")
    store = convert(folder, tmp_path / "store", "int4", "int8")
    monkeypatch.setenv(hugepages.ENV_SWITCH, "1")
    monkeypatch.setattr(hugepages, "system_mode", lambda: "never")
    with caplog.at_level("WARNING", logger="offload"):
        model = offload.load(store, device="cpu")
    assert "no transparent huge pages" in caplog.text and "stays memory-mapped" in caplog.text
    assert _mapping_of(model.transformer.moe_blocks()[0].experts.gate.q).endswith(".safetensors")

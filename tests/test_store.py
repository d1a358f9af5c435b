"""Pre-quantized stores (`offload convert`) and the quantized dense path."""
from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import offload
from offload.errors import CheckpointError, OffloadError
from offload.weights.checkpoint import CONVERT_PROGRESS_FILE, INDEX_FILE
from offload.weights.store import convert, store_formats, write_store
from offload.weights.checkpoint import Checkpoint
from test_cli import assert_one_line_error, invoke
from test_hybrid import plan

PROMPT = [3, 17, 5, 9, 30, 2, 11, 8, 21, 4, 13, 6]
# Measured on the tiny variants (48 random tokens, experts bf16; docs/formats.md): per position, the largest
# logit error relative to the largest reference logit has a median of 1.4-3.6% with dense int8 (16-30% with
# int4), and the greedy token agrees at 92-100% of positions (58-85% with int4).
DENSE_INT8_MEDIAN_ERROR = 0.06
DENSE_INT8_ARGMAX_AGREEMENT = 0.85
DENSE_INT4_MEDIAN_ERROR = 0.45


@pytest.mark.parametrize("variant, experts, dense", [("qwen3_moe", "int4", "int8"), ("deepseek_v3", "int8", "int4"),
                                                      ("mixtral", "bf16", "bf16")])
def test_convert_then_load_equals_quantize_at_load(checkpoint_dir, tmp_path, variant, experts, dense):
    folder, _ = checkpoint_dir(variant)
    store = convert(folder, tmp_path / "store", experts, dense)
    from_store = offload.load(store, device="cpu")
    at_load = offload.load(folder, device="cpu", experts=experts, dense=dense)
    assert from_store.load_info.store and from_store.load_info.expert_format == experts
    assert torch.equal(from_store.logits(PROMPT), at_load.logits(PROMPT))
    assert from_store.generate(PROMPT, max_new_tokens=6, ignore_eos=True).token_ids == \
        at_load.generate(PROMPT, max_new_tokens=6, ignore_eos=True).token_ids


def test_store_keeps_packed_arrays_memory_mapped(checkpoint_dir, tmp_path):
    folder, _ = checkpoint_dir("qwen3_moe")
    store = convert(folder, tmp_path / "store", "int4", "int8")
    model = offload.load(store, device="cpu")
    experts = model.transformer.moe_blocks()[0].experts
    assert experts.fmt == "int4"
    owner = experts.gate.q
    while isinstance(owner, (np.ndarray, memoryview)):
        owner = owner.base if isinstance(owner, np.ndarray) else owner.obj
    assert isinstance(owner, mmap.mmap)  # the kernels read the file's pages: nothing was copied at load
    assert model.transformer.layers[0].attn.qkv.packed.fmt == "int8"
    info = json.loads((store / INDEX_FILE).read_text())["metadata"]["offload_store"]
    assert info == {"version": 1, "experts": "int4", "dense": "int8"}


def test_int4s_store_holds_no_offsets_and_inspect_names_it(checkpoint_dir, tmp_path):
    """`offload convert --experts int4s --dense int4s`: the store's packed matrices are q and d only (Q4_0's
    0.5625 bytes per weight), it loads with the logits of int4s at load, and inspect / plan describe it."""
    from tiny_models import check_plan_and_convert

    folder, _ = checkpoint_dir("qwen3_moe")
    store = tmp_path / "store"
    check_plan_and_convert(folder, store, 2, torch.tensor(PROMPT), experts="int4s", dense="int4s")
    checkpoint = Checkpoint(store)
    packed = [name[:-2] for name in checkpoint.tensors if name.endswith(".q")]
    assert packed and not any(f"{name}.m" in checkpoint.tensors for name in packed)
    experts = offload.load(store, device="cpu").transformer.moe_blocks()[0].experts
    assert experts.fmt == "int4s" and experts.gate.nbytes == experts.gate.q.nbytes + experts.gate.d.nbytes


def test_convert_copies_tokenizer_and_loads_for_chat(tmp_path):
    from offload.demo import random_demo_checkpoint

    source = random_demo_checkpoint(tmp_path / "cache")
    store = convert(source, tmp_path / "store", "int8", "int8")
    assert (store / "tokenizer.json").exists() and (store / "tokenizer_config.json").exists()
    reply = offload.load(store, device="cpu").chat([{"role": "user", "content": "hi"}], max_new_tokens=4)
    assert len(reply.token_ids) >= 1


def test_convert_resumes_after_an_interruption_inside_a_shard(checkpoint_dir, tmp_path):
    folder, _ = checkpoint_dir("qwen3_moe")
    out = tmp_path / "store"
    checkpoint = Checkpoint(folder)
    reads = []

    def read(name, shape):
        reads.append(name)
        if name.startswith("model.layers.1."):
            raise KeyboardInterrupt  # Ctrl-C while the second shard is being written
        return checkpoint.read(name)

    with pytest.raises(KeyboardInterrupt):
        write_store(out, checkpoint.config_json, read, "int4", "int8", source_label=str(folder.resolve()))
    assert (out / CONVERT_PROGRESS_FILE).exists() and not (out / INDEX_FILE).exists()
    with pytest.raises(CheckpointError, match="unfinished `offload convert`"):
        offload.load(out, device="cpu")

    events = []
    convert(folder, out, "int4", "int8", on_shard=lambda done, total, name, resumed: events.append(resumed))
    assert events[0] is True and not any(events[1:])  # the first shard was kept, the rest written
    assert not (out / CONVERT_PROGRESS_FILE).exists()
    expected = offload.load(folder, device="cpu", experts="int4", dense="int8").logits(PROMPT)
    assert torch.equal(offload.load(out, device="cpu").logits(PROMPT), expected)


def test_killed_convert_resumes_from_the_command_line(checkpoint_dir, tmp_path):
    """SIGKILL a convert mid-way (its reader slowed down so it is caught between shards), then run the
    command again: the finished shards are kept, the half-written one is never loaded, the result is right."""
    folder, _ = checkpoint_dir("mixtral")
    out = tmp_path / "store"
    slow_convert = (
        "import sys, time\n"
        "from offload.weights.checkpoint import Checkpoint\n"
        "from offload.weights.store import write_store\n"
        "ck = Checkpoint(sys.argv[1])\n"
        "def read(name, shape):\n"
        "    if not name.startswith('model.layers.0.'): time.sleep(0.05)\n"
        "    return ck.read(name)\n"
        "write_store(sys.argv[2], ck.config_json, read, 'int8', 'int8', source_label=str(ck.folder.resolve()))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", slow_convert, str(folder), str(out)])
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("model-00001-of-*.safetensors")):
            assert proc.poll() is None, "convert ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / INDEX_FILE).exists()
    result = subprocess.run([sys.executable, "-m", "offload.cli", "convert", str(folder), str(out),
                             "--experts", "int8", "--dense", "int8"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "resumed" in result.stderr
    assert not list(out.glob("*.tmp"))
    expected = offload.load(folder, device="cpu", experts="int8", dense="int8").logits(PROMPT)
    assert torch.equal(offload.load(out, device="cpu").logits(PROMPT), expected)


def test_resume_with_other_options_is_refused(checkpoint_dir, tmp_path):
    folder, _ = checkpoint_dir("qwen3_moe")
    out = tmp_path / "store"
    out.mkdir()
    (out / CONVERT_PROGRESS_FILE).write_text(json.dumps({"version": 1, "experts": "int8", "dense": "bf16",
                                                         "source": str(folder.resolve())}))
    with pytest.raises(OffloadError, match="other options.*experts 'int8' -> 'int4'"):
        convert(folder, out, "int4", "bf16")


def test_corrupt_progress_file_is_a_clear_error(checkpoint_dir, tmp_path):
    folder, _ = checkpoint_dir("qwen3_moe")
    out = tmp_path / "store"
    out.mkdir()
    (out / CONVERT_PROGRESS_FILE).write_text("{not json")
    with pytest.raises(OffloadError, match="is corrupt; delete"):
        convert(folder, out, "int4")


def test_convert_refuses_a_non_empty_folder_and_is_a_no_op_when_done(checkpoint_dir, tmp_path):
    folder, _ = checkpoint_dir("qwen3_moe")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OffloadError, match="not empty"):
        convert(folder, other, "int4")
    store = convert(folder, tmp_path / "store", "int4")
    before = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
    convert(folder, store, "int4")
    assert {p.name: p.stat().st_mtime_ns for p in store.iterdir()} == before
    with pytest.raises(OffloadError, match="other formats"):
        convert(folder, store, "int8")


def test_truncated_store_shard_is_a_clear_error(checkpoint_dir, tmp_path):
    folder, _ = checkpoint_dir("qwen3_moe")
    store = convert(folder, tmp_path / "store", "int4", "int8")
    shard = sorted(store.glob("model-*.safetensors"))[1]
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=f"{shard.name} is truncated"):
        offload.load(store, device="cpu")
    result = subprocess.run([sys.executable, "-m", "offload.cli", "generate", str(store), "--prompt", "hi"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "truncated" in result.stderr and "Traceback" not in result.stderr


def test_store_rejects_other_expert_formats_and_gpu_dense(checkpoint_dir, tmp_path):
    folder, _ = checkpoint_dir("qwen3_moe")
    store = convert(folder, tmp_path / "store", "int4", "int8")
    assert store_formats(Checkpoint(store)).experts == "int4"
    with pytest.raises(OffloadError, match="holds int4 experts, not int8"):
        offload.load(store, device="cpu", experts="int8")
    for dense in ("int4s", "bf16"):  # its packed dense matrices run as they are stored where the CPU runs them
        with pytest.raises(OffloadError, match=f"holds int8 dense weights, not {dense}"):
            offload.load(store, device="cpu", dense=dense)
    assert offload.load(store, device="cpu", dense="int8").load_info.dense_format == "int8"
    result = invoke("generate", store, "--prompt-ids", "3,4,5", "--device", "cpu", "--dense", "int4s")
    assert_one_line_error(result, "holds int8 dense weights, not int4s", "load it without dense=")
    with pytest.raises(OffloadError, match="already an offload store"):
        convert(store, tmp_path / "again", "int8")


def test_store_on_the_reference_and_hybrid_paths(checkpoint_dir, tmp_path):
    """Packed experts are dequantized where a backend computes in torch (pinned on a device tier) and kept
    packed for the CPU workers; logits stay close to the all-CPU run of the same store."""
    folder, _ = checkpoint_dir("qwen3_moe")
    store = convert(folder, tmp_path / "store", "int8", "bf16")
    cpu = offload.load(store, device="cpu").logits(PROMPT)
    hybrid = offload.load(store, device="cpu", max_context=64, plan=plan(store, 5, 1, fmt="int8"))
    layers = hybrid.plan.layers
    assert any(layer.pinned for layer in layers) and any(layer.host_experts for layer in layers)
    got = hybrid.logits(PROMPT)
    assert (got - cpu).abs().max() / cpu.abs().max() < 0.05


@pytest.mark.parametrize("variant", ["qwen3_moe", "deepseek_v3", "mixtral", "qwen2_moe"])
def test_dense_int8_logits_within_the_documented_bound(checkpoint_dir, variant):
    folder, reference = checkpoint_dir(variant)
    ids = torch.randint(3, 60, (48,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(ids[None]).logits[0].float()
    for dense, bound in (("int8", DENSE_INT8_MEDIAN_ERROR), ("int4", DENSE_INT4_MEDIAN_ERROR)):
        model = offload.load(folder, device="cpu", experts="bf16", dense=dense)
        got = model.logits(ids)
        error = (got - want).abs().max(-1).values / want.abs().max(-1).values  # per position
        assert error.median() < bound, (dense, error.median())
        if dense == "int8":
            assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= DENSE_INT8_ARGMAX_AGREEMENT
    layer = model.transformer.layers[0]
    assert type(layer.attn.o_proj).__name__ == "QuantLinear"
    assert type(model.transformer.lm_head).__name__ == "QuantLinear"


def test_streamed_safetensors_read_back_with_the_library(tmp_path):
    """The shard writer's files (header first, tensors written by jobs at their offsets, in any order) are
    ordinary safetensors files, aligned for every dtype, and refuse a job that writes past its tensor."""
    from safetensors.torch import load_file

    from offload.weights.checkpoint import DTYPE_BYTES, read_safetensors_file
    from offload.weights.safetensors_writer import TensorSpec, write_safetensors

    tensors = {"odd": torch.arange(7, dtype=torch.uint8), "f32": torch.randn(3, 5),
               "bf16": torch.randn(4, 2).bfloat16(), "scalar": torch.tensor(2.5, dtype=torch.float64)}
    dtypes = {torch.uint8: "U8", torch.float32: "F32", torch.bfloat16: "BF16", torch.float64: "F64"}
    specs = [TensorSpec(name, dtypes[t.dtype], tuple(t.shape)) for name, t in tensors.items()]

    def write_in_halves(writer):  # the second half of each tensor first
        for name, t in reversed(tensors.items()):
            data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
            half = len(data) // 2
            writer.write(name, half, data[half:])
            writer.write(name, 0, data[:half])

    write_safetensors(tmp_path / "a.safetensors", specs, [write_in_halves], {"k": "v"})
    loaded = load_file(tmp_path / "a.safetensors")
    assert all(torch.equal(loaded[name], t) for name, t in tensors.items())
    tables, metadata = read_safetensors_file(tmp_path / "a.safetensors")
    assert metadata == {"k": "v"} and all(info.offset % DTYPE_BYTES[info.dtype] == 0 for info in tables.values())

    def overflow(writer):
        writer.write("odd", 4, bytes(4))

    with pytest.raises(ValueError, match="overflow tensor 'odd'"):
        write_safetensors(tmp_path / "b.safetensors", specs, [overflow], {})

"""Checkpoint folders: sharded, bf16, older config spellings, and every bad input with a clear error."""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import offload
from offload.errors import CheckpointError


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


IDS = torch.arange(3, 19)


def reference_logits(ref) -> torch.Tensor:
    with torch.no_grad():
        return ref(IDS[None]).logits[0]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def assert_load_fails(folder: Path, *fragments: str) -> None:
    """Loading fails with a CheckpointError naming every fragment, and writes nothing into the folder."""
    before = snapshot(folder)
    with pytest.raises(CheckpointError) as err:
        offload.load(folder, device="cpu")
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert snapshot(folder) == before


@pytest.fixture
def mixtral_copy(checkpoint_dir, tmp_path) -> Path:
    folder, _ = checkpoint_dir("mixtral")
    clone = tmp_path / "mixtral"
    shutil.copytree(folder, clone)
    return clone


def test_sharded_checkpoint_equals_single_file(checkpoint_dir, tmp_path):
    single, ref = checkpoint_dir("qwen2_moe")
    sharded = tmp_path / "sharded"
    ref.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    a = offload.load(single, device="cpu").logits(IDS)
    b = offload.load(sharded, device="cpu").logits(IDS)
    assert torch.equal(a, b)


def test_bf16_checkpoint_agrees_within_bf16_tolerance(checkpoint_dir, tmp_path):
    _, ref = checkpoint_dir("deepseek_v3")
    folder = tmp_path / "bf16"
    copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    got = offload.load(folder, device="cpu").logits(IDS)
    assert rel_err(got, reference_logits(ref)) <= 3e-2


def test_fp16_checkpoint_loads(checkpoint_dir, tmp_path):
    _, ref = checkpoint_dir("olmoe")
    folder = tmp_path / "fp16"
    copy.deepcopy(ref).to(torch.float16).save_pretrained(folder)
    got = offload.load(folder, device="cpu").logits(IDS)
    assert rel_err(got, reference_logits(ref)) <= 1e-2


def to_older_spelling(config: dict) -> dict:
    """Rewrite a current config.json the way older hub checkpoints spell it."""
    old = dict(config)
    rope = old.pop("rope_parameters")
    old["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    old["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    old["torch_dtype"] = old.pop("dtype")
    if "num_local_experts" in old:
        old["num_experts"] = old.pop("num_local_experts")
    return old


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v2_group_yarn", "mixtral_window_linear_rope"])
def test_older_config_spelling_loads_and_agrees(checkpoint_dir, tmp_path, name):
    folder, ref = checkpoint_dir(name)
    clone = tmp_path / "old"
    shutil.copytree(folder, clone)
    config = json.loads((clone / "config.json").read_text())
    (clone / "config.json").write_text(json.dumps(to_older_spelling(config)))
    new = offload.load(folder, device="cpu")
    old = offload.load(clone, device="cpu")
    assert old.config.rope == new.config.rope
    assert rel_err(old.logits(IDS), reference_logits(ref)) <= 1e-4


def test_deepseek_v3_multi_token_prediction_layer_is_skipped_with_a_notice(checkpoint_dir, tmp_path, caplog):
    folder, ref = checkpoint_dir("deepseek_v3")
    clone = tmp_path / "mtp"
    shutil.copytree(folder, clone)
    layers = ref.config.num_hidden_layers
    save_file({f"model.layers.{layers}.eh_proj.weight": torch.zeros(64, 128),
               f"model.layers.{layers}.enorm.weight": torch.ones(64)}, clone / "mtp.safetensors")
    index = {"metadata": {}, "weight_map": {}}
    for file in ("model.safetensors", "mtp.safetensors"):
        with safe_open(clone / file, "pt") as f:
            index["weight_map"].update({k: file for k in f.keys()})
    (clone / "model.safetensors.index.json").write_text(json.dumps(index))
    with caplog.at_level(logging.WARNING, logger="offload"):
        model = offload.load(clone, device="cpu")
    assert "skipped 2 tensors" in caplog.text
    assert model.load_info.skipped_tensors == 2
    assert rel_err(model.logits(IDS), reference_logits(ref)) <= 1e-4


def test_missing_shard_is_named(checkpoint_dir, tmp_path):
    _, ref = checkpoint_dir("qwen3_moe")
    folder = tmp_path / "sharded"
    ref.save_pretrained(folder, max_shard_size="100KB")
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    assert_load_fails(folder, victim.name, "missing")


def test_truncated_file_is_named(mixtral_copy):
    path = mixtral_copy / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)
    assert_load_fails(mixtral_copy, "model.safetensors", "truncated")


def test_corrupt_header_is_named(mixtral_copy):
    path = mixtral_copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8  # garbage where the JSON header starts
    path.write_bytes(bytes(data))
    assert_load_fails(mixtral_copy, "model.safetensors", "corrupt")


def rewrite_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(mixtral_copy):
    rewrite_tensors(mixtral_copy, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"))
    assert_load_fails(mixtral_copy, "model.layers.1.block_sparse_moe.experts.3.w2.weight", "missing")


def test_unexpected_tensor_is_named(mixtral_copy):
    rewrite_tensors(mixtral_copy, lambda t: t.update({"model.layers.0.mystery.weight": torch.zeros(2)}))
    assert_load_fails(mixtral_copy, "model.layers.0.mystery.weight", "unexpected")


def test_wrong_shape_is_named(mixtral_copy):
    rewrite_tensors(mixtral_copy, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    assert_load_fails(mixtral_copy, "model.norm.weight", "[65]", "[64]")


def test_unsupported_architecture_is_named(mixtral_copy):
    config = json.loads((mixtral_copy / "config.json").read_text())
    config["model_type"] = "llama"
    (mixtral_copy / "config.json").write_text(json.dumps(config))
    assert_load_fails(mixtral_copy, "'llama'", "not supported", "mixtral")


def test_missing_config_and_missing_weights_are_named(mixtral_copy, tmp_path):
    (mixtral_copy / "model.safetensors").unlink()
    assert_load_fails(mixtral_copy, "model.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_load_fails(empty, "config.json")
    with pytest.raises(CheckpointError, match="not a folder"):
        offload.load(tmp_path / "nowhere")


def rewrite_header(path: Path, edit) -> None:
    """Change a safetensors file's JSON header in place, keeping its data bytes."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + length:])


def test_unknown_dtype_is_named(mixtral_copy):
    def edit(header):
        header["model.norm.weight"]["dtype"] = "F12"

    rewrite_header(mixtral_copy / "model.safetensors", edit)
    assert_load_fails(mixtral_copy, "model.norm.weight", "unknown dtype 'F12'")


def test_overlapping_tensors_are_named(mixtral_copy):
    def edit(header):
        # Both norms the same size: point the first at the second's bytes.
        first, second = header["model.layers.0.input_layernorm.weight"], header["model.norm.weight"]
        first["data_offsets"] = second["data_offsets"]

    rewrite_header(mixtral_copy / "model.safetensors", edit)
    assert_load_fails(mixtral_copy, "overlap")


def test_inspect_validates_headers_as_load_does(mixtral_copy):
    from typer.testing import CliRunner

    from offload.cli import app

    rewrite_header(mixtral_copy / "model.safetensors", lambda h: h["model.norm.weight"].update(dtype="F12"))
    result = CliRunner().invoke(app, ["inspect", str(mixtral_copy)])
    assert result.exit_code == 2 and "unknown dtype 'F12'" in result.stderr and "Traceback" not in result.output

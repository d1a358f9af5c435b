"""Quantized checkpoints as published (FP8 blocks, compressed-tensors int4, MXFP4, GPTQ, AWQ): tiny models written
by transformers, their tensors rewritten in each scheme's layout (offload.weights.encoders), loaded and converted.

References: transformers' own FP8 loader for FP8 (asked to dequantize, as it does by itself without a GPU); for the
integer schemes, transformers on a plain folder holding the dequantized values of the published tensors
(offload.weights.codecs, themselves held to independent references in test_codecs.py).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import offload
from offload.errors import CheckpointError
from offload.weights import encoders
from offload.weights.checkpoint import Checkpoint
from offload.weights.store import convert

from tiny_models import COMMON, VARIANTS

# Widths that are whole quantization groups (32) and GPTQ/AWQ words (8): hidden 64, expert intermediate 32.
DEEPSEEK = ("deepseek_v3", {**VARIANTS["deepseek_v3"][1], "moe_intermediate_size": 32, "intermediate_size": 64})
QWEN3 = ("qwen3_moe", {**VARIANTS["qwen3_moe"][1], "head_dim": 32, "moe_intermediate_size": 32,
                       "intermediate_size": 64})

ALL_LINEARS = re.compile(r"^model\.layers\.\d+\..*_proj(_with_mqa)?\.weight$")  # attention, MLPs, experts
ROUTED_EXPERTS = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.\w+_proj\.weight$")


def fp8_config(ue8m0: bool = False) -> dict:
    qc = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    return {**qc, "scale_fmt": "ue8m0"} if ue8m0 else qc


CT_CONFIG = {  # Kimi-K2-Thinking's, trimmed: routed experts only, symmetric int4 with a scale per 32
    "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                                  "weights": {"num_bits": 4, "type": "int", "symmetric": True, "group_size": 32,
                                              "strategy": "group", "dynamic": False, "observer": "minmax"}}},
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
}


def gptq_config(act_order: bool) -> dict:
    return {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": act_order, "sym": False,
            "checkpoint_format": "gptq", "true_sequential": True}


AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True}


def fp8_parts(name: str, w: torch.Tensor, ue8m0: bool = False) -> dict[str, torch.Tensor]:
    weight, scale_inv = encoders.encode_fp8_block(w, ue8m0=ue8m0)
    # Published ue8m0 checkpoints (DeepSeek-V3.1) keep the power-of-two scales in float32.
    return {name: weight, f"{name}_scale_inv": scale_inv.float()}


def ct_parts(name: str, w: torch.Tensor, symmetric: bool = True) -> dict[str, torch.Tensor]:
    base = name.removesuffix(".weight")
    return {f"{base}.{k}": v for k, v in encoders.encode_compressed_int4(w, 32, symmetric=symmetric).items()}


def asymmetric(quant_config: dict) -> dict:
    group = quant_config["config_groups"]["group_0"]
    weights = {**group["weights"], "symmetric": False}
    return {**quant_config, "config_groups": {"group_0": {**group, "weights": weights}}}


def mxfp4_parts(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    blocks, scales = encoders.encode_mxfp4(w)
    return {f"{name}_blocks": blocks, f"{name}_scales": scales}


def gptq_parts(act_order: bool) -> Callable[[str, torch.Tensor], dict[str, torch.Tensor]]:
    def parts(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        base = name.removesuffix(".weight")
        return {f"{base}.{k}": v for k, v in encoders.encode_gptq(w, 32, act_order).items()}

    return parts


def awq_parts(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    base = name.removesuffix(".weight")
    return {f"{base}.{k}": v for k, v in encoders.encode_awq(w, 32).items()}


# scheme -> (model, tensors it quantizes, writer of one tensor's parts, quantization_config)
SCHEMES = {
    "fp8": (DEEPSEEK, ALL_LINEARS, fp8_parts, fp8_config()),
    "fp8_ue8m0": (DEEPSEEK, ALL_LINEARS, lambda n, w: fp8_parts(n, w, ue8m0=True), fp8_config(ue8m0=True)),
    "compressed_int4": (DEEPSEEK, ROUTED_EXPERTS, ct_parts, CT_CONFIG),
    "compressed_int4_asym": (DEEPSEEK, ROUTED_EXPERTS, lambda n, w: ct_parts(n, w, symmetric=False),
                             asymmetric(CT_CONFIG)),
    "mxfp4": (QWEN3, ROUTED_EXPERTS, mxfp4_parts, {"quant_method": "mxfp4"}),
    "gptq": (QWEN3, ALL_LINEARS, gptq_parts(False), gptq_config(False)),
    "gptq_act_order": (QWEN3, ALL_LINEARS, gptq_parts(True), gptq_config(True)),
    "awq": (QWEN3, ALL_LINEARS, awq_parts, AWQ_CONFIG),
}


def write_tiny(model: tuple[str, dict], folder: Path, seed: int = 0) -> None:
    import transformers

    model_type, overrides = model
    config = transformers.CONFIG_MAPPING[model_type](**{**COMMON, **overrides})
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    for name, buffer in hf.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.randn_like(buffer) * 0.3)
    hf.save_pretrained(folder)


def quantize_folder(folder: Path, targets: re.Pattern, parts: Callable, quant_config: dict) -> None:
    """Rewrite a single-file folder in a scheme's layout: each target tensor replaced by its encoded parts."""
    tensors = load_file(folder / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        out.update(parts(name, tensor) if targets.match(name) else {name: tensor})
    save_file({k: v.contiguous() for k, v in out.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quant_config}, indent=2))


def dequantized_folder(quantized: Path, out: Path) -> Path:
    """A plain copy of a quantized folder holding each logical tensor's dequantized values (the reference)."""
    checkpoint = Checkpoint(quantized)
    out.mkdir()
    save_file({name: checkpoint.read_logical(name).float().contiguous() for name in checkpoint.logical},
              out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((quantized / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def folder(scheme: str) -> Path:
        if scheme not in made:
            model, targets, parts, quant_config = SCHEMES[scheme]
            path = tmp_path_factory.mktemp(scheme)
            write_tiny(model, path)
            quantize_folder(path, targets, parts, quant_config)
            made[scheme] = path
        return made[scheme]

    return folder


IDS = [3, 17, 5, 60, 2, 41, 9, 88, 30, 12, 7, 55]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def hf_model(folder: Path) -> torch.nn.Module:
    """transformers' float32 model of the folder. An FP8 folder is dequantized by transformers' own loader on every
    machine: it does so by itself only without a GPU (with one it keeps the FP8 weights and quantizes the
    activations)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    quantization = getattr(config, "quantization_config", None)
    if isinstance(quantization, dict) and quantization.get("quant_method") == "fp8":
        config.quantization_config = {**quantization, "dequantize": True}
    return transformers.AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32).eval()


def hf_logits(folder: Path) -> torch.Tensor:
    model = hf_model(folder)
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].float()


def test_fp8_matches_transformers_fp8_loader(folders):
    """transformers dequantizes the FP8 folder itself; offload's int8 experts (the default) and bf16 experts stay
    within the bounds measured here (max |logit error| / max |logit|)."""
    folder = folders("fp8")
    reference = hf_logits(folder)
    default = offload.load(folder, device="cpu")
    assert default.load_info.expert_format == "int8"
    assert relative_error(default.logits(IDS), reference) < 0.03
    bf16 = offload.load(folder, device="cpu", experts="bf16")
    assert relative_error(bf16.logits(IDS), reference) < 0.01


@pytest.mark.parametrize("scheme", ["fp8_ue8m0", "compressed_int4", "compressed_int4_asym", "mxfp4", "gptq",
                                    "gptq_act_order", "awq"])
def test_scheme_matches_dequantized_reference(folders, tmp_path, scheme):
    folder = folders(scheme)
    reference = hf_logits(dequantized_folder(folder, tmp_path / "plain"))
    model = offload.load(folder, device="cpu")
    assert model.load_info.expert_format == Checkpoint(folder).scheme.expert_format
    # int8 activations in the CPU kernels (docs/formats.md) bound the error of exactly mapped grids too.
    assert relative_error(model.logits(IDS), reference) < 0.03


@pytest.mark.parametrize("scheme, experts", [("compressed_int4", None), ("mxfp4", None),
                                             ("compressed_int4", "int4s")])
def test_lossless_schemes_keep_every_weight(folders, scheme, experts):
    """Compressed-tensors int4 -> offload int4 and MXFP4 -> offload int8 move the published grid, bit for bit;
    so does symmetric compressed-tensors int4 -> int4s (its signed grid is Q4_0's, without the offsets)."""
    from csrc_py.formats import unpack

    folder = folders(scheme)
    checkpoint = Checkpoint(folder)
    model = offload.load(folder, device="cpu", experts=experts)
    from offload.model.moe import MoE

    assert experts is None or model.transformer.moe_blocks()[0].experts.fmt == experts

    for layer, block in enumerate(model.transformer.layers):
        if not isinstance(block.mlp, MoE):
            continue
        experts = block.mlp.experts
        for e in range(experts.gate.shape[0]):
            for proj, matrix in (("gate_proj", experts.gate), ("down_proj", experts.down)):
                expected = checkpoint.read_logical(f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight")
                np.testing.assert_array_equal(unpack(matrix, e), expected.numpy())


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_convert_equals_load(folders, tmp_path, scheme):
    folder = folders(scheme)
    store = convert(folder, tmp_path / "store", experts=None)
    loaded = offload.load(folder, device="cpu").logits(IDS)
    stored = offload.load(store, device="cpu")
    assert stored.load_info.store
    torch.testing.assert_close(stored.logits(IDS), loaded, rtol=0, atol=0)


def test_unknown_scheme_fails_before_reading_anything(folders, tmp_path, monkeypatch):
    folder = tmp_path / "bnb"
    write_tiny(QWEN3, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")  # reading it would fail differently

    def no_reads(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr("offload.weights.checkpoint.safe_open", no_reads)
    with pytest.raises(CheckpointError, match="'bitsandbytes' is not supported; offload reads fp8"):
        offload.load(folder, device="cpu")
    with pytest.raises(CheckpointError, match="bitsandbytes"):
        convert(folder, tmp_path / "out", experts="int8")
    assert not (tmp_path / "out").exists()


def test_quant_config_from_side_file(folders, tmp_path):
    """Some checkpoints keep quantization_config in quantization_config.json instead of config.json."""
    import shutil

    folder = tmp_path / "side"
    shutil.copytree(folders("mxfp4"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "quantization_config.json").write_text(json.dumps(config.pop("quantization_config")))
    (folder / "config.json").write_text(json.dumps(config))
    assert Checkpoint(folder).scheme.method == "mxfp4"
    offload.load(folder, device="cpu").logits(IDS[:3])


def test_unused_tensor_is_refused_by_load_and_convert(folders, tmp_path):
    import shutil

    folder = tmp_path / "extra"
    shutil.copytree(folders("fp8"), folder)
    tensors = load_file(folder / "model.safetensors")
    extra = "model.layers.1.mlp.experts.0.gate_proj.input_scale"  # a static-activation scale: not ours to drop
    tensors[extra] = torch.ones(1)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"unexpected tensors '{extra}'"):
        offload.load(folder, device="cpu")
    with pytest.raises(CheckpointError, match=f"unexpected tensors '{extra}'"):
        convert(folder, tmp_path / "out", experts="int8")
    assert not (tmp_path / "out").exists()


def test_fp8_weight_without_scale_is_refused(folders, tmp_path):
    import shutil

    folder = tmp_path / "noscale"
    shutil.copytree(folders("fp8"), folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="'model.layers.0.self_attn.o_proj.weight' has no weight_scale_inv"):
        Checkpoint(folder)


def test_inspect_names_the_scheme(folders):
    from offload.inspect import describe

    report = describe(folders("fp8"))
    assert report["quantization"]["method"] == "fp8"
    assert report["quantization"]["expert_format"] == "int8"
    assert describe(folders("compressed_int4"))["quantization"]["lossless"] is True

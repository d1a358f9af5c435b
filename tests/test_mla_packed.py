"""MLA's absorbed W_UK and W_UV packed per head where a CPU-only run packs its dense weights (int8 / int4 / int4s),
as llama.cpp's attn_k_b / attn_v_b: the per-head linear, the layout, and one set of weights for every form."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import offload
from csrc_py.dispatch import heads_linear, linear
from csrc_py.formats import pack, unpack
from csrc_py.linear import linear_q8
from offload.model.layers import HeadsLinear


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4", "int4s"])
def test_heads_linear_is_each_heads_own_linear(fmt):
    """One grouped call over every head gives, bit for bit, each head's matrix run as a dense linear (the same
    kernel and activation quantization), and stays within int8 activations' rounding of the float product."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 40, 44, generator=g)  # O and K not whole groups: padding on both sides
    x = torch.randn(3, 2, 44, generator=g)
    packed = pack(w, fmt)
    got = heads_linear(x, packed)
    assert got.shape == (3, 2, 40)
    for h in range(3):
        torch.testing.assert_close(got[h], linear(x[h], pack(w[h: h + 1], fmt)), rtol=0, atol=0)
    exact = torch.einsum("hnk,hok->hno", x, torch.from_numpy(unpack(packed)))
    assert (got - exact).norm() / exact.norm() < 1e-2


def test_heads_linear_refuses_what_it_cannot_run():
    packed = pack(torch.randn(2, 16, 32), "int8")
    with pytest.raises(ValueError, match="expected x"):
        heads_linear(torch.randn(3, 1, 32), packed)  # three heads for a stack of two
    with pytest.raises(ValueError, match="expected x"):
        heads_linear(torch.randn(2, 1, 16), packed)  # rows of 16 for matrices of 32 columns
    with pytest.raises(ValueError, match="whole number per matrix"):  # the kernel's own check: 3 rows over 2
        linear_q8(np.zeros((3, 32), np.float32), *packed.bits()[:2], np.zeros((3, 16), np.float32))


@pytest.mark.parametrize("dense", ["int8", "int4s"])
def test_a_cpu_run_packs_w_uk_and_w_uv_per_head(checkpoint_dir, dense):
    """k_b [heads, rank, nope] is W_UK transposed per head and v_b [heads, v, rank] W_UV, quantized in the dense
    format; no float copy of kv_b_proj is kept (a prefill's naive form dequantizes the packed values)."""
    folder, reference = checkpoint_dir("deepseek_v2")
    model = offload.load(folder, device="cpu", experts="int8", dense=dense, max_context=32)
    for i, layer in enumerate(model.transformer.layers):
        attn = layer.attn
        assert attn.kv_b_proj is None and attn.w_uk is None
        assert isinstance(attn.k_b, HeadsLinear) and attn.k_b.packed.fmt == dense == attn.v_b.packed.fmt
        assert attn.k_b.packed.shape == (attn.heads, attn.rank, attn.nope)
        assert attn.v_b.packed.shape == (attn.heads, attn.v_dim, attn.rank)
        want = reference.state_dict()[f"model.layers.{i}.self_attn.kv_b_proj.weight"].float()
        want = want.view(attn.heads, attn.nope + attn.v_dim, attn.rank)
        w_uk, w_uv = attn.k_b.dequantized().transpose(1, 2), attn.v_b.dequantized()
        bound = 0.01 if dense == "int8" else 0.15  # a group's rounding: absmax / 254 and / 16
        assert (w_uk - want[:, : attn.nope]).norm() / want[:, : attn.nope].norm() < bound
        assert (w_uv - want[:, attn.nope:]).norm() / want[:, attn.nope:].norm() < bound


def test_bf16_dense_keeps_kv_b_proj_as_it_is(checkpoint_dir):
    folder, reference = checkpoint_dir("deepseek_v2")
    model = offload.load(folder, device="cpu", experts="int8", max_context=32)
    attn = model.transformer.layers[1].attn
    assert attn.k_b is None and attn.v_b is None
    torch.testing.assert_close(attn.kv_b_proj.weight,
                               reference.state_dict()["model.layers.1.self_attn.kv_b_proj.weight"].float())


@pytest.mark.parametrize("name", ["deepseek_v2", "deepseek_v3"])
def test_the_naive_and_absorbed_forms_agree_on_packed_weights(checkpoint_dir, name):
    """A prefill (the naive form: latents expanded through kv_b_proj) and the same tokens one step at a time (the
    absorbed form through k_b and v_b): the same weights, so they differ only by the int8 activations of the two
    per-head products (measured: 1.6-3.4% of the largest logit in these tiny models, whose heads quantize 12 and 16
    values a group; bit-equal where kv_b_proj stays unpacked)."""
    folder, _ = checkpoint_dir(name)
    model = offload.load(folder, device="cpu", experts="int8", dense="int8", max_context=32)
    ids = torch.arange(3, 19)  # 16 tokens: past the absorbed form's 8
    prefill = model.logits(ids)
    with torch.inference_mode():
        steps = torch.cat([model.transformer(ids[i: i + 1], i) for i in range(len(ids))])
    error = (steps - prefill).abs().max(-1).values / prefill.abs().max(-1).values
    assert error.max() < 0.05, error.tolist()
    assert (steps.argmax(-1) == prefill.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("dense", ["int8", "int4s"])
def test_a_store_on_the_device_tier_takes_w_uk_and_w_uv_as_a_cpu_run_packs_them(checkpoint_dir, tmp_path, dense):
    """A store keeps kv_b_proj in the model dtype and a CPU-only run packs its halves in the store's dense format;
    the device tier (simulated here, as on a GPU) multiplies by the same rounded values, so a store's weights do not
    depend on where it runs: its logits there differ from a CPU-only run's by the CPU kernels' int8 activations
    alone (measured: 1.5-1.9% of the largest logit by position; 9.5-10% at int4 with kv_b_proj unrounded)."""
    from offload.weights.store import convert

    folder, _ = checkpoint_dir("deepseek_v3")
    store = convert(folder, tmp_path / "store", "int8", dense)
    cpu = offload.load(store, device="cpu", dtype="float32", max_context=64)
    tier = offload.load(store, device="cpu", dtype="float32", max_context=64, gpu_memory="1GiB")
    assert not any(layer.host_experts for layer in tier.plan.layers)
    for packed, rounded in zip(cpu.transformer.layers, tier.transformer.layers):
        assert torch.equal(rounded.attn.w_uk, packed.attn.k_b.dequantized().transpose(1, 2))
        assert torch.equal(rounded.attn.w_uv, packed.attn.v_b.dequantized())
        halves = torch.cat([rounded.attn.w_uk, rounded.attn.w_uv], dim=1)  # the naive form's kv_b_proj too
        assert torch.equal(rounded.attn.kv_b_proj.weight, halves.reshape(-1, rounded.attn.rank))
    ids = torch.arange(3, 19)
    want, got = cpu.logits(ids), tier.logits(ids)
    error = (got - want).abs().max(-1).values / want.abs().max(-1).values  # per position
    assert error.median() < 0.03, error.tolist()

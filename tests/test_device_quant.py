"""The quantized device tier: int8 / int4 weight-only Linears in torch (model/device_quant.py) against the
dequantized matmul, whole models on the simulated device tier within the dense formats' documented bounds, and
the planner choosing the device tier's dense format (bf16 while it fits, then int8, then int4)."""
from __future__ import annotations

import json

import pytest
import torch

import offload
from offload.arch import architecture
from offload.model.device_quant import (ROWS, DeviceQuantLinear, Int4Weight, Int8Weight, int4_grid, nbytes, quantize,
                                        quantize_int8)
from offload.model.layers import FusedDeviceQuantLinear, Linear, QuantLinear, group_linears
from offload.placement import PlanError, PlanRequest, inventory, kv_cache_bytes, make_plan
from offload.placement.inventory import DEVICE_GROUPS, Inventory
from offload.placement.planner import AUTO_DENSE
from test_cli import assert_one_line_error, invoke
from test_store import DENSE_INT4_MEDIAN_ERROR, DENSE_INT8_ARGMAX_AGREEMENT, DENSE_INT8_MEDIAN_ERROR
from tiny_models import cli_text, landing_bytes, rel_err

SHAPES = [(48, 64), (40, 72), (20, 40), (7, 33)]  # whole groups and rows, then padded ones


def weights(O: int, K: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(O, K, generator=g) * torch.rand(O, 1, generator=g)  # rows of different scales


@pytest.mark.parametrize("O, K", SHAPES)
def test_int8_linear_is_the_dequantized_matmul(O, K):
    w, x, bias = weights(O, K), torch.randn(5, K), torch.randn(O)
    packed = quantize_int8(w, torch.float32)
    step = packed.scale[:, None]
    assert ((packed.dequantize() - w).abs() <= step / 2 + 1e-6).all()  # round to nearest on a per-row grid
    y = DeviceQuantLinear(packed, bias)(x)
    assert y.shape == (5, O)
    assert rel_err(y, x @ packed.dequantize().T + bias) <= 1e-5
    # A model dtype of bf16: scales and activations in bf16, the product within bf16's rounding.
    half = quantize_int8(w, torch.bfloat16)
    got = DeviceQuantLinear(half)(x.bfloat16()).float()
    assert rel_err(got, x.bfloat16().float() @ half.dequantize().T) <= 2e-2


@pytest.mark.parametrize("O, K", SHAPES)
@pytest.mark.parametrize("block_rows", [1, 3, 1000])
def test_int8_on_cuda_computes_what_the_weight_only_kernel_does(O, K, block_rows):
    """CUDA runs int8 as torch's dense matmul over q converted a block of rows at a time (its weight-only kernel
    is slow there): the same products as `_weight_int8pack_mm`, one block or many."""
    from offload.model.device_quant import dequantized_int8_matmul, int8_kernel

    assert int8_kernel(torch.device("cuda")) == "dequantized" and int8_kernel(torch.device("cpu")) == "int8pack"
    w, x = weights(O, K), torch.randn(5, K)
    for dtype, bound in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        packed = quantize_int8(w, dtype)
        xp = torch.nn.functional.pad(x, (0, packed.q.shape[1] - K)).to(dtype)
        block_bytes = block_rows * packed.q.shape[1] * xp.element_size()
        got = dequantized_int8_matmul(xp, packed.q, packed.scale, block_bytes)
        assert got.shape == (5, O) and got.dtype == dtype
        assert rel_err(got.float(), torch._weight_int8pack_mm(xp, packed.q, packed.scale).float()) <= bound


@pytest.mark.parametrize("O, K", SHAPES)
def test_int4_linear_is_the_dequantized_matmul(O, K):
    w, x = weights(O, K, 1), torch.randn(5, K)
    q, scale, zero = int4_grid(w, torch.float32)
    groups = q.shape[1] // 32
    dequantized = ((q.float().reshape(-1, groups, 32) - 8) * scale[..., None] + zero[..., None]).reshape(q.shape)
    assert q.min() >= 0 and q.max() <= 15 and q.shape[0] % ROWS == 0 and q.shape[1] % 32 == 0
    step = scale.repeat_interleave(32, dim=1)[:O, :K]
    assert ((dequantized[:O, :K] - w).abs() <= step / 2 + 1e-5).all()  # each group spans its min..max
    linear = DeviceQuantLinear(quantize(w, "int4", torch.float32))
    assert rel_err(linear(x), x @ dequantized[:O, :K].T) <= 1e-5
    assert linear(x[None]).shape == (1, 5, O)  # leading dims kept


@pytest.mark.parametrize("O, K", SHAPES)
def test_int4s_linear_is_the_cpu_int4s_matmul(O, K):
    """dense="int4s" on the device tier: torch's int4 kernel with zero 0 holds the values of the CPU format (Q4_0's
    rounding; scales in the model dtype, float32 here, so they round to fp16 alike only where exact)."""
    from csrc_py.formats import pack, unpack

    w, x = weights(O, K, 2), torch.randn(5, K)
    q, scale, zero = int4_grid(w, torch.float32, symmetric=True)
    assert not zero.any() and q.min() >= 0 and q.max() <= 15
    dequantized = ((q.float().reshape(-1, q.shape[1] // 32, 32) - 8) * scale[..., None]).reshape(q.shape)[:O, :K]
    cpu = torch.from_numpy(unpack(pack(w[None], "int4s"))[0])
    assert rel_err(dequantized, cpu) <= 1e-3  # the same grid: the scales differ by fp16 rounding only
    linear = DeviceQuantLinear(quantize(w, "int4s", torch.float32))
    assert rel_err(linear(x), x @ dequantized.T) <= 1e-5


@pytest.mark.parametrize("fmt, dtype", [("int8", torch.float32), ("int8", torch.bfloat16), ("int4", torch.float32),
                                        ("int4", torch.bfloat16), ("int4s", torch.float32)])
@pytest.mark.parametrize("O, K", SHAPES)
def test_planned_bytes_are_the_bytes_held(fmt, dtype, O, K):
    held = quantize(weights(O, K), fmt, dtype)
    assert isinstance(held, Int8Weight if fmt == "int8" else Int4Weight)
    assert nbytes(fmt, O, K, torch.tensor([], dtype=dtype).element_size()) == held.nbytes


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linears_reading_one_input_run_as_one_call_with_the_same_numbers(fmt, dtype):
    """q/k/v-like parts (odd heights, a part without bias) stacked along their outputs: each part's output is the one
    it computes alone, exactly (the layouts keep rows apart)."""
    x = torch.randn(3, 40).to(dtype)
    biases = [torch.randn(20).to(dtype), None, torch.randn(130).to(dtype)]
    parts = [DeviceQuantLinear(quantize(weights(O, 40, seed=i), fmt, dtype), bias)
             for i, (O, bias) in enumerate(zip((20, 7, 130), biases))]
    fused = group_linears(parts)
    assert type(fused) is FusedDeviceQuantLinear
    for got, part in zip(fused(x), parts):
        assert torch.equal(got, part(x))
    mixed = [parts[0], DeviceQuantLinear(quantize(weights(8, 40), "int4" if fmt == "int8" else "int8", dtype))]
    assert type(group_linears(mixed)) is not FusedDeviceQuantLinear  # formats differ: one call each


def test_dense_int8_and_int4_on_the_device_tier_within_the_documented_bounds(checkpoint_dir):
    """The device tier's formats give the CPU kernels' documented whole-model bounds (tests/test_store.py) on the
    tiny DeepSeek-V3 (MLA with q-LoRA, a dense layer, a shared expert): every projection the CPU path packs is a
    DeviceQuantLinear, kv_b_proj and the routers stay in the model dtype."""
    folder, reference = checkpoint_dir("deepseek_v3")
    ids = torch.randint(3, 60, (48,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(ids[None]).logits[0].float()
    for dense, bound in (("int8", DENSE_INT8_MEDIAN_ERROR), ("int4", DENSE_INT4_MEDIAN_ERROR)):
        model = offload.load(folder, device="cpu", gpu_memory="1GiB", max_context=64, dense=dense)
        assert model.plan.dense_format == dense and model.load_info.dense_format == dense
        assert f"dense weights quantized to {dense}" in model.plan.table()
        layers = model.transformer.layers
        attn, mlp, moe = layers[0].attn, layers[0].mlp, layers[1].mlp
        quantized = [attn.o_proj, attn.q_b_proj, attn.input_projs.linear, mlp.down, mlp.gate_up.linear,
                     moe.shared.down, moe.shared.gate_up.linear, model.transformer.lm_head]
        assert all(type(m) is DeviceQuantLinear and m.weight.fmt == dense for m in quantized)
        assert type(attn.kv_b_proj) is Linear
        got = model.logits(ids)
        error = (got - want).abs().max(-1).values / want.abs().max(-1).values  # per position
        assert error.median() < bound, (dense, error.median())
        if dense == "int8":
            assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= DENSE_INT8_ARGMAX_AGREEMENT
            with torch.inference_mode():  # decode steps (MLA's absorbed form) through the same Linears
                steps = torch.cat([model.transformer(ids[i: i + 1], i) for i in range(len(ids))])
            assert rel_err(steps, got) <= 1e-4


def test_cpu_alone_keeps_the_cpu_kernels(checkpoint_dir):
    folder, _ = checkpoint_dir("deepseek_v3")
    model = offload.load(folder, device="cpu", max_context=64, dense="int8")
    assert model.plan is None and type(model.transformer.layers[0].attn.o_proj) is QuantLinear


def budgets(folder, max_context: int = 64) -> tuple[int, int, int, int]:
    """(always-on-device bytes with dense weights in float32, in int8, in int4; one cache slot per MoE layer and the
    staging ring's landing buffers that uploads into it need)."""
    model = offload.load(folder, device="cpu", max_context=max_context)
    cfg = model.config
    inv = inventory(cfg, architecture(cfg.model_type).names)
    kv = kv_cache_bytes(cfg, max_context, 4)
    fixed = [sum(inv.device_bytes(4, fmt).values()) + kv for fmt in (None, "int8", "int4")]
    return (*fixed, len(inv.moe_layers) * inv.expert_params * 4 + landing_bytes(cfg))


def test_the_planner_quantizes_the_dense_weights_only_when_the_model_dtype_leaves_no_room(checkpoint_dir):
    folder, _ = checkpoint_dir("deepseek_v3")
    ids = torch.arange(3, 27)
    expected = offload.load(folder, device="cpu", max_context=64).logits(ids)
    fp32, int8, int4, slot_room = budgets(folder)
    assert fp32 > int8 and fp32 > int4  # (int4's padding and scales outweigh its nibbles at this size)

    roomy = offload.load(folder, device="cpu", max_context=64, gpu_memory=fp32 + slot_room, slots="bf16")
    assert roomy.plan.dense_format is None and "quantized" not in roomy.plan.table()
    assert rel_err(roomy.logits(ids), expected) <= 1e-5  # placement never changes the numbers

    tight = offload.load(folder, device="cpu", max_context=64, gpu_memory=fp32 + slot_room - 1)
    assert tight.plan.dense_format == "int8" and tight.load_info.dense_format == "int8"
    assert tight.plan.device_fixed_bytes == int8 and tight.plan.device_bytes <= tight.plan.device_budget
    assert type(tight.transformer.lm_head) is DeviceQuantLinear
    assert "device tier (float32, dense int8)" in tight.plan.table()

    # An explicit format overrides; a plan made for int8 loads int8 and refuses another dense option.
    asked = offload.plan(folder, gpu_memory=fp32 + slot_room, max_context=64, device="cpu", dense="int4")
    assert asked.dense_format == "int4"
    again = offload.Plan.from_json(tight.plan.to_json())
    assert offload.load(folder, device="cpu", max_context=64, plan=again).load_info.dense_format == "int8"
    with pytest.raises(offload.OffloadError, match="plan keeps the dense weights as int8, not bf16"):
        offload.load(folder, device="cpu", max_context=64, plan=again, dense="bf16")
    with pytest.raises(offload.OffloadError, match=r"budget is .*; lower max_context, quantize the dense weights"):
        offload.load(folder, device="cpu", max_context=64, gpu_memory=fp32 - 1, dense="bf16")
    with pytest.raises(offload.OffloadError, match=r"with int4 dense weights .* but the device budget"):
        offload.load(folder, device="cpu", max_context=64, gpu_memory=min(int8, int4) - 1)


def test_dense_format_choice_is_a_pure_rule():
    """The first format leaving a cache slot per MoE layer, else the first that fits at all, else one error."""
    inv = Inventory(params={**dict.fromkeys(DEVICE_GROUPS, 0), "attention": 64 * 64}, router_params=0,
                    expert_params=1000, moe_layers=(0, 1), num_experts=4, top_k=2,
                    dense_shapes={"attention": ((64, 64),)})
    fp32, int8, int4, slots = 64 * 64 * 4, 64 * 64 + 64 * 4, 64 * 64 // 2 + 2 * 64 * 2 * 4, 2 * 1000 * 4

    def chosen(budget: int, dense=AUTO_DENSE) -> str | None:
        request = PlanRequest(budget, 2**40, 64, 0, 4, "float32", 4000, dense_formats=dense)
        return make_plan(inv, request).dense_format

    assert chosen(fp32 + slots) is None
    assert chosen(fp32 + slots - 1) == "int8"
    assert chosen(int8 + slots - 1) == "int4"
    assert chosen(int4 + slots - 1) == "int8"  # no room for slots anywhere: the first that fits
    assert chosen(fp32, dense=(None,)) is None  # the default request (tools, tests): the model dtype only
    with pytest.raises(PlanError, match="need 0.02 MiB in 32-bit floats, 0.00 MiB with int8 dense weights or "):
        chosen(int4 - 1)


# Published config.json files (the keys that size them).
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 1,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False, "rope_theta": 10000, "attention_bias": False, "torch_dtype": "bfloat16",
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]}}
KIMI_K2 = {
    **DEEPSEEK_V3, "model_type": "kimi_k2", "vocab_size": 163840, "num_attention_heads": 64,
    "num_key_value_heads": 64, "n_routed_experts": 384, "routed_scaling_factor": 2.827, "n_group": 1,
    "topk_group": 1, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0, "max_position_embeddings": 131072,
    "rope_theta": 50000.0, "bos_token_id": 163584, "eos_token_id": 163585,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"}}
A_24GB_CARD = ["--gpu-memory", "24GiB", "--dtype", "bfloat16", "--host-memory", "1TiB", "--max-context", "8192",
               "--experts", "int4"]


@pytest.mark.parametrize("hf, moe_layers", [(DEEPSEEK_V3, 58), (KIMI_K2, 60)])
def test_deepseek_v3_and_kimi_k2_plan_on_a_24_gib_card(tmp_path, hf, moe_layers):
    """bf16 leaves no room for a cache slot per MoE layer (DeepSeek-V3's does not even fit): the planner quantizes the
    dense weights to int8 and says so, and, with fewer than top-k bf16 slots per layer left, keeps the resident
    experts in the host's int4; a budget too small even for int4 is one clear error."""
    (tmp_path / "config.json").write_text(json.dumps(hf))
    plan = offload.Plan.from_json(cli_text("plan", tmp_path, *A_24GB_CARD, "--json"))
    assert plan.dense_format == "int8" and plan.device_dtype == "bfloat16"
    assert len(plan.layers) == moe_layers and plan.device_bytes <= plan.device_budget == 24 * 2**30
    assert sum(layer.cache_slots for layer in plan.layers) >= moe_layers
    table = cli_text("plan", tmp_path, *A_24GB_CARD)
    assert "dense weights quantized to int8" in table and "device tier (bfloat16, dense int8, slots int4)" in table
    assert plan.slot_format == "int4" and {"staging landing", "stream buffer"} <= set(plan.device_buffers)
    # The double buffer's 16 rows are int4 rows like the slots' (26.3 MiB each for DeepSeek-V3, not 84.0 in bf16).
    assert plan.stream_buffer_format == "int4" and plan.stream_buffer_experts == 16
    assert plan.device_buffers["stream buffer"] == 16 * plan.expert_device_bytes and "16 rows of int4" in table

    int4 = offload.Plan.from_json(cli_text("plan", tmp_path, *A_24GB_CARD, "--dense", "int4", "--json"))
    assert int4.dense_format == "int4" and int4.device_fixed_bytes < plan.device_fixed_bytes
    roomy = offload.Plan.from_json(cli_text("plan", tmp_path, *A_24GB_CARD[2:], "--gpu-memory", "80GiB", "--json"))
    assert roomy.dense_format is None  # bf16 while it fits
    smaller = plan.device_fixed_bytes + moe_layers * roomy.expert_device_bytes - 1  # int8: no room for bf16 slots
    tight = offload.Plan.from_json(cli_text("plan", tmp_path, *A_24GB_CARD[2:], "--gpu-memory", smaller, "--json"))
    assert tight.dense_format == "int4" and sum(layer.cache_slots for layer in tight.layers) >= moe_layers

    assert_one_line_error(invoke("plan", tmp_path, *A_24GB_CARD[2:], "--gpu-memory", "6GiB"),
                          "with int4 dense weights", "device budget is 6.000 GiB")


def test_deepseek_v3_streams_where_its_room_holds_int4_rows_but_not_bf16_ones(tmp_path):
    """14.5 GiB: beside the int4 dense weights and the landing buffers, 0.96 GiB is left: less than 16 bf16 rows
    (1.3 GiB: no streaming when the double buffer was always bf16), more than 16 int4 rows (0.4 GiB)."""
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_V3))
    plan = offload.Plan.from_json(cli_text("plan", tmp_path, *A_24GB_CARD[2:], "--gpu-memory", "14.5GiB", "--json"))
    room = plan.device_budget - plan.device_fixed_bytes - plan.device_buffers["staging landing"]
    assert plan.dense_format == "int4" and plan.slot_format == "int4" and 16 * 84 * 2**20 > room
    assert plan.device_buffers["stream buffer"] == 16 * plan.expert_device_bytes <= room

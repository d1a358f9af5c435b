"""Quantized resident experts on the device tier (experts/quant_pool.py) and the device buffers the plan reserves.

- A row's bytes are what the planner counts; an int8 / int4 / int4s pool computes what its dequantized rows give,
  in one kernel call per projection for a decode step (no host read, no weight gather) or row by row.
- Uploads into int4 / int4s rows from a host of the same format copy the packed bytes and lay them out for torch's
  kernel without dequantizing; the row computes with the host's own values (float32 rounding apart), and a pinned
  row holds the same values as an uploaded one.
- Whole models under plans with quantized slots stay within the format's bound of transformers (mixtral,
  deepseek_v3, qwen3_moe, gpt_oss), and with int4 rows and int4 host experts placement changes nothing beyond
  rounding.
- The planner quantizes the rows only when the device dtype leaves fewer than top-k slots per MoE layer, or when
  asked; the choice is in the table and the JSON; a wrong slots option is one line, exit 2.
- The plan reserves the staging ring's landing buffers and the streaming double buffer (its rows in the slot
  format, each candidate format weighed with its own): the plan's landing, stream buffer, row and host figures equal
  the bytes the load allocates, expert biases included (gpt-oss); a budget without room for the landing buffers is
  refused in one line.
"""
from __future__ import annotations

import json

import pytest
import torch

import offload
from offload.experts.base import ExpertBiases, ExpertWeights
from offload.experts.builder import ExpertsBuilder
from offload.experts.cpu import CpuExperts
from offload.experts.device import DeviceExpertPool, ExpertUploader, StagingRing
from offload.experts.quant_pool import QuantExpertPool
from offload.experts.swiglu import swiglu_experts
from offload.placement import PlanError, PlanRequest, expert_host_bytes, inventory, kv_cache_bytes, make_plan
from offload.placement.planner import AUTO_SLOTS, choose_slot_format, stream_buffer_bytes
from offload.arch import architecture
from test_cli import assert_one_line_error, invoke
import test_cpu_model
from test_cpu_model import assert_within_bounds
from test_hybrid import GPU_LIKE_COSTS, IDS, plan, rel_err
from sync_ledger import SyncLedger

bf16_reference = test_cpu_model.bf16_reference  # a fixture: tiny bf16 checkpoints and transformers' logits
QUANT = ("int8", "int4", "int4s")
H, I, E = 64, 40, 6  # I is not a multiple of 32 or 64: the padded rows and groups are exercised


def expert_weights(biased: bool, seed: int = 0) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)
    biases = ExpertBiases(*(torch.randn(E, n, generator=g) / 4 for n in (I, I, H))) if biased else None
    return ExpertWeights(torch.randn(E, I, H, generator=g) / 8, torch.randn(E, I, H, generator=g) / 8,
                         torch.randn(E, H, I, generator=g) / 8, biases)


def dequantized(pool: QuantExpertPool) -> ExpertWeights:
    """The pool's rows as float matrices: each projection applied to the identity."""
    def rows(projection, width):
        return torch.stack([projection.row(r).matmul(torch.eye(width)).T for r in range(pool.num_rows)])

    return ExpertWeights(rows(pool.gate, H), rows(pool.up, H), rows(pool.down, I), pool.biases)


@pytest.mark.parametrize("fmt", QUANT)
@pytest.mark.parametrize("biased", [False, True])
def test_a_quantized_row_costs_what_the_planner_counts_and_computes_its_dequantized_weights(fmt, biased):
    w = expert_weights(biased)
    pool = QuantExpertPool(fmt, [0, 1], 4, H, I, torch.float32, torch.device("cpu"), biased)
    pool.fill(0, w)
    inv_bytes = inventory_like(biased).slot_bytes(4, fmt)
    assert pool.expert_bytes == inv_bytes and pool.nbytes == 6 * inv_bytes
    stacks = [t for p in pool.projections for t in ((p.q, p.scale) if fmt == "int8" else (p.packed, p.scale_zeros))]
    assert sum(t.nbytes for t in stacks) + (sum(b.nbytes for b in pool.biases.stacks()) if biased else 0) \
        == pool.nbytes  # what is allocated
    assert inv_bytes < inventory_like(biased).slot_bytes(4) / 3  # against float32 rows
    flat = dequantized(pool)
    g = torch.Generator().manual_seed(1)
    for tokens in (1, 2, 9):  # a decode step's pairs run every row at once; 18 pairs run row by row
        x = torch.randn(tokens, H, generator=g)
        rows = torch.randint(-1, 6, (tokens, 2), generator=g)
        weights = torch.rand(tokens, 2, generator=g)
        want = swiglu_experts(x, rows, weights, flat.gate, flat.up, flat.down, flat.biases)
        assert rel_err(pool.compute(x, rows, weights), want) <= 1e-5
    assert rel_err(dequantized(pool).gate, w.gate) <= {"int8": 1e-2, "int4": 0.1, "int4s": 0.15}[fmt]


def inventory_like(biased: bool):
    """An inventory whose routed expert is [H, I] (with biases or not), for slot_bytes."""
    from offload.placement.inventory import DEVICE_GROUPS, Inventory

    params = 3 * H * I + (2 * I + H if biased else 0)
    return Inventory(dict.fromkeys(DEVICE_GROUPS, 0), 0, params, (0,), E, 2, {}, (H, I))


def test_a_decode_steps_pairs_read_no_value_back_and_skip_the_rows_not_routed_to():
    pool = QuantExpertPool("int8", [], E, H, I, torch.float32, torch.device("cpu"))
    pool.fill(0, expert_weights(False))
    pool.gate.q[5].fill_(127)  # a row no pair routes to: it may be read, never added
    x, weights = torch.randn(1, H), torch.rand(1, 4)
    rows = torch.tensor([[0, -1, 2, -1]])
    with SyncLedger() as ledger:
        y = pool.compute(x, rows, weights)
    assert ledger.total_host_reads == 0 and not ledger.data_dependent
    only = torch.tensor([[0, 2]])
    assert rel_err(y, pool.compute(x, only, weights[:, [0, 2]])) <= 1e-6


@pytest.mark.parametrize("fmt", ["int4", "int4s"])
def test_uploads_into_rows_of_the_hosts_format_copy_packed_bytes_without_dequantizing(fmt, monkeypatch):
    w = expert_weights(True)
    host = CpuExperts(w, fmt)
    pool = QuantExpertPool(fmt, [], 3, H, I, torch.float32, torch.device("cpu"), biased=True)
    ring = StagingRing(host.packed_expert(0), torch.device("cpu"))
    uploader = ExpertUploader(pool, host, lambda e: e, torch.device("cpu"), ring)
    expected = [host.expert_tensors(e) for e in (4, 1)]  # the host's own weights, dequantized before the check

    def refuse(*args):
        raise AssertionError("an upload into rows of the host's format dequantized")

    monkeypatch.setattr(CpuExperts, "unpacked", refuse)
    for row, expert in enumerate((4, 1)):
        uploader.copy(expert, row)
    assert ring.bytes_copied == 2 * host.expert_nbytes  # the packed bytes: nibbles, fp16 scales, biases
    arrays = 3 if fmt == "int4" else 2  # q, d (and m): gate's nibbles and fp16 scales, as the host holds them
    assert [t.dtype for t in ring.landing[0][:arrays]] == [torch.uint8, torch.float16, torch.float16][:arrays]
    flat = dequantized(pool)
    for row, (gate, up, down, *biases) in enumerate(expected):
        assert rel_err(flat.gate[row], gate) <= 1e-6 and rel_err(flat.up[row], up) <= 1e-6
        assert rel_err(flat.down[row], down) <= 1e-6
        assert torch.equal(pool.biases.down[row], biases[2])


@pytest.mark.parametrize("name, fmt", [("mixtral", "int8"), ("mixtral", "int4"), ("deepseek_v3", "int8"),
                                       ("deepseek_v3", "int4s"), ("qwen3_moe", "int8"), ("gpt_oss", "int8"),
                                       ("gpt_oss", "int4")])
def test_plans_with_quantized_slots_stay_within_the_formats_bound_of_transformers(bf16_reference, monkeypatch,
                                                                                   name, fmt):
    """int8 rows beside bf16 host experts; int4 / int4s rows beside host experts of the same format."""
    folder, _, expected = bf16_reference(name)
    monkeypatch.setattr(ExpertsBuilder, "_measure_costs", lambda *args: GPU_LIKE_COSTS)
    host = "bf16" if fmt == "int8" else fmt
    model = offload.load(folder, device="cpu", max_context=64, plan=plan(folder, 9, 2, fmt=host, slot_format=fmt),
                         prefetch=True)
    hybrid = next(iter(model._experts.hybrids.values()))
    assert isinstance(hybrid.pool, QuantExpertPool) and hybrid.pool.fmt == fmt
    assert_within_bounds(model, expected, fmt, IDS)
    model.generate(IDS[:6].tolist(), max_new_tokens=8, ignore_eos=True)
    layers = model.stats()["layers"]
    assert any(l["cache_hits"] > 0 for l in layers) and any(l["pinned_hits"] > 0 for l in layers)


@pytest.mark.parametrize("fmt", ["int4", "int4s"])
def test_placement_never_changes_the_rows_of_int4_slots_beside_int4_host_experts(bf16_reference, monkeypatch, fmt):
    """An expert has the same values on either tier and in any row: pinned rows are packed by the host's packer and
    landed as uploads land, so an expert copied into a slot holds the very bytes it holds pinned, and computes the
    host's own weights to float32 rounding. (The CPU workers' int4 kernels round their activations, so logits
    across tiers agree to that format's kernel, not to float32.)"""
    folder, _, _ = bf16_reference("mixtral")
    monkeypatch.setattr(ExpertsBuilder, "_measure_costs", lambda *args: GPU_LIKE_COSTS)
    pinned = offload.load(folder, device="cpu", max_context=64, plan=plan(folder, 10_000, None, fmt=fmt,
                                                                          slot_format=fmt))
    cached = offload.load(folder, device="cpu", max_context=64, plan=plan(folder, 3, 2, fmt=fmt, slot_format=fmt),
                          prefetch=True)
    cached.generate(IDS[:6].tolist(), max_new_tokens=8, ignore_eos=True)
    compared = 0
    for layer, hybrid in cached._experts.hybrids.items():
        everything = pinned._experts.hybrids[layer].pool  # row e holds expert e
        pool = hybrid.pool
        for expert, slot in hybrid.cache.slot_of.items():
            row = pool.slot_row(slot)
            for mine, theirs in zip(pool.projections, everything.projections):
                assert torch.equal(mine.packed[row], theirs.packed[expert])
                assert torch.equal(mine.scale_zeros[:, row], theirs.scale_zeros[:, expert])
            compared += 1
        host = hybrid.cpu
        local = hybrid.uploader.local
        for expert in list(hybrid.cache.slot_of)[:1]:
            gate = host.expert_tensors(local(expert))[0]
            got = everything.gate.row(expert).matmul(torch.eye(gate.shape[1])).T
            assert rel_err(got, gate) <= 1e-6
    assert compared > 0


def request(inv, cfg, budget: int, **kwargs) -> PlanRequest:
    return PlanRequest(device_budget=budget, host_budget=2**34, max_context=64,
                       kv_cache_bytes=kv_cache_bytes(cfg, 64, 4), dtype_bytes=4, expert_format="float32",
                       expert_host_bytes=inv.expert_params * 4, **kwargs)


def test_the_slot_format_choice():
    sizes = {None: 100, "int8": 30, "int4": 20}
    assert choose_slot_format(AUTO_SLOTS, 1000, sizes, 10) is None  # the device dtype gives enough
    assert choose_slot_format(AUTO_SLOTS, 600, sizes, 10) == "int8"
    assert choose_slot_format(AUTO_SLOTS, 250, sizes, 10) == "int4"  # none gives enough: the most rows
    assert choose_slot_format(AUTO_SLOTS, 50, sizes, 10) == "int4"
    assert choose_slot_format(AUTO_SLOTS, 10, sizes, 10) is None  # no row in any: the first of equals
    assert choose_slot_format(("int8",), 10_000, sizes, 10) == "int8"  # asked for
    # The stream buffer's rows (4 here) in each candidate's format come first where they fit.
    assert choose_slot_format(AUTO_SLOTS, 1000, sizes, 10, stream_rows=4) == "int8"  # 6 rows after 400, 29 after 120
    assert choose_slot_format(AUTO_SLOTS, 350, sizes, 10, stream_rows=4) == "int4"  # 400 does not fit; 13 after 80
    assert choose_slot_format(AUTO_SLOTS, 1400, sizes, 10, stream_rows=4) is None  # 10 after 400
    assert stream_buffer_bytes(350, 4, 100) == 0 and stream_buffer_bytes(350, 4, 20) == 80


def test_the_planner_quantizes_the_slots_only_when_the_device_dtype_leaves_fewer_than_top_k(checkpoint_dir):
    folder, _ = checkpoint_dir("mixtral")
    cfg = offload.load(folder, device="cpu", max_context=64).config
    inv = inventory(cfg, architecture(cfg.model_type).names)
    fixed = sum(inv.device_bytes(4).values()) + kv_cache_bytes(cfg, 64, 4)
    L, k = len(inv.moe_layers), inv.top_k
    roomy = make_plan(inv, request(inv, cfg, fixed + L * k * inv.slot_bytes(4), slot_formats=AUTO_SLOTS))
    assert roomy.slot_format is None and sum(l.cache_slots + len(l.pinned) for l in roomy.layers) >= L * k
    tight = make_plan(inv, request(inv, cfg, fixed + L * k * inv.slot_bytes(4) - 1, slot_formats=AUTO_SLOTS))
    assert tight.slot_format == "int8" and tight.expert_device_bytes == inv.slot_bytes(4, "int8")
    assert sum(l.cache_slots + len(l.pinned) for l in tight.layers) >= L * k
    assert "slots int8" in tight.table() and json.loads(tight.to_json())["slot_format"] == "int8"
    asked = make_plan(inv, request(inv, cfg, fixed + 10**9, slot_formats=("int4",)))
    assert asked.slot_format == "int4" and all(len(l.pinned) == inv.num_experts for l in asked.layers)


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])  # gpt-oss: experts with biases
@pytest.mark.parametrize("experts, slots", [(None, "bf16"), ("int8", "int8"), ("int4", "int4")])
def test_the_plans_bytes_are_the_bytes_the_load_allocates(bf16_reference, monkeypatch, name, experts, slots):
    """Host experts, the landing buffers, the stream buffer (its rows in the slot format) and the pool rows: each
    figure of the plan is what the load allocates, biases included."""
    folder, _, _ = bf16_reference(name)
    monkeypatch.setattr(ExpertsBuilder, "_measure_costs", lambda *args: GPU_LIKE_COSTS)
    cfg = offload.load(folder, device="cpu", max_context=64).config
    inv = inventory(cfg, architecture(cfg.model_type).names)
    fixed = offload.plan(folder, gpu_memory="1GiB", max_context=64, device="cpu").device_fixed_bytes
    fmt = None if slots == "bf16" else slots  # the float32 model's own dtype for "bf16"
    row, host_expert = inv.slot_bytes(4, fmt), expert_host_bytes(cfg, experts or "float32")
    rows = 2 * inv.top_k
    budget = fixed + 8 * host_expert + rows * row + 3 * row
    model = offload.load(folder, device="cpu", max_context=64, gpu_memory=budget, experts=experts, slots=slots,
                         dense="bf16")
    placed, builder = model.plan, model._experts
    assert placed.slot_format == placed.stream_buffer_format == fmt and placed.stream_buffer_experts == rows
    assert placed.device_buffers == {"staging landing": 8 * host_expert, "stream buffer": rows * row}
    assert placed.device_buffers["staging landing"] == sum(t.nbytes for entry in builder.ring.landing for t in entry)
    stream = builder.stream_buffer.pool
    assert isinstance(stream, QuantExpertPool if fmt else DeviceExpertPool) and getattr(stream, "fmt", None) == fmt
    assert placed.device_buffers["stream buffer"] == stream.nbytes and stream.num_rows == rows
    hybrids = list(builder.hybrids.values())
    assert placed.device_expert_bytes == sum(h.pool.nbytes for h in hybrids) > 0
    hosted = [h.cpu for h in hybrids if h.cpu is not None]
    assert placed.expert_host_bytes == hosted[0].expert_nbytes and placed.host_bytes == sum(c.nbytes for c in hosted)
    assert placed.device_bytes == fixed + 8 * host_expert + rows * row + placed.device_expert_bytes <= budget
    assert f"{rows} rows of {fmt or 'float32'}" in placed.table()
    assert json.loads(placed.to_json())["stream_buffer_format"] == fmt


def test_a_budget_without_room_for_the_landing_buffers_is_refused(bf16_reference):
    folder, _, _ = bf16_reference("mixtral")
    cfg = offload.load(folder, device="cpu", max_context=64).config
    roomy = offload.plan(folder, gpu_memory="1GiB", max_context=64, device="cpu")
    assert not roomy.device_buffers  # every expert on the device: nothing is uploaded
    fixed, host_expert = roomy.device_fixed_bytes, expert_host_bytes(cfg, "float32")
    # Room for the landing buffers but not the double buffer: nothing streams, the rest still loads.
    narrow = offload.plan(folder, gpu_memory=fixed + 8 * host_expert + 1, max_context=64, device="cpu", dense="bf16")
    assert set(narrow.device_buffers) == {"staging landing"} and narrow.stream_buffer_experts == 0
    assert narrow.stream_buffer_format is None
    with pytest.raises(PlanError, match="buffers that expert uploads land in"):
        offload.plan(folder, gpu_memory=fixed + 8 * host_expert - 1, max_context=64, device="cpu", dense="bf16")


def test_slot_options_are_checked_before_any_weight_is_read(bf16_reference, tmp_path):
    folder, _, _ = bf16_reference("mixtral")
    with pytest.raises(offload.OffloadError, match="slots must be one of"):
        offload.load(folder, device="cpu", slots="fp8")
    with pytest.raises(offload.OffloadError, match="sets the format of experts held on a device tier"):
        offload.load(folder, device="cpu", slots="int8")
    placed = offload.plan(folder, gpu_memory="1GiB", max_context=64, device="cpu", slots="int8")
    assert placed.slot_format == "int8"
    placed.save(tmp_path / "plan.json")
    with pytest.raises(PlanError, match="keeps pinned experts and slots as int8, not int4"):
        offload.load(folder, device="cpu", max_context=64, plan=tmp_path / "plan.json", slots="int4")
    result = invoke("generate", str(folder), "--prompt-ids", "1,2,3", "--device", "cpu", "--slots", "int8")
    assert_one_line_error(result, "sets the format of experts held on a device tier")
    shown = invoke("plan", str(folder), "--gpu-memory", "1GiB", "--device", "cpu", "--max-context", "64",
                   "--slots", "int4", "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["slot_format"] == "int4"

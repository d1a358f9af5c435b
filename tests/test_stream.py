"""Packed uploads dequantized on the device, chunked prefill and whole-layer expert streaming, on the simulated
device tier (the CUDA side-stream form of the double buffer is in tests/test_cuda.py).

- The torch unpack of our int8/int4/int4s tiles (csrc_py.formats.unpack_arrays) equals the CPU unpack bit for bit.
- Admissions to the expert cache copy the packed bytes: int8 tiles and fp16 scales, not dequantized weights.
- A prompt in chunks gives the logits of one forward; a chunk that streams gives the logits of one that does
  not (bf16: the same weights; int8: within the format's bound), under several plans.
- Bytes copied per prefill chunk = the chunk's used, non-resident experts x the packed expert size, exactly.
- The double buffer alternates halves and issues batch b+1's copies before batch b's compute.
- A plan without cache slots streams too, priced by a cost model measured without a slot.
- A stream buffer of int8 / int4 / int4s rows (the plan's slot format) stays within the format's bound of the CPU
  workers, and reads its ids back (never blind: its compute reads rows back per batch anyway).
- A chunk long enough to use every expert, in a layer whose last chunk used nearly all it could stream, streams
  all the non-resident ones without reading its ids back: no host read inside the forward, every layer's copies
  issued before any ids come back (at the step boundary); a chunk that reads its ids back measures that coverage.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import offload
from csrc_py.formats import expert_arrays, pack, unpack, unpack_arrays
from offload.experts.builder import ExpertsBuilder
from offload.experts.cost import CostModel
from offload.experts.device import DeviceExpertPool, ExpertUploader
from offload.experts.hybrid import HybridExperts
from offload.experts.quant_pool import QuantExpertPool
from offload.experts.stream import LayerStream, every_expert_tokens, streams_blind
from sync_ledger import SyncLedger
from test_hybrid import GPU_LIKE_COSTS, IDS, check_plan_matches_the_reference, plan, rel_err


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4", "int4s"])
@pytest.mark.parametrize("shape", [(48, 96), (40, 70), (17, 33)])
def test_torch_unpack_equals_the_cpu_unpack_bit_for_bit(fmt, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(3, *shape, generator=gen) * torch.rand(3, shape[0], 1, generator=gen) * 4
    pm = pack(w, fmt)
    for e in range(3):
        expected = unpack(pm, e)
        got = unpack_arrays(fmt, *shape, *expert_arrays(pm, e)).numpy()
        assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), expected.view(np.uint32))


# A GPU-like device behind a link faster than the CPU workers read: every call of 2 tokens or more streams.
FAST_LINK_COSTS = CostModel(cpu_bytes_per_s=40e9, cpu_flops=200e9, copy_bytes_per_s=80e9, device_flops=400e12)


def streaming_model(folder, monkeypatch, fmt: str = "bf16", prefill_chunk: int | None = None,
                    costs: CostModel = FAST_LINK_COSTS, slots: int = 1, slot_format: str | None = None, **kwargs):
    """Pinned experts and `slots` cache slots per layer (none of either with slots=0: every expert on the host),
    the rest on the host in `fmt`, under a fixed cost model; the pool rows and the stream buffer's in
    `slot_format` (None: the device dtype)."""
    monkeypatch.setattr(ExpertsBuilder, "_measure_costs", lambda *args: costs)
    placed = plan(folder, 3 if slots else 0, slots, fmt=fmt, slot_format=slot_format)
    return offload.load(folder, device="cpu", max_context=64, plan=placed, prefill_chunk=prefill_chunk, **kwargs)


def test_admissions_copy_the_packed_bytes(bf16_checkpoints, monkeypatch):
    model = streaming_model(bf16_checkpoints("qwen2_moe"), monkeypatch, fmt="int8", prefetch=True)
    builder = model._experts
    ring = builder.ring
    hybrid = next(h for h in builder.hybrids.values() if h.cpu is not None)
    cpu = hybrid.cpu
    packed = sum(m.nbytes for m in (cpu.gate, cpu.up, cpu.down)) // cpu.num_experts
    assert hybrid.sizes.host_bytes == packed
    # Where uploads land on the device: int8 tiles and fp16 scales, one expert's worth.
    assert [t.dtype for t in ring.landing[0]] == [torch.int8, torch.float16] * 3
    assert sum(t.nbytes for t in ring.landing[0]) == packed
    float_bytes = sum(s[0].nbytes for s in hybrid.pool.stacks)
    assert packed < float_bytes / 3  # int8 with fp16 scales against float32 weights
    before = ring.bytes_copied
    model.generate(IDS[:6].tolist(), max_new_tokens=8, ignore_eos=True)
    builder.settle()
    insertions = sum(h.cache.stats.insertions for h in builder.hybrids.values())
    totals = model.stats()["totals"]
    assert insertions > 0 and totals["bytes_copied"] == insertions * packed
    assert ring.bytes_copied - before == insertions * packed + totals["bytes_streamed"]  # streamed: the prefill


def test_a_prompt_in_chunks_gives_the_logits_of_one_forward(checkpoint_dir):
    folder, _ = checkpoint_dir("deepseek_v3")
    whole = offload.load(folder, device="cpu", max_context=64)
    chunked = offload.load(folder, device="cpu", max_context=64, prefill_chunk=5)
    assert chunked.transformer.prefill_chunk == 5
    expected = whole.logits(IDS)
    assert rel_err(chunked.logits(IDS), expected) <= 1e-5
    kwargs = dict(max_new_tokens=8, ignore_eos=True)
    assert chunked.generate(IDS[:13].tolist(), **kwargs).token_ids == whole.generate(IDS[:13].tolist(),
                                                                                      **kwargs).token_ids


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "gpt_oss", "qwen2_moe"])
@pytest.mark.parametrize("plan_name", ["tiny_cache_prefetch_lru", "cache_and_pinned_lfu", "all_on_cpu",
                                       "pinned_subset_no_cache"])
def test_every_plan_matches_the_reference_while_streaming(bf16_checkpoints, name, plan_name, monkeypatch):
    check_plan_matches_the_reference(bf16_checkpoints(name), plan_name, monkeypatch, stream=True)


@pytest.mark.parametrize("fmt, max_err", [("bf16", 1e-4), ("int8", 4e-2)])
def test_a_streamed_prefill_equals_one_on_the_cpu_workers_to_the_format(bf16_checkpoints, monkeypatch, fmt,
                                                                          max_err):
    folder = bf16_checkpoints("qwen2_moe")
    reference = offload.load(folder, device="cpu", max_context=64).logits(IDS)
    streamed = streaming_model(folder, monkeypatch, fmt=fmt)
    got = streamed.logits(IDS)
    assert streamed.stats()["totals"]["bytes_streamed"] > 0
    monkeypatch.setattr(ExpertsBuilder, "stream_threshold", property(lambda self: None))
    on_cpu = streaming_model(folder, monkeypatch, fmt=fmt)
    assert rel_err(got, reference) <= max_err and rel_err(on_cpu.logits(IDS), reference) <= max_err
    assert on_cpu.stats()["totals"]["bytes_streamed"] == 0


# int4 / int4s rows hold the host's values: only the CPU kernels' activation rounding differs (2-4e-3 measured);
# int8 rows add their own rounding (2e-3 measured), bounded as int8 is against transformers.
@pytest.mark.parametrize("name, host, rows, max_err", [("qwen2_moe", "int4", "int4", 1e-2),
                                                       ("qwen2_moe", "int4s", "int4s", 1e-2),
                                                       ("gpt_oss", "int4", "int4", 1e-2),
                                                       ("qwen2_moe", "bf16", "int8", 4e-2)])
def test_a_stream_buffer_in_the_slot_format_computes_what_the_cpu_workers_do(bf16_checkpoints, monkeypatch, name,
                                                                             host, rows, max_err):
    """The stream buffer's rows in the plan's slot format: int4 / int4s rows landed from a host of that format hold
    the CPU workers' own values; int8 rows add their rounding. Within the format's bound of the same plan with
    streaming off. Quantized rows read their used rows back per batch (no grouped kernel), so a chunk never
    streams blind: it reads its ids back and copies only the experts it uses."""
    folder = bf16_checkpoints(name)
    streamed = streaming_model(folder, monkeypatch, fmt=host, slot_format=rows)
    stream = streamed._experts.stream_buffer.pool
    assert isinstance(stream, QuantExpertPool) and stream.fmt == rows
    hybrids = list(streamed._experts.hybrids.values())
    assert all(h.streaming.blind_tokens is None for h in hybrids)
    got = streamed.logits(IDS)
    used = sum(h.stats.streamed_misses for h in hybrids) * hybrids[0].sizes.host_bytes
    assert streamed.stats()["totals"]["bytes_streamed"] == used > 0
    monkeypatch.setattr(ExpertsBuilder, "stream_threshold", property(lambda self: None))
    on_cpu = streaming_model(folder, monkeypatch, fmt=host, slot_format=rows)
    expected = on_cpu.logits(IDS)
    assert on_cpu.stats()["totals"]["bytes_streamed"] == 0
    assert rel_err(got, expected) <= max_err


@pytest.mark.parametrize("fmt", ["bf16", "int4"])
@pytest.mark.parametrize("slots", [1, 0], ids=["slots", "no_slots"])
def test_bytes_copied_per_prefill_chunk_are_the_used_experts_times_the_packed_size(bf16_checkpoints, monkeypatch,
                                                                                   fmt, slots):
    """With the ids read back (blind streaming off), with or without cache slots."""
    model = streaming_model(bf16_checkpoints("mixtral"), monkeypatch, fmt=fmt, prefill_chunk=8, prefetch=False,
                            slots=slots)
    builder = model._experts
    for hybrid in builder.hybrids.values():
        if hybrid.streaming is not None:
            hybrid.streaming.blind_tokens = None
    chunks: list[dict[int, set[int]]] = []  # per forward: layer -> experts used but not resident
    for hybrid in builder.hybrids.values():
        real_start = hybrid.start

        def start(x, ids, weights, hybrid=hybrid, real_start=real_start):
            resident = {e for e in ids.reshape(-1).tolist() if hybrid.is_resident(e)}
            chunks[-1][hybrid.layer] = set(ids.reshape(-1).tolist()) - resident
            return real_start(x, ids, weights)

        monkeypatch.setattr(hybrid, "start", start)
    landed = [0]  # bytes copied into the device's landing buffers, counted where the copies happen
    real_land = ExpertUploader._land

    def land(self, packed, landing, row):
        landed[0] += sum(src.nbytes for src in packed)
        return real_land(self, packed, landing, row)

    monkeypatch.setattr(ExpertUploader, "_land", land)
    t = model.transformer
    real_layers = t._layers  # each chunk's pass through the layers
    copied: list[int] = []  # bytes through the ring per forward

    def layers(ids, start, positions=None):
        chunks.append({})
        before = landed[0]
        h = real_layers(ids, start, positions)
        copied.append(landed[0] - before)
        return h

    monkeypatch.setattr(t, "_layers", layers)
    with torch.inference_mode():
        t(IDS, 0, last_only=True)
    packed = next(h.sizes.host_bytes for h in builder.hybrids.values() if h.cpu is not None)
    assert len(chunks) == len(IDS) // 8 and all(chunks)
    for used, nbytes in zip(chunks, copied):
        assert nbytes == sum(len(experts) for experts in used.values()) * packed > 0
    streamed = sum(h.stats.bytes_streamed for h in builder.hybrids.values())
    assert streamed == sum(copied) == builder.ring.bytes_copied


class RecordingUploader:
    """Stands in for an ExpertUploader: logs copies and waits, and fills each row with its expert's number."""

    def __init__(self, pool: DeviceExpertPool, log: list):
        self.pool, self.log = pool, log

    def copy(self, expert: int, row: int, after=None) -> None:
        self.log.append(("copy", expert, row))
        for stack in self.pool.stacks:
            stack[row].fill_(float(expert))

    def wait(self, rows) -> None:
        self.log.append(("wait", tuple(rows)))


def test_the_double_buffer_copies_the_next_batch_before_computing_this_one():
    pool = DeviceExpertPool((), 4, hidden=8, intermediate=4, dtype=torch.float32, device=torch.device("cpu"))
    stream = LayerStream(pool)
    log: list = []
    computed: list[list[int]] = []  # experts each compute saw, read from its rows' contents
    real_compute = pool.compute

    def compute(x, rows, weights):
        log.append(("compute",))
        used = sorted({int(r) for r in rows.reshape(-1).tolist() if r >= 0})
        computed.append([int(pool.gate[r, 0, 0]) for r in used])
        return real_compute(x, rows, weights)

    pool.compute = compute
    uploader = RecordingUploader(pool, log)
    x = torch.randn(6, 8)
    ids = torch.tensor([[0, 1], [2, 3], [4, 0], [1, 2], [3, 4], [0, 4]])
    stream.run(uploader, [0, 1, 2, 3, 4], 5, x, ids, torch.rand(6, 2))
    kinds = [entry[0] for entry in log]
    # batches [0, 1] -> half 0, [2, 3] -> half 1, [4] -> half 0: each next batch's copies come before a compute
    assert kinds == ["copy", "copy", "copy", "copy", "wait", "compute", "copy", "wait", "compute", "wait", "compute"]
    assert [entry[2] for entry in log if entry[0] == "copy"] == [0, 1, 2, 3, 0]
    assert computed == [[0, 1], [2, 3], [4]]
    assert stream.turn == 1  # the next layer's first batch goes to the half not written last


def test_streamed_experts_sum_to_the_whole_layer():
    """Streaming in batches through two halves gives the layer's grouped SwiGLU over all its experts."""
    from offload.experts.swiglu import swiglu_experts

    gen = torch.Generator().manual_seed(1)
    E, H, I, T, K = 7, 16, 8, 12, 3
    gate, up, down = torch.randn(E, I, H, generator=gen), torch.randn(E, I, H, generator=gen), \
        torch.randn(E, H, I, generator=gen)
    pool = DeviceExpertPool((), 4, H, I, torch.float32, torch.device("cpu"))

    class Uploader:
        def copy(self, expert, row, after=None):
            for stack, w in zip(pool.stacks, (gate, up, down)):
                stack[row].copy_(w[expert])

        def wait(self, rows):
            pass

    x = torch.randn(T, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=gen)
    got = LayerStream(pool).run(Uploader(), ids.unique().tolist(), E, x, ids, weights)
    assert rel_err(got, swiglu_experts(x, ids, weights, gate, up, down)) <= 1e-6


def test_stream_threshold_is_the_first_chunk_size_that_pays():
    host, flops = 6 * 2048 * 1024, 6 * 2048 * 1024
    cost = GPU_LIKE_COSTS
    for experts, top_k in ((128, 8), (8, 2), (64, 6)):
        threshold = cost.stream_threshold(experts, top_k, host, flops)
        pays = [cost.prefer_stream(t * top_k, min(experts, t * top_k), host, flops) for t in range(2, 2000)]
        assert threshold == 2 + pays.index(True)
        assert all(pays[threshold - 2 :])  # every longer chunk pays too
    slow_device = CostModel(cpu_bytes_per_s=40e9, cpu_flops=200e9, copy_bytes_per_s=25e9, device_flops=100e9)
    assert slow_device.stream_threshold(128, 8, host, flops) is None
    assert FAST_LINK_COSTS.stream_threshold(128, 8, host, flops) == 2


def test_prefill_chunk_follows_the_stream_threshold_unless_set(bf16_checkpoints, monkeypatch):
    folder = bf16_checkpoints("mixtral")
    model = streaming_model(folder, monkeypatch, costs=GPU_LIKE_COSTS)
    assert 2 < model._experts.stream_threshold < 512 and model.transformer.prefill_chunk == 512
    slow_link = CostModel(cpu_bytes_per_s=40e9, cpu_flops=200e9, copy_bytes_per_s=1e9, device_flops=400e12)
    model = streaming_model(folder, monkeypatch, costs=slow_link)
    assert 512 < model._experts.stream_threshold == model.transformer.prefill_chunk <= 4096
    assert streaming_model(folder, monkeypatch, prefill_chunk=16).transformer.prefill_chunk == 16
    with pytest.raises(offload.OffloadError, match="prefill_chunk must be at least 1"):
        streaming_model(folder, monkeypatch, prefill_chunk=0)


def test_the_cost_model_is_measured_without_a_cache_slot(bf16_checkpoints):
    """Every expert on the host and no slot anywhere: the load still measures copies (into a scratch row), and the
    timing copies are not counted as the model's traffic."""
    folder = bf16_checkpoints("mixtral")
    model = offload.load(folder, device="cpu", max_context=64, plan=plan(folder, 0, 0))
    builder = model._experts
    assert all(h.cache_slots == 0 and h.pool.num_rows == 0 for h in builder.hybrids.values())
    cost = builder.cost
    assert cost is not None and min(cost.as_dict().values()) > 0
    assert builder.ring.bytes_copied == 0
    assert not model.prefetch.on and model.prefetch.reason == "no layer has both CPU experts and cache slots"


def test_a_plan_without_cache_slots_streams_and_matches_the_reference(bf16_checkpoints, monkeypatch):
    folder = bf16_checkpoints("qwen2_moe")
    reference = offload.load(folder, device="cpu", max_context=64)
    model = streaming_model(folder, monkeypatch, slots=0, prefill_chunk=8)
    assert all(h.streaming is not None for h in model._experts.hybrids.values())
    assert rel_err(model.logits(IDS), reference.logits(IDS)) <= 1e-4
    kwargs = dict(max_new_tokens=8, ignore_eos=True)
    assert model.generate(IDS[:13].tolist(), **kwargs).token_ids == reference.generate(IDS[:13].tolist(),
                                                                                        **kwargs).token_ids
    totals = model.stats()["totals"]
    assert totals["bytes_streamed"] > 0 and totals["bytes_copied"] == 0 and totals["hit_rate"] == 0.0


@pytest.mark.parametrize("top_k, experts, expected", [(2, 4, 7), (8, 128, 72), (8, 256, 146), (6, 64, 47),
                                                      (4, 4, 1), (8, 4, 1)])
def test_every_expert_tokens_is_where_an_unused_expert_becomes_rare(top_k, experts, expected):
    tokens = every_expert_tokens(top_k, experts)
    assert tokens == expected
    if top_k < experts:
        unused = 1 - top_k / experts
        assert unused ** tokens <= 0.01 < unused ** (tokens - 1)


@pytest.mark.parametrize("tokens, blind_tokens, coverage, expected", [
    (16, 12, 1.0, True),
    (16, 12, 0.9, True),
    (16, 12, 0.89, False),  # the last chunk left too many streamed experts unused: read the ids back
    (16, 12, None, False),  # nothing measured yet: read the ids back (and measure)
    (11, 12, 1.0, False),  # too short to use every expert
    (16, None, 1.0, False),
])
def test_streams_blind(tokens, blind_tokens, coverage, expected):
    assert streams_blind(tokens, blind_tokens, coverage) == expected


LONG = torch.arange(3, 103) % 97  # a prompt that routes more widely than IDS


def test_a_chunk_that_reads_its_ids_back_measures_the_coverage(bf16_checkpoints, monkeypatch):
    model = streaming_model(bf16_checkpoints("mixtral"), monkeypatch, slots=0, prefetch=False)
    hybrids = sorted(model._experts.hybrids.values(), key=lambda h: h.layer)
    with SyncLedger() as ledger, torch.inference_mode():
        model.transformer(LONG[:40], 0)
    assert sum(ledger.data_dependent.values()) == len(hybrids)  # nothing measured before: every layer read back
    layers = {l["layer"]: l for l in model.stats()["layers"]}
    for h in hybrids:  # no slots, nothing pinned: every expert could have streamed
        assert h.stream_coverage == layers[h.layer]["streamed_misses"] / h.num_experts
    blind = [h for h in hybrids if h.stream_coverage >= 0.9]  # here one layer of the three
    with SyncLedger() as ledger, torch.inference_mode():
        model.transformer(LONG[:40], 0)
    assert sum(ledger.data_dependent.values()) == len(hybrids) - len(blind)


def forward_order(model, monkeypatch, chunk: torch.Tensor) -> list[tuple[str, int]]:
    """One prefill forward of `chunk` and its step boundary: the order of each layer's streaming copies
    ("copy", layer) and of the moments its ids reach the host to count the call ("ids", layer)."""
    builder = model._experts
    log: list[tuple[str, int]] = []
    for hybrid in builder.hybrids.values():
        uploader = hybrid.streaming.uploader
        real_copy = uploader.copy

        def copy(expert, row, after=None, layer=hybrid.layer, real_copy=real_copy):
            log.append(("copy", layer))
            return real_copy(expert, row, after=after)

        monkeypatch.setattr(uploader, "copy", copy)
    real_count = HybridExperts._count_streamed

    def count(self, experts):
        log.append(("ids", self.layer))
        return real_count(self, experts)

    monkeypatch.setattr(HybridExperts, "_count_streamed", count)
    with torch.inference_mode():
        model.transformer(chunk, 0, last_only=True)
    log.append(("boundary", -1))
    builder.settle()
    return log


@pytest.mark.parametrize("slots", [1, 0], ids=["slots", "no_slots"])
def test_a_chunk_that_uses_every_expert_streams_them_all_without_reading_ids_back(bf16_checkpoints, monkeypatch,
                                                                                 slots):
    folder = bf16_checkpoints("mixtral")  # top-2 of 6 experts: from 12 tokens on a chunk streams them all
    reference = offload.load(folder, device="cpu", max_context=64).logits(IDS[:16])
    model = streaming_model(folder, monkeypatch, slots=slots, prefetch=False)
    builder = model._experts
    hybrids = sorted(builder.hybrids.values(), key=lambda h: h.layer)
    assert all(h.streaming.blind_tokens == 12 and h.stream_coverage is None for h in hybrids)
    for h in hybrids:
        h.stream_coverage = 1.0  # as if the layer's last chunk had used every expert it could stream
    non_resident = {h.layer: {e for e in range(h.num_experts) if not h.is_resident(e)} for h in hybrids}
    used: dict[int, set[int]] = {}  # layer -> experts its routing picked, as the test reads them
    for h in hybrids:
        def start(x, ids, weights, h=h, real_start=h.start):
            used[h.layer] = set(ids.reshape(-1).tolist())
            return real_start(x, ids, weights)

        monkeypatch.setattr(h, "start", start)
    before = builder.ring.bytes_copied
    with SyncLedger() as ledger, torch.inference_mode():
        got = model.transformer(IDS[:16], 0)
    assert rel_err(got, reference) <= 1e-4
    assert not ledger.data_dependent  # no ids came back inside the forward (the test's own read aside)
    assert dict(ledger.host_reads) == {"tolist": len(hybrids)}
    packed = hybrids[0].sizes.host_bytes
    streamed = sum(len(experts) for experts in non_resident.values())
    assert builder.ring.bytes_copied - before == streamed * packed == model.stats()["totals"]["bytes_streamed"]
    # Counted at the step boundary (stats() settles): the experts used, the non-resident ones among them as
    # streamed; a non-resident expert no token picked was copied in vain (tiny random routers are skewed).
    layers = {l["layer"]: l for l in model.stats()["layers"]}
    for h in hybrids:
        assert layers[h.layer]["expert_uses"] == len(used[h.layer])
        assert layers[h.layer]["streamed_misses"] == len(used[h.layer] & non_resident[h.layer])
        assert h.stream_coverage == len(used[h.layer] & non_resident[h.layer]) / len(non_resident[h.layer])
    # A layer whose chunk left more than a tenth of its streamed experts unused reads the next chunk's ids back.
    wasteful = sum(h.stream_coverage < 0.9 for h in hybrids)
    with SyncLedger() as ledger, torch.inference_mode():
        model.transformer(IDS[16:32], 16)
    assert sum(ledger.data_dependent.values()) == wasteful

    for h in hybrids:
        h.stream_coverage = 1.0
    order = forward_order(model, monkeypatch, IDS[:16])
    boundary = order.index(("boundary", -1))
    copies = [layer for kind, layer in order[:boundary] if kind == "copy"]
    assert copies == sorted(copies) and set(copies) == {h.layer for h in hybrids}  # layer by layer, all queued
    assert order[boundary + 1 :] == [("ids", h.layer) for h in hybrids]  # the ids only after the forward


def test_a_shorter_chunk_reads_its_ids_back_before_each_layer_streams(bf16_checkpoints, monkeypatch):
    model = streaming_model(bf16_checkpoints("mixtral"), monkeypatch, prefetch=False)
    hybrids = sorted(model._experts.hybrids.values(), key=lambda h: h.layer)
    order = forward_order(model, monkeypatch, IDS[:8])  # 8 tokens: under the 12 that stream every expert
    assert order[-1] == ("boundary", -1)
    first_copy = [order.index(("copy", h.layer)) for h in hybrids if ("copy", h.layer) in order]
    ids_at = [order.index(("ids", h.layer)) for h in hybrids]
    assert first_copy and all(ids_at[i] < copy for i, copy in enumerate(first_copy))
    assert all(ids_at[i] > order.index(("copy", hybrids[i - 1].layer)) for i in range(1, len(first_copy)))

"""Packed uploads dequantized on the device, chunked prefill and whole-layer expert streaming, on the simulated
device tier (the CUDA side-stream form of the double buffer is in tests/test_cuda.py).

- The torch unpack of our int8/int4/int4s tiles (csrc_py.formats.unpack_arrays) equals the CPU unpack bit for bit.
- Admissions to the expert cache copy the packed bytes: int8 tiles and fp16 scales, not dequantized weights.
- A prompt in chunks gives the logits of one forward; a chunk that streams gives the logits of one that does
  not (bf16: the same weights; int8: within the format's bound), under several plans.
- Bytes copied per prefill chunk = the chunk's used, non-resident experts x the packed expert size, exactly.
- The double buffer alternates halves and issues batch b+1's copies before batch b's compute.
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
from offload.experts.stream import LayerStream
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
                    costs: CostModel = FAST_LINK_COSTS, **kwargs):
    """Pinned experts, one slot per layer, the rest on the host in `fmt`, under a fixed cost model."""
    monkeypatch.setattr(ExpertsBuilder, "_measure_costs", lambda *args: costs)
    return offload.load(folder, device="cpu", max_context=64, plan=plan(folder, 3, 1, fmt=fmt),
                        prefill_chunk=prefill_chunk, **kwargs)


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
@pytest.mark.parametrize("plan_name", ["tiny_cache_prefetch_lru", "cache_and_pinned_lfu"])
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


@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_bytes_copied_per_prefill_chunk_are_the_used_experts_times_the_packed_size(bf16_checkpoints, monkeypatch,
                                                                                   fmt):
    model = streaming_model(bf16_checkpoints("mixtral"), monkeypatch, fmt=fmt, prefill_chunk=8, prefetch=False)
    builder = model._experts
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

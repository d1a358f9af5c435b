"""The hybrid decode step without the host in the loop, on the simulated device tier.

- The sync ledger: a decode step reads back the sampled token and, at its boundary, every layer's expert ids in
  one copy, and nothing else: no item()/tolist() per layer, no data-dependent shapes, no device moves besides the
  CPU workers' one packed copy down and one up per layer with host experts.
- The op budget: non-view aten ops per decoder layer block in a decode step stay at or below the committed counts
  (a change that adds ops fails here and updates the number on purpose), and a MoE block issues the same ops on
  every step whatever its experts.
- Decisions at the step boundary: the device table does not change inside a step; an expert a step missed is
  copied in at the boundary and serves the next step from its slot.
- The host link: one packed block down and the result back, for any top-k and token count.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import offload
from offload.experts.builder import ExpertsBuilder
from offload.experts.device import StagingRing
from offload.experts.link import HostLink
from sync_ledger import OpCounter, SyncLedger
from test_hybrid import GPU_LIKE_COSTS, plan

PROMPT = torch.arange(3, 9)
STEPS = 6


def hybrid_model(folder, monkeypatch, device_experts: int = 3, slots: int = 1, prefetch: bool = True,
                 slot_format: str | None = None):
    """Pinned experts, one cache slot per layer and CPU experts; the miss decisions of a GPU-like cost model (the
    prefill copies, decode steps compute misses on the CPU workers); the rows in `slot_format` (None: float32)."""
    monkeypatch.setattr(ExpertsBuilder, "_measure_costs", lambda *args: GPU_LIKE_COSTS)
    host = slot_format if slot_format in ("int4", "int4s") else "bf16"
    return offload.load(folder, device="cpu", max_context=64,
                        plan=plan(folder, device_experts, slots, fmt=host, slot_format=slot_format),
                        prefetch=prefetch)


def decode(model, steps: int, mode_for_step, at_device: bool = False):
    """Prefill PROMPT, then `steps` greedy decode steps, each inside mode_for_step(step) (the step's forward
    and the readback of its token), at host positions or (at_device) at the device Positions generation uses;
    returns the tokens."""
    t = model.transformer
    tokens = []
    with torch.inference_mode():
        token = int(t(PROMPT, 0, last_only=True).argmax())
        ids = torch.empty(1, dtype=torch.long)
        for step in range(steps):
            with mode_for_step(step):
                start = len(PROMPT) + step
                logits = t(ids.fill_(token), start, last_only=True,
                           positions=t.decode_positions(start) if at_device else None)
                token = int(logits.argmax())  # the token readback
            tokens.append(token)
    return tokens


@pytest.mark.parametrize("at_device", [False, True], ids=["host_positions", "device_positions"])
@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "qwen2_moe", "gpt_oss", "llama4", "hunyuan_v1_moe"])
def test_a_decode_step_reads_back_only_the_token_and_the_expert_ids(bf16_checkpoints, name, monkeypatch, at_device):
    check_sync_ledger(hybrid_model(bf16_checkpoints(name), monkeypatch), at_device)


@pytest.mark.parametrize("name, slot_format", [("mixtral", "int8"), ("deepseek_v3", "int4"), ("gpt_oss", "int4s")])
def test_a_decode_step_with_quantized_slots_reads_back_only_the_token_and_the_expert_ids(bf16_checkpoints, name,
                                                                                          slot_format, monkeypatch):
    model = hybrid_model(bf16_checkpoints(name), monkeypatch, slot_format=slot_format)
    assert all(h.pool.fmt == slot_format for h in model._experts.hybrids.values())
    check_sync_ledger(model, at_device=True)


def check_sync_ledger(model, at_device: bool) -> None:
    ledgers = [SyncLedger() for _ in range(STEPS)]
    decode(model, STEPS, lambda step: ledgers[step], at_device)
    host_layers = sum(h.cpu is not None for h in model._experts.hybrids.values())
    assert host_layers > 0
    for step, ledger in enumerate(ledgers):
        assert not ledger.data_dependent, f"step {step}: {dict(ledger.data_dependent)}"
        assert ledger.syncs == 0 and ledger.device_moves == 0, f"step {step}"
        # The token, and from the second step on the previous step's expert ids, read once at the boundary.
        # (The first step has no previous decode step's ids to read unless the prefill recorded its own.)
        tolist = ledger.host_reads["tolist"]
        assert set(ledger.host_reads) <= {"item", "tolist"} and ledger.host_reads["item"] == 1, f"step {step}"
        assert (tolist == 1 if step else tolist <= 1), f"step {step}"
        calls_per_layer = model.config.router.top_k if model.config.router_scales_input else 1
        assert ledger.link_copies == 2 * host_layers * calls_per_layer, f"step {step}"
        assert ledger.uploads <= StagingRing([torch.empty(1)], torch.device("cpu")).entries


# Non-view aten ops per block of a decode step's decoder layer on the simulated tier (float32, hybrid plan).
# Committed counts: a change that adds ops fails here; lower them when a change removes ops.
# (The last layer's MLP block also holds the step's token-record copy: one op more than the others.)
OP_BUDGET = {
    "mixtral": {"attention": 31, "moe": 44},
    "deepseek_v3": {"attention": 47, "moe": 59, "dense": 12},
    # Quantized rows: one weight-only matmul per projection over every row, then each pair's own row picked out
    ("mixtral", "int8"): {"attention": 31, "moe": 38},
    ("deepseek_v3", "int4"): {"attention": 47, "moe": 53, "dense": 12},
}


@pytest.mark.parametrize("key", sorted(OP_BUDGET, key=str), ids=str)
def test_decode_step_op_budget_per_layer(bf16_checkpoints, key, monkeypatch):
    name, slot_format = key if isinstance(key, tuple) else (key, None)
    # The prefill runs its CPU pairs through the host link (no streaming), so the link's buffers exist before the
    # first decode step whatever the format's stream threshold.
    monkeypatch.setattr(ExpertsBuilder, "stream_threshold", property(lambda self: None))
    model = hybrid_model(bf16_checkpoints(name), monkeypatch, slot_format=slot_format)
    t = model.transformer
    counters = [OpCounter(t) for _ in range(3)]
    decode(model, 3, lambda step: counters[step])
    budget = OP_BUDGET[key]
    moe_layers = {i for i, layer in enumerate(t.layers) if layer.mlp in t.moe_blocks()}
    for step, counter in enumerate(counters):
        for (layer, block), ops in counter.ops.items():
            if block in ("before", "head"):
                continue
            kind = block if block == "attention" else ("moe" if layer in moe_layers else "dense")
            assert len(ops) <= budget[kind], f"step {step}, layer {layer} {kind}: {len(ops)} ops > {budget[kind]}"
    for layer in moe_layers:  # the same ops whichever experts were chosen and wherever they lay
        sequences = {tuple(counter.ops[(layer, "mlp")]) for counter in counters}
        assert len(sequences) == 1, f"layer {layer}: the MoE block's ops changed between steps"


def test_the_step_boundary_admits_what_the_step_missed_and_the_table_holds_within_a_step(bf16_checkpoints,
                                                                                          monkeypatch):
    """No pinned experts and as many slots as top-k in each layer: whatever a decode step used at the first MoE
    layer is resident from the next step on (copied at the boundary), and the table the layer's call saw is the
    one still in place when the step ends."""
    model = hybrid_model(bf16_checkpoints("mixtral"), monkeypatch, device_experts=6, slots=2)
    hybrid = model._experts.hybrids[min(model._experts.hybrids)]
    assert not hybrid.pool.num_pinned and hybrid.cache.num_slots == 2  # room for two slots per layer, no more
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # (ids, the table the call saw)
    real_start = hybrid.start

    def start(x, ids, weights):
        calls.append((ids.clone(), hybrid.row_table.clone()))
        return real_start(x, ids, weights)

    monkeypatch.setattr(hybrid, "start", start)
    tables_at_step_end = []

    class StepEnd:
        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            tables_at_step_end.append(hybrid.row_table.clone())

    decode(model, STEPS, lambda step: StepEnd())
    steps = calls[1:]  # the prefill's call first
    assert len(steps) == STEPS
    for (_, seen), at_end in zip(steps, tables_at_step_end):
        assert torch.equal(seen, at_end)
    for (previous_ids, _), (_, table) in zip(steps, steps[1:]):
        assert (table[previous_ids] >= 0).all()
    stats = model.stats()["layers"][0]
    assert stats["prefetch_copies"] > 0 and stats["cache_hits"] > 0


def test_the_host_link_carries_any_top_k_and_token_count_both_ways():
    """x, ids and weights go down packed in one block and the result comes back added: per-layer top-k (Hunyuan)
    and a prefill after decode steps reuse or regrow the buffers."""
    link = HostLink(hidden=8, device=torch.device("cpu"))

    def experts(x, ids, weights):  # any function of all three inputs
        return x * (ids.float() * weights).sum(1, keepdim=True)

    g = torch.Generator().manual_seed(0)
    for T, K in ((3, 4), (1, 2), (5, 4), (1, 4)):
        x, ids, weights = torch.randn(T, 8, generator=g), torch.randint(-1, 6, (T, K), generator=g), torch.rand(T, K)
        y = torch.ones(T, 8)
        link.add_result(y, link.submit(experts, x, ids, weights))
        torch.testing.assert_close(y, 1 + experts(x, ids, weights))


def test_the_host_link_s_worker_runs_the_kernels_on_the_configured_threads():
    """Numba's thread count is per calling thread: the worker thread takes the configured count (--threads), not
    every CPU the machine has (on a machine with hyperthreads, twice the cores)."""
    import numba

    from csrc_py import threads

    link = HostLink(hidden=8, device=torch.device("cpu"))
    seen = []

    def experts(x, ids, weights):
        seen.append(numba.get_num_threads())
        return x

    configured = threads.configured()
    try:
        threads.set_threads(1)
        link.add_result(torch.zeros(1, 8), link.submit(experts, torch.randn(1, 8), torch.zeros(1, 2), torch.ones(1, 2)))
    finally:
        threads.set_threads(configured)
    assert seen == [1]


def test_one_host_link_serves_every_layer_at_the_size_the_plan_counts(bf16_checkpoints, monkeypatch):
    """The layers share one pair of link buffers (not one per layer: DeepSeek-V3's 58 MoE layers would keep 58
    prompts' worth), sized as the planner counts them in the host budget."""
    model = hybrid_model(bf16_checkpoints("mixtral"), monkeypatch)
    links = {id(h.link) for h in model._experts.hybrids.values()}
    assert len(model._experts.hybrids) > 1 and len(links) == 1
    assert decode(model, 2, lambda step: contextlib.nullcontext())
    link, cfg = model._experts.link, model.config
    assert link.inputs.nbytes + link.results.nbytes == HostLink.buffer_bytes(cfg.hidden_size, cfg.router.top_k,
                                                                             len(PROMPT))

"""Generation on a device tier steps at device Positions (offload/model/positions.py), and can replay each layer's
attention + norm + router block from a graph captured per context bucket (offload/model/block_graphs.py).

On the CPU the graph is simulated: `replaying_capture` records the block's outputs and reruns the block into them
at each replay, so the static input buffer, the shared position tensor, the per-bucket keys and the fallback are the
code under test; the CUDA test at the end captures real graphs and skips without a GPU.
"""
from __future__ import annotations

import pytest
import torch

import offload
from offload.errors import OffloadError
from offload.model import positions
from offload.model.positions import Positions
from tiny_models import rel_err

PROMPT = list(range(5, 17))  # 12 tokens
NEW_TOKENS = 8  # decode steps at positions 12..18 (buckets 16, 32): across the boundary of the 16-position bucket
BUCKETS = (16, 32)
MAX_CONTEXT = 48

# GQA with a sliding window, gpt-oss (sinks + windows), MLA, DeepSeek Sparse Attention, GLM-5's shared indexer,
# Qwen3-Next (Gated DeltaNet beside gated attention).
FAMILIES = ["mixtral_window_linear_rope", "gpt_oss", "deepseek_v3", "deepseek_v32", "glm_moe_dsa", "qwen3_next"]


@pytest.fixture(autouse=True)
def small_buckets(monkeypatch):
    """Buckets of 16, 32, ... so that a short generation crosses one."""
    monkeypatch.setattr(positions, "MIN_BUCKET", BUCKETS[0])


def device_tier_model(folder) -> offload.Model:
    """A simulated device tier (a gpu_memory budget without a GPU): the path a GPU runs."""
    return offload.load(folder, device="cpu", gpu_memory="1GiB", max_context=MAX_CONTEXT)


def generate_recording(model) -> tuple[list[int], list[tuple[int, Positions | None, torch.Tensor]]]:
    """Greedy tokens of a generation, and every forward it made: (host start, positions, logits)."""
    transformer, forwards = model.transformer, []
    forward = transformer.forward

    def recording(ids, start, last_only=False, positions=None):
        logits = forward(ids, start, last_only, positions)
        forwards.append((start, positions and Positions(positions.start.clone(), positions.length), logits.clone()))
        return logits

    transformer.forward = recording
    try:
        tokens = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True, reuse_cache=False).token_ids
    finally:
        del transformer.forward
    return tokens, forwards


def host_position_logits(model, tokens: list[int]) -> torch.Tensor:
    """The same steps at host positions: the prompt, then each generated token but the last [NEW_TOKENS, V]."""
    t, device = model.transformer, model.device
    with torch.inference_mode():
        rows = [t(torch.tensor(PROMPT, device=device), 0, last_only=True)]
        rows += [t(torch.tensor([token], device=device), len(PROMPT) + i, last_only=True)
                 for i, token in enumerate(tokens[:-1])]
    return torch.cat(rows)


def check_generation_matches_host_positions(model) -> None:
    tokens, forwards = generate_recording(model)
    steps = forwards[1:]
    assert forwards[0][1] is None  # the prefill stays at its host position
    assert [at.length for _, at, _ in steps] == [16, 16, 16, 16, 32, 32, 32]
    assert all(int(at.start) == start for start, at, _ in steps)
    logits = torch.cat([row for _, _, row in forwards])
    assert rel_err(logits, host_position_logits(model, tokens)) <= 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_generation_on_a_device_tier_steps_at_device_positions(checkpoint_dir, name):
    """Each decode step takes its position from the model's one device tensor, in its bucket, and the logits are
    those of the host-position steps, across a bucket boundary."""
    model = device_tier_model(checkpoint_dir(name)[0])
    check_generation_matches_host_positions(model)
    starts = {id(model.transformer.step_positions.start)}
    assert len(starts) == 1


@pytest.mark.parametrize("name", ["mixtral_window_linear_rope", "deepseek_v3"])
def test_a_bf16_kv_cache_on_a_device_tier_steps_at_device_positions(checkpoint_dir, name):
    """A bf16 cache under a float32 device tier: written at device positions (index_copy_), read widened."""
    model = offload.load(checkpoint_dir(name)[0], device="cpu", gpu_memory="1GiB", max_context=MAX_CONTEXT,
                         kv_cache="bf16")
    assert model.transformer.caches[0].nbytes * 2 == device_tier_model(checkpoint_dir(name)[0]).transformer.caches[
        0].nbytes
    check_generation_matches_host_positions(model)


def hybrid_model(folder, device: str, **options) -> offload.Model:
    """Half of each MoE layer's experts pinned beside one cache slot, the others on the CPU workers in bf16 (the
    folder's dtype: both tiers compute them exactly)."""
    from offload.checks import model_config
    from test_cuda import hybrid_plan

    return offload.load(folder, device=device, dtype="float32", max_context=MAX_CONTEXT, prefetch=False,
                        plan=hybrid_plan(model_config(folder), "bf16", MAX_CONTEXT), **options)


@pytest.mark.parametrize("name", ["mixtral_window_linear_rope", "deepseek_v3"])
def test_a_hybrid_plan_on_a_device_tier_steps_at_device_positions(bf16_checkpoints, name):
    model = hybrid_model(bf16_checkpoints(name), "cpu")
    assert all(layer.pinned and layer.host_experts for layer in model.plan.layers)
    check_generation_matches_host_positions(model)


def test_the_cpu_only_path_keeps_host_positions(checkpoint_dir):
    model = offload.load(checkpoint_dir("mixtral")[0], device="cpu", max_context=MAX_CONTEXT)
    assert model.transformer.step_positions is None
    _, forwards = generate_recording(model)
    assert all(at is None for _, at, _ in forwards)


def replaying_capture(replays: list[int]):
    """A graph stand-in for the CPU: the block runs once to make its outputs (as a capture's warm-up writes the
    cache), and each replay reruns it from the same static input into those same output tensors."""

    def capture(fn):
        outputs = fn()

        def replay():
            replays.append(1)
            for static, fresh in zip(outputs, fn()):
                static.copy_(fresh)

        return outputs, replay

    return capture


# (family, layers whose block is captured): Qwen3-Next's Gated DeltaNet layers and GLM-5's indexer-sharing layers
# (with the layer whose selection they share) stay eager.
GRAPH_LAYERS = {"mixtral_window_linear_rope": [0, 1, 2], "gpt_oss": [0, 1, 2], "deepseek_v3": [0, 1, 2],
                "deepseek_v32": [0, 1, 2], "qwen3_next": [1]}


@pytest.mark.parametrize("name", list(GRAPH_LAYERS))
def test_replayed_blocks_give_the_host_logits(checkpoint_dir, name):
    """The captured blocks replayed with each step's input copied in and its position written in place: one
    capture per layer and bucket, the host logits at every step."""
    from offload.chat import model_summary

    model = device_tier_model(checkpoint_dir(name)[0])
    assert "CUDA graphs" not in model_summary(model)
    replays: list[int] = []
    assert model.transformer.capture_graphs(replaying_capture(replays)) == len(GRAPH_LAYERS[name])
    layers = model.transformer.layers
    assert f", CUDA graphs for {len(GRAPH_LAYERS[name])} of {len(layers)} layers\n" in model_summary(model)
    check_generation_matches_host_positions(model)
    assert [i for i, layer in enumerate(layers) if layer.graphs is not None] == GRAPH_LAYERS[name]
    assert all(sorted(layers[i].graphs.by_bucket) == list(BUCKETS) for i in GRAPH_LAYERS[name])
    assert len(replays) == (NEW_TOKENS - 1) * len(GRAPH_LAYERS[name])


def test_layers_sharing_an_indexer_selection_stay_eager(checkpoint_dir):
    model = device_tier_model(checkpoint_dir("glm_moe_dsa")[0])
    captured = model.transformer.capture_graphs(replaying_capture([]))
    attns = [layer.attn for layer in model.transformer.layers]
    shared = {id(a.selection) for a in attns if a.shares_selection}
    assert shared and captured == sum(id(a.selection) not in shared for a in attns)
    check_generation_matches_host_positions(model)


def test_a_failed_capture_leaves_the_layer_eager_with_one_warning(checkpoint_dir):
    model = device_tier_model(checkpoint_dir("deepseek_v3")[0])

    def failing(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    model.transformer.capture_graphs(failing)
    with pytest.warns(RuntimeWarning, match="capture failed at layer 0 .*cuda_graphs=False") as warned:
        check_generation_matches_host_positions(model)
    assert len(warned) == 1
    assert all(layer.graphs.failed and not layer.graphs.by_bucket for layer in model.transformer.layers)


def test_cuda_graphs_without_a_cuda_device_is_refused(checkpoint_dir):
    with pytest.raises(OffloadError, match="cuda_graphs needs a CUDA device.*--no-cuda-graphs"):
        offload.load(checkpoint_dir("mixtral")[0], device="cpu", max_context=MAX_CONTEXT, cuda_graphs=True)


def test_cuda_graphs_default_to_on_exactly_where_the_model_loads_on_cuda():
    from offload.api import _resolve_cuda_graphs

    assert _resolve_cuda_graphs(None, torch.device("cuda")) is True
    assert _resolve_cuda_graphs(None, torch.device("cpu")) is False
    assert _resolve_cuda_graphs(False, torch.device("cuda")) is False
    assert _resolve_cuda_graphs(True, torch.device("cuda")) is True


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["mixtral_window_linear_rope", "gpt_oss", "deepseek_v3", "qwen3_next"])
def test_cuda_graphs_replay_the_eager_steps(checkpoint_dir, name):
    """On a GPU, cuda_graphs captures real graphs per bucket; tokens and logits equal the eager device-position
    steps (the default) and the host-position steps."""
    folder = checkpoint_dir(name)[0]
    graphs = offload.load(folder, device="cuda", dtype="float32", max_context=MAX_CONTEXT, cuda_graphs=True)
    eager = offload.load(folder, device="cuda", dtype="float32", max_context=MAX_CONTEXT, cuda_graphs=False)
    assert any(layer.graphs is not None for layer in graphs.transformer.layers)
    assert all(layer.graphs is None for layer in eager.transformer.layers)
    check_generation_matches_host_positions(graphs)
    assert not any(layer.graphs.failed for layer in graphs.transformer.layers if layer.graphs is not None)
    kwargs = dict(max_new_tokens=NEW_TOKENS, ignore_eos=True, reuse_cache=False)
    assert graphs.generate(PROMPT, **kwargs).token_ids == eager.generate(PROMPT, **kwargs).token_ids


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["mixtral_window_linear_rope", "deepseek_v3"])
def test_cuda_graphs_with_host_experts_replay_the_eager_steps(bf16_checkpoints, name):
    """A hybrid plan on a GPU: the graphed attention blocks feed the experts on the device and on the CPU workers;
    tokens and logits equal the eager steps and the host-position steps."""
    graphs = hybrid_model(bf16_checkpoints(name), "cuda", cuda_graphs=True)
    eager = hybrid_model(bf16_checkpoints(name), "cuda", cuda_graphs=False)
    assert any(layer.graphs is not None for layer in graphs.transformer.layers)
    check_generation_matches_host_positions(graphs)
    assert not any(layer.graphs.failed for layer in graphs.transformer.layers if layer.graphs is not None)
    kwargs = dict(max_new_tokens=NEW_TOKENS, ignore_eos=True, reuse_cache=False)
    assert graphs.generate(PROMPT, **kwargs).token_ids == eager.generate(PROMPT, **kwargs).token_ids

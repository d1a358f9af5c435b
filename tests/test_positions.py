"""A decode step with its positions on the device (offload/model/positions.py): the part a CUDA graph holds reads
no host value, issues the same ops with the same shapes at every position of a context bucket, and gives the
logits of the host-position step."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import offload
from offload.config import RopeConfig
from offload.model.kv_cache import KVCache, LatentCache, LatentIndexCache, causal_mask_args
from offload.model.moe import MoE
from offload.model.positions import Positions, context_bucket
from offload.model.rope import RotaryTable
from tiny_models import rel_err

PROMPT = torch.arange(5, 17)  # 12 tokens: past the DSA variants' index_topk (8, 12)
STEPS = torch.tensor([40, 41, 7, 93, 12, 60])
MAX_CONTEXT = 64
CPU = torch.device("cpu")

# GQA: sliding window + linear rope, sinks + window, chunked attention + no-rope temperature layers, per-head q/k
# norm; MLA: with and without q_lora, interleaved and half rope, DeepSeek Sparse Attention (own and shared
# indexers); Qwen3-Next: Gated DeltaNet layers beside a gated attention layer.
FAMILIES = ["mixtral_window_linear_rope", "gpt_oss", "llama4", "qwen3_moe", "deepseek_v3", "deepseek_v3_no_interleave",
            "deepseek_v32", "glm_moe_dsa", "qwen3_next"]
GQA, MLA = "mixtral_window_linear_rope", "deepseek_v3"


def test_context_buckets():
    assert [context_bucket(end, 1 << 20) for end in (1, 256, 257, 512, 513, 4096, 4097, 8192, 8193)] == \
        [256, 256, 512, 512, 1024, 4096, 8192, 8192, 12288]
    assert context_bucket(3000, 3000) == 3000 and context_bucket(10, 100) == 100  # capped at max_context
    with pytest.raises(ValueError, match="past max_context"):
        context_bucket(65, 64)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_gathers_the_rows_a_host_start_slices(interleaved):
    table = RotaryTable(RopeConfig(theta=100.0), 16, 40, CPU, torch.float32)
    x = torch.randn(3, 2, 20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(table.apply(x, Positions.at(9, 3, 40, CPU), interleaved), table.apply(x, 9, interleaved))


@pytest.mark.parametrize("start, T, window, chunk", [(9, 1, None, None), (9, 1, 4, None), (7, 3, 5, None),
                                                     (13, 1, None, 8), (0, 4, None, None)])
def test_bucket_mask_is_the_host_mask_then_nothing(start, T, window, chunk):
    """Over a bucket the mask is the host-position mask on the first start+T keys and False after them."""
    host = causal_mask_args(start, T, window, CPU, chunk)
    S = start + T
    expected = host.get("attn_mask", torch.ones(T, S, dtype=torch.bool).tril(start))
    got = causal_mask_args(Positions(torch.tensor(start), 32), T, window, CPU, chunk)["attn_mask"]
    assert got.shape == (T, 32) and torch.equal(got[:, :S], expected) and not got[:, S:].any()


def test_cache_writes_at_device_positions_equal_host_writes():
    """Device positions write the rows a host start writes and return views over the whole bucket."""
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(3, 2, 8, generator=gen), torch.randn(3, 2, 6, generator=gen)
    host, device = (KVCache(2, 40, 8, 6, torch.float32, CPU) for _ in range(2))
    assert [t.shape[1] for t in host.write(11, k, v)] == [14, 14]
    assert [t.shape[1] for t in device.write(Positions(torch.tensor(11), 32), k, v)] == [32, 32]
    assert torch.equal(device.k, host.k) and torch.equal(device.v, host.v)

    c_kv, k_rope, index_k = (torch.randn(3, width, generator=gen) for width in (16, 4, 8))
    host, device = (LatentIndexCache(40, 16, 4, 8, torch.float32, CPU) for _ in range(2))
    host.write(11, c_kv, k_rope), host.write_index_keys(11, index_k)
    at = Positions(torch.tensor(11), 32)
    assert [t.shape[0] for t in (*device.write(at, c_kv, k_rope), device.write_index_keys(at, index_k))] == [32] * 3
    assert all(torch.equal(getattr(device, name), getattr(host, name)) for name in ("c_kv", "k_rope", "index_k"))


# ---------------------------------------------------------------- whole models


@pytest.fixture(scope="module")
def models(checkpoint_dir):
    loaded = {}

    def get(name: str) -> offload.Model:
        if name not in loaded:  # experts=None: every expert in torch on the device tier (ReferenceExperts)
            loaded[name] = offload.load(checkpoint_dir(name)[0], device="cpu", max_context=MAX_CONTEXT)
        return loaded[name]

    return get


def decode(model, length: int | None) -> torch.Tensor:
    """Logits [len(STEPS), V] of STEPS after PROMPT, one token per forward, at host positions (length None) or at
    device Positions attending over the first `length` cached positions."""
    transformer = model.transformer
    with torch.inference_mode():
        transformer(PROMPT, 0)
        rows = []
        for i, token in enumerate(STEPS):
            start = len(PROMPT) + i
            at = None if length is None else Positions(torch.tensor(start), length)
            rows.append(transformer(token[None], start, positions=at))
    return torch.cat(rows)


def scribble_past(model, end: int) -> None:
    """Noise in every cached position from `end` on: a step that attends past its own position changes."""
    gen = torch.Generator().manual_seed(7)
    for cache in model.transformer.caches:
        if isinstance(cache, KVCache):
            parts = [cache.k[:, end:], cache.v[:, end:]]
        elif isinstance(cache, LatentCache):
            parts = [cache.c_kv[end:], cache.k_rope[end:]] + \
                ([cache.index_k[end:]] if isinstance(cache, LatentIndexCache) else [])
        else:
            continue  # a recurrent state holds no positions
        for part in parts:
            part.copy_(torch.randn(part.shape, generator=gen) * 10)


@pytest.mark.parametrize("name", FAMILIES)
def test_device_positions_give_the_host_logits(models, name):
    """Attention over a bucket with later positions masked is attention over the slice, to float32 rounding (the
    masked scores add exact zeros; only the summation order differs)."""
    model = models(name)
    expected = decode(model, None)
    for length in (32, MAX_CONTEXT):
        scribble_past(model, len(PROMPT))
        assert rel_err(decode(model, length), expected) <= 1e-5


def capturable_block(model, token: torch.Tensor, start: int | Positions) -> torch.Tensor:
    """The part of a decode step a CUDA graph holds: the embedding, each layer's attention block, post-attention
    norm and router (a dense MLP too; the routed and shared experts are the experts' step), the final norm and the
    LM head -> logits [1, V]."""
    t = model.transformer
    x = torch.nn.functional.embedding(token, t.embed)
    for layer, cache in zip(t.layers, t.caches):
        x = layer.attention_block(x, start, cache, t.rope)
        h = layer.post_attn_norm(x)
        if isinstance(layer.mlp, MoE):
            layer.mlp.route(h)
        else:
            x = x + layer.mlp(h)
    return t.lm_head(t.norm(x))


@pytest.mark.parametrize("name", FAMILIES)
def test_the_capturable_block_reads_no_data(models, name):
    """Under FakeTensorMode tensors are metadata only: an op whose result or shape depends on values (.item(),
    nonzero, unique, bincount, a slice at a tensor's value) raises. The position and the token are made inside
    the mode, so no constant stands behind them."""
    assert fake_step(models(name)).shape == (1, 96)


def fake_step(model) -> torch.Tensor:
    """The capturable block's logits after PROMPT, run under FakeTensorMode at a fake position in a bucket of 32."""
    with torch.inference_mode():
        model.transformer(PROMPT, 0)
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
        token, position = torch.empty(1, dtype=torch.int64), torch.empty((), dtype=torch.int64)
        return capturable_block(model, token, Positions(position, 32))


# Ops that read values back to the host or size their output by them.
DATA_DEPENDENT = {"aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.unique_consecutive", "aten._unique2",
                  "aten.unique_dim", "aten.bincount", "aten.masked_select", "aten.is_nonzero", "aten.equal"}


class OpTrace(TorchDispatchMode):
    """Every aten op with its arguments: tensors as (shape, stride, storage offset, dtype), anything else as
    itself, so a host position baked into an op (a slice bound, a view's offset) shows. A data-dependent op
    raises."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        if name in DATA_DEPENDENT:
            raise AssertionError(f"data-dependent op {name} in a decode step")
        leaves = tree_leaves((args, kwargs))
        self.ops.append((name, tuple(
            (tuple(a.shape), a.stride(), a.storage_offset(), a.dtype) if isinstance(a, torch.Tensor) else repr(a)
            for a in leaves)))
        return func(*args, **kwargs)


def trace_steps(model, starts: list[int | Positions]) -> list[list[tuple]]:
    """The ops of the capturable block for STEPS' first tokens at these consecutive positions, after PROMPT."""
    traces = []
    with torch.inference_mode():
        model.transformer(PROMPT, 0)
        for token, start in zip(STEPS, starts):
            token = token[None].clone()  # not a view into STEPS at a step-dependent offset
            with OpTrace() as trace:
                capturable_block(model, token, start)
            traces.append(trace.ops)
    return traces


@pytest.mark.parametrize("name", FAMILIES)
def test_steps_in_one_bucket_issue_the_same_ops(models, name):
    """Two consecutive steps in one bucket: the same ops with the same shapes and arguments; the next bucket
    changes shapes. At host positions the trace differs from one step to the next (the check can see it)."""
    model = models(name)
    n = len(PROMPT)
    first, second, next_bucket = trace_steps(model, [Positions(torch.tensor(n + i), length)
                                                     for i, length in enumerate((32, 32, MAX_CONTEXT))])
    assert len(first) > 50 and first == second
    assert next_bucket != first
    host_first, host_second = trace_steps(model, [n, n + 1])
    assert host_first != host_second


@pytest.mark.parametrize("dense", ["int8", "int4"])
@pytest.mark.parametrize("name", [GQA, MLA])
def test_the_quantized_device_tier_block_is_capturable_too(checkpoint_dir, name, dense):
    """With the dense weights quantized on the device tier (torch's weight-only int8 / int4 matmuls) the block
    still reads no data and repeats its ops within a bucket."""
    model = offload.load(checkpoint_dir(name)[0], device="cpu", gpu_memory="1GiB", max_context=MAX_CONTEXT,
                         dense=dense)
    assert type(model.transformer.layers[0].attn.o_proj).__name__ == "DeviceQuantLinear"
    assert fake_step(model).shape == (1, 96)
    n = len(PROMPT)
    first, second = trace_steps(model, [Positions(torch.tensor(n + i), 32) for i in range(2)])
    assert first == second


@pytest.mark.cuda
@pytest.mark.parametrize("name", [GQA, "gpt_oss", MLA])
def test_a_cuda_graph_of_the_block_replays_at_every_position_of_its_bucket(checkpoint_dir, name):
    """Captured once at device Positions, the block replayed with the next tokens and positions written into its
    input tensors gives the eager block's logits at host positions."""
    model = offload.load(checkpoint_dir(name)[0], device="cuda", dtype="float32", max_context=MAX_CONTEXT)
    cuda, n = torch.device("cuda"), len(PROMPT)
    token = torch.zeros(1, dtype=torch.int64, device=cuda)
    at = Positions(torch.full((), n, dtype=torch.int64, device=cuda), 32)
    with torch.inference_mode():
        model.transformer(PROMPT.to(cuda), 0)
        expected = [capturable_block(model, token_id[None].to(cuda), n + i) for i, token_id in enumerate(STEPS)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capturing stream, as torch.cuda.graphs asks
            capturable_block(model, token, at)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = capturable_block(model, token, at)
        for i, token_id in enumerate(STEPS):
            token.copy_(token_id[None])
            at.start.fill_(n + i)
            graph.replay()
            assert rel_err(logits.cpu(), expected[i].cpu()) <= 1e-5

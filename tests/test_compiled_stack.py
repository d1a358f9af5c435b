"""The compiled decode step's shape as counts, so that a regression fails: every decoder layer is two Numba
calls (its token mixer and its MLP block) and the final norm with the LM head is one, with no torch op per layer
and no module call; the parallel regions (Numba prange launches) a step enters are the ones the design has, per
kind of layer. The numbers themselves are tests/test_decode_step.py's (the whole step against the torch path)."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import offload
from offload.errors import ContextLengthError
from offload.model import compiled_step
from offload.model.transformer import DecoderLayer
from tiny_models import rel_err

import csrc_py  # noqa: F401  (torch before numba)
from csrc_py import decode_step as ds

BLOCKS = ("attention_block", "mla_block", "deltanet_block", "moe_block", "mlp_block", "head_block")
REPO = Path(__file__).resolve().parent.parent


class TorchOps(TorchDispatchMode):
    """Counts the torch ops run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="session")
def checkpoint(checkpoint_dir):
    """name -> the tiny model's folder (written once per session by conftest's checkpoint_dir)."""
    return lambda name: checkpoint_dir(name)[0]


@pytest.mark.parametrize("name, experts, dense", [("qwen3_moe", "int8", "int8"), ("deepseek_v2", "int4", "int4"),
                                                  ("qwen3_next", "int8", "int8")])
def test_a_decode_step_is_two_numba_calls_a_layer_and_one_for_the_head(checkpoint, monkeypatch, name, experts,
                                                                        dense):
    calls: Counter[str] = Counter()
    for block in BLOCKS:  # looked up in the module when a layer's step is prepared, and the head's at each call
        kernel = getattr(ds, block)
        monkeypatch.setattr(ds, block, lambda *args, _k=kernel, _n=block: (calls.update([_n]), _k(*args)))
    forwards = Counter()
    layer_forward = DecoderLayer.forward
    monkeypatch.setattr(DecoderLayer, "forward",
                        lambda self, *a: (forwards.update(["layer"]), layer_forward(self, *a))[1])
    model = offload.load(checkpoint(name), device="cpu", experts=experts, dense=dense, max_context=64)
    transformer = model.transformer
    L = len(transformer.layers)
    with torch.inference_mode():
        transformer(torch.arange(3, 9), 0, last_only=True)  # the prefill: torch modules, one compiled head
        calls.clear()
        forwards.clear()
        transformer(torch.tensor([5]), 6, last_only=True)  # prepares the compiled layers
        calls.clear()
        stack_call = compiled_step.CompiledStack.__call__
        probe = TorchOps()

        def probed(self, *args):
            with probe:
                return stack_call(self, *args)

        monkeypatch.setattr(compiled_step.CompiledStack, "__call__", probed)
        logits = transformer(torch.tensor([7]), 7, last_only=True)
    mixers = sum(calls[b] for b in ("attention_block", "mla_block", "deltanet_block"))
    mlps = calls["moe_block"] + calls["mlp_block"]
    assert (mixers, mlps, calls["head_block"]) == (L, L, 1)
    assert forwards["layer"] == 0  # no DecoderLayer.forward: the stack calls the blocks itself
    # No torch op per layer: the stack's own six (the input's numpy view, the result as a tensor), at any depth.
    assert 0 < sum(probe.ops.values()) <= 6, probe.ops
    assert logits.shape == (1, transformer.cfg.vocab_size) and torch.isfinite(logits).all()


def test_the_stack_and_the_head_give_the_per_layer_steps_numbers(checkpoint, monkeypatch):
    """The stack and the compiled head against the per-layer compiled path and the torch head, on the same steps."""
    model = offload.load(checkpoint("mixtral"), device="cpu", experts="int8", dense="int8", max_context=64)
    transformer = model.transformer
    ids = torch.arange(3, 15)

    def steps() -> torch.Tensor:
        transformer.held = 0
        with torch.inference_mode():
            return torch.cat([transformer(ids[i: i + 1], i, last_only=True) for i in range(len(ids))])

    fast = steps()
    monkeypatch.setattr(compiled_step, "for_stack", lambda *args: None)
    monkeypatch.setattr(compiled_step, "for_head", lambda *args: None)
    per_layer = steps()
    assert rel_err(fast, per_layer) < 1e-5
    assert torch.equal(fast.argmax(-1), per_layer.argmax(-1))


# Parallel regions per decode step, by design: attention = fused q/k/v, attention over the cache, o_proj; MLA with
# packed dense weights = fused q (or q_a) + kv_a, q_b with a q-LoRA, W_UK, the spans' softmax over the latents
# (merged serially), W_UV, o_proj, + a lightning indexer's wk where the layer has its own (the counted step's context is
# within index_topk: no selection yet); Gated DeltaNet = in_proj, the delta rule, out_proj; a MoE block = the
# routed experts' gate and up (one region) and down matmuls (+ the shared expert's gate/up and down); a dense MLP =
# gate/up and down; the LM head = one. Counted from Numba's own launch function, in a process of its own (the count
# hooks the symbol before any parallel kernel is linked).
COUNT_REGIONS = r"""
import ctypes, json, sys
import torch
import csrc_py.threads  # the threading layer's priority, torch first
import llvmlite.binding as ll
from numba.np.ufunc import parallel
parallel._launch_threads()
proto = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 5 + [ctypes.c_ssize_t] * 3))
launch = proto(ll.address_of_symbol("numba_parallel_for"))
count = [0]
def counted(*args):
    count[0] += 1
    launch(*args)
hook = proto(counted)
ll.add_symbol("numba_parallel_for", ctypes.cast(hook, ctypes.c_void_p).value)
import offload
from offload.errors import ContextLengthError
model = offload.load(sys.argv[1], device="cpu", experts="int8", dense="int8", max_context=64)
t = model.transformer
with torch.inference_mode():
    t(torch.arange(3, 9), 0, last_only=True)
    t(torch.tensor([5]), 6, last_only=True)
    count[0] = 0
    t(torch.tensor([7]), 7, last_only=True)
kinds = [(type(layer.attn).__name__, getattr(layer.attn, "q_b_proj", None) is not None,
          getattr(layer.attn, "indexer", None) is not None, type(layer.mlp).__name__,
          layer.mlp.shared is not None if hasattr(layer.mlp, "shared") else False) for layer in t.layers]
print(json.dumps({"regions": count[0], "kinds": kinds}))
"""


def designed_regions(kinds: list[tuple[str, bool, bool, str, bool]]) -> int:
    per_attention = {"Attention": 3, "MLA": 5, "GatedDeltaNet": 3}
    per_mlp = {"MoE": 2, "SwiGLU": 2}
    return sum(per_attention[attn] + q_lora + indexer + per_mlp[mlp] + 2 * shared
               for attn, q_lora, indexer, mlp, shared in kinds) + 1


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe", "deepseek_v2", "deepseek_v2_group_yarn", "deepseek_v32",
                                  "glm_moe_dsa", "qwen3_next", "gpt_oss"])
def test_parallel_regions_per_step_are_the_designed_ones(checkpoint, name):
    result = subprocess.run([sys.executable, "-c", COUNT_REGIONS, str(checkpoint(name))], capture_output=True,
                            text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["regions"] == designed_regions(got["kinds"]), got


def test_a_step_past_max_context_is_refused_before_the_compiled_cache_write(checkpoint):
    """The compiled blocks write the caches without bounds checks: a position at or past max_context must be
    refused with one clear line (not written past the cache), and the caches must stay usable."""
    model = offload.load(checkpoint("qwen3_moe"), device="cpu", experts="int8", dense="int8", max_context=16)
    transformer = model.transformer
    with torch.inference_mode():
        transformer(torch.arange(3, 9), 0, last_only=True)
        before = transformer(torch.tensor([5]), 6, last_only=True).clone()  # a compiled step
        with pytest.raises(ContextLengthError, match="max_context=16"):
            transformer(torch.tensor([5]), 16, last_only=True)
        with pytest.raises(ContextLengthError, match="max_context=16"):
            transformer(torch.arange(3, 9), 12)
        assert torch.equal(transformer(torch.tensor([5]), 6, last_only=True), before)


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v2"])
def test_a_generations_step_is_the_compiled_forward_without_a_torch_op(checkpoint, name):
    """Transformer.step_logits (what a generation calls per token): on the compiled CPU path no torch op at all,
    the same Numba calls as forward, the same logits bit for bit, the token recorded as held; the torch path
    (the step switched off) gives the forward's logits too, and a position past max_context is one clear error."""
    model = offload.load(checkpoint(name), device="cpu", experts="int8", dense="int8", max_context=16)
    transformer = model.transformer
    with torch.inference_mode():
        transformer(torch.arange(3, 9), 0, last_only=True)
        forward = transformer(torch.tensor([5]), 6, last_only=True)[0].clone()
    assert compiled_step.for_token(transformer) is not None
    probe = TorchOps()
    with probe:
        logits = transformer.step_logits(5, 6)
    assert not probe.ops, probe.ops
    assert torch.equal(torch.from_numpy(logits), forward)
    assert transformer.cached_ids == [3, 4, 5, 6, 7, 8, 5]
    previous = compiled_step.set_enabled(False)
    try:
        assert compiled_step.for_token(transformer) is None
        assert rel_err(torch.from_numpy(transformer.step_logits(5, 6)), forward) < 1e-5
    finally:
        compiled_step.set_enabled(previous)
    with pytest.raises(ContextLengthError, match="max_context=16"):
        transformer.step_logits(5, 16)
    assert torch.equal(torch.from_numpy(transformer.step_logits(5, 6)), forward)  # the caches still usable


def test_a_token_outside_the_vocabulary_is_refused_by_the_compiled_token_step(checkpoint):
    model = offload.load(checkpoint("qwen3_moe"), device="cpu", experts="int8", dense="int8", max_context=16)
    transformer = model.transformer
    with torch.inference_mode():
        transformer(torch.arange(3, 9), 0, last_only=True)
    rows = transformer.embed.shape[0]
    for token in (rows, -1):
        with pytest.raises(IndexError, match=f"outside the embedding table's {rows} rows"):
            transformer.step_logits(token, 6)
    assert transformer.step_logits(5, 6).shape == (transformer.cfg.vocab_size,)

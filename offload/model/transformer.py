"""One shared MoE transformer for every supported architecture, decoding one sequence over a preallocated cache."""
from __future__ import annotations

from functools import partial
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..arch import CheckpointNames
from ..config import ModelConfig
from ..errors import ContextLengthError
from ..timers import Timers
from ..weights.source import WeightSource
from . import compiled_step
from .attention import Attention
from .block_graphs import BlockGraphs, BlockOutputs, Capture, warn_once
from .gated_deltanet import GatedDeltaNet
from .kv_cache import LayerCache
from .layers import RMSNorm, SwiGLU, load_linear, make_linear
from .mla import MLA, share_index_selections
from .positions import Positions, StepPositions
from ..experts.prefetch import Router
from .moe import ExpertsFactory, MoE
from .rope import RotaryTable


def token_mixer(cfg: ModelConfig, layer: int, src: WeightSource, names: CheckpointNames) -> nn.Module:
    """The layer's attention: Gated DeltaNet on a linear-attention layer, else MLA or grouped-query attention.
    Each builds its own kind of cache (`new_cache`)."""
    if cfg.is_linear_attention(layer):
        return GatedDeltaNet(cfg, layer, src)
    return MLA(cfg, layer, src) if cfg.mla else Attention(cfg, layer, src, names)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, names: CheckpointNames, src: WeightSource,
                 make_experts: ExpertsFactory, timers: Timers):
        super().__init__()
        p, H = f"model.layers.{layer}", cfg.hidden_size
        self.timers = timers
        self.input_norm = RMSNorm.load(src, f"{p}.input_layernorm", H, cfg.rms_norm_eps, cfg.zero_centred_norm)
        self.attn = token_mixer(cfg, layer, src, names)
        self.post_attn_norm = RMSNorm.load(src, f"{p}.post_attention_layernorm", H, cfg.rms_norm_eps,
                                           cfg.zero_centred_norm)
        if cfg.moe_layers[layer]:
            self.mlp = MoE(cfg, layer, names, src, make_experts, timers)
        else:
            self.mlp = SwiGLU.load(src, f"{p}.{names.dense_mlp}", H, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.graphs: BlockGraphs | None = None  # captured decode blocks by context bucket (capture_graphs)

    def forward(self, x: torch.Tensor, start: int | Positions, cache, rope: RotaryTable) -> torch.Tensor:
        # A decode step on the CPU at a host position: one or two Numba calls.
        compiled = compiled_step.for_layer(self, x) if isinstance(start, int) else None
        if compiled is not None:
            return compiled(x, start, cache, rope)
        if self.graphs is not None and isinstance(start, Positions):
            with self.timers.section("attention"):  # attention, norm and router: one replayed graph
                x, h, *routed = self.graphs.block(x, start)
            return x + (self.mlp(h, tuple(routed)) if routed else self.mlp(h))
        with self.timers.section("attention"):
            x = self.attention_block(x, start, cache, rope)
        return x + self.mlp(self.post_attn_norm(x))

    def attention_block(self, x: torch.Tensor, start: int | Positions, cache, rope: RotaryTable) -> torch.Tensor:
        """x + attention(norm(x)) [T, H], untimed. At device Positions it reads no host value and issues the same
        ops at every position of a context bucket: with the post-attention norm and the router, the part of a
        layer a CUDA graph can hold (tests/test_positions.py)."""
        return x + self.attn(self.input_norm(x), start, cache, rope)

    def graph_block(self, x: torch.Tensor, start: int | Positions, cache, rope: RotaryTable) -> BlockOutputs:
        """The block a CUDA graph holds: (x + attention [T, H], post-attention norm h [T, H]), then on a MoE layer
        the router's (topk ids [T, K], topk weights [T, K])."""
        x = self.attention_block(x, start, cache, rope)
        h = self.post_attn_norm(x)
        return (x, h, *self.mlp.route(h)) if isinstance(self.mlp, MoE) else (x, h)

    def replays_safely(self) -> bool:
        """Whether running the block twice at one position leaves the same state (a capture's warm-up runs it
        once more): a KV or latent cache rewrites the same rows, a recurrent state would advance again."""
        return not isinstance(self.attn, GatedDeltaNet)


class Transformer(nn.Module):
    """ids -> logits for one sequence; `start` is the number of positions already in the cache."""

    def __init__(self, cfg: ModelConfig, names: CheckpointNames, src: WeightSource, make_experts: ExpertsFactory,
                 max_context: int, timers: Timers | None = None, settle_step: Callable[[], None] | None = None,
                 device_positions: bool = False, kv_dtype: torch.dtype | None = None):
        super().__init__()
        self.cfg, self.max_context = cfg, max_context
        self.timers = timers or Timers()
        dtype, device = src.dtype, src.device
        V, H = cfg.vocab_size, cfg.hidden_size
        self.embed = src.take("model.embed_tokens.weight", (V, H))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, names, src, make_experts, self.timers)
                                    for i in range(cfg.num_hidden_layers))
        share_index_selections([layer.attn for layer in self.layers])  # GLM-5: layers reusing an earlier top-k
        self.norm = RMSNorm.load(src, "model.norm", H, cfg.rms_norm_eps, cfg.zero_centred_norm)
        if cfg.tie_word_embeddings and not src.has("lm_head.weight"):
            bias = src.take("lm_head.bias", (V,)) if cfg.lm_head_bias else None
            self.lm_head = make_linear(src.tied_linear_weight("model.embed_tokens.weight", self.embed), bias)
        else:
            self.lm_head = load_linear(src, "lm_head", V, H, cfg.lm_head_bias)
        self.rope = RotaryTable(cfg.rope, cfg.rope_dim, max_context, device, dtype)
        # Each layer's sequence state, of the kind its attention needs (offload/model/kv_cache.py); what grows with
        # the context in kv_dtype (None: the model dtype).
        self.caches: list[LayerCache] = [layer.attn.new_cache(max_context, dtype, device, kv_dtype)
                                         for layer in self.layers]
        # The token at each position the caches have processed, in order: what a new prompt may share a prefix
        # with. Kept where the forwards got them (no host read per step) and read back only when a prefix match
        # asks (`cached_ids`). Emptied before every forward and set again only once it has finished, so a step
        # that fails or is interrupted half-way leaves nothing to reuse.
        self.held_ids = torch.zeros(max_context, dtype=torch.long, device=device)
        self.held = 0  # held_ids[:held] are valid
        self._held_on_host = self.held_ids.numpy() if self.held_ids.device.type == "cpu" else None
        self._step_ids = torch.empty(1, dtype=torch.long, device=device)  # step_logits' token: no allocation per step
        # Called before each forward, once the previous one's results were read: the experts' step-boundary work.
        self.settle_step = settle_step
        # On a device tier, decode steps take their positions from a device tensor and attend over a context bucket:
        # consecutive steps in a bucket issue the same ops, the precondition for replaying them as a CUDA graph.
        self.step_positions = StepPositions(max_context, device) if device_positions else None
        # A longer prompt runs in forwards of at most this many tokens (None: one forward), so that activations
        # stay bounded and each chunk is one call per MoE layer, which streams its experts when the chunk is long
        # enough (offload/experts/stream.py). The logits are the same either way, to rounding.
        self.prefill_chunk: int | None = None

    @property
    def cached_ids(self) -> list[int]:
        """The tokens at positions 0.. that the caches hold (one host read)."""
        return self.held_ids[: self.held].tolist()

    @property
    def cache_nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    def resume_point(self, common: int) -> int:
        """Where a sequence whose first `common` tokens equal those already processed can continue: the largest
        position every layer's cache can resume from (0: start afresh)."""
        return min((cache.resume_point(common) for cache in self.caches), default=0)

    def moe_blocks(self) -> list[MoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]

    def routers(self) -> dict[int, Router]:
        """Each MoE layer's router (h [T, H] -> topk ids, weights), for the prefetcher."""
        return {i: layer.mlp.route for i, layer in enumerate(self.layers) if isinstance(layer.mlp, MoE)}

    def capture_graphs(self, capture: Capture) -> int:
        """Replay each layer's attention + norm + router block from a graph captured at its first decode step in a
        context bucket (model/block_graphs.py); decode steps must then run at device positions. Layers whose
        block cannot be replayed safely, or that read another layer's indexer selection, stay eager. Returns the
        number of layers that capture."""
        shared = {id(layer.attn.selection) for layer in self.layers if getattr(layer.attn, "shares_selection", False)}
        on_failure = warn_once()
        captured = 0
        for i, (layer, cache) in enumerate(zip(self.layers, self.caches)):
            if not layer.replays_safely() or id(getattr(layer.attn, "selection", None)) in shared:
                continue
            run_block = partial(layer.graph_block, cache=cache, rope=self.rope)  # (x, at) -> outputs
            layer.graphs = BlockGraphs(run_block, capture, on_failure(i))
            captured += 1
        return captured

    def decode_positions(self, start: int) -> Positions | None:
        """A one-token decode step at host position `start` as device Positions in its bucket, or None where
        this model steps at host positions (the CPU-only path, whose compiled step takes the host int)."""
        return self.step_positions.at(start) if self.step_positions is not None else None

    def hidden(self, ids: torch.Tensor, start: int, positions: Positions | None = None) -> torch.Tensor:
        """ids [T] -> final-norm hidden states [T, H], writing positions start..start+T-1 to the caches."""
        return self.norm(self._layers(ids, start, positions))

    def step_logits(self, token: int, start: int) -> np.ndarray:
        """logits [V] float32 on the host of one new token at position `start`, its caches written: a generation's
        step. Where the whole step compiles (compiled_step.for_token: on the CPU, at host positions) it is numpy
        and Numba calls only; else forward at the model's decode positions, in inference mode."""
        step = compiled_step.for_token(self)
        if step is None:
            with torch.inference_mode():
                ids = self._step_ids.fill_(token)
                return self(ids, start, last_only=True, positions=self.decode_positions(start))[0].cpu().numpy()
        held = self._begin_step(start, 1)
        logits = step(token, start, self.caches, self.rope)
        if held >= start:
            self._held_on_host[start] = token  # a numpy view of held_ids (on the CPU, as for_token requires)
            self.held = start + 1
        return logits

    def _begin_step(self, start: int, tokens: int) -> int:
        """What precedes every forward of `tokens` at positions start..: the bounds check, the timers and experts
        settled, the record of held ids emptied. Returns how many ids it held."""
        if start + tokens > self.max_context:  # the compiled step writes the caches without bounds checks
            raise ContextLengthError(f"positions {start}..{start + tokens - 1} exceed max_context="
                                     f"{self.max_context}; load with a larger max_context")
        self.timers.collect()
        if self.settle_step is not None:
            self.settle_step()
        held, self.held = self.held, 0
        return held

    def _layers(self, ids: torch.Tensor, start: int, positions: Positions | None) -> torch.Tensor:
        """ids [T] -> the last decoder layer's output [T, H] (before the final norm); on the compiled step it is a
        buffer the next step reuses, so read it before then."""
        held = self._begin_step(start, ids.shape[0])
        x = F.embedding(ids, self.embed)  # [T, H]
        # A decode step on the CPU at a host position: every layer compiled, two Numba calls each.
        stack = compiled_step.for_stack(self, x) if positions is None else None
        if stack is not None:
            x = stack(x, start, self.caches, self.rope)
        else:
            for layer, cache in zip(self.layers, self.caches):
                x = layer(x, start if positions is None else positions, cache, self.rope)
        # Positions before `start` are untouched; without a record of them the caches hold nothing reusable.
        if held >= start:
            self.held_ids[start : start + ids.shape[0]].copy_(ids)
            self.held = start + ids.shape[0]
        return x

    def forward(self, ids: torch.Tensor, start: int, last_only: bool = False, positions: Positions | None = None
                ) -> torch.Tensor:
        """ids [T] -> logits [T, V] (or [1, V] with last_only) in float32. `positions`: the same positions held on
        the device in their context bucket (Positions.at(start, T, max_context, device)); the layers then take
        them from there and attend over the bucket, the form of a decode step a CUDA graph replays (the
        host `start` still keeps the record of cached ids). A prompt longer than `prefill_chunk` runs in chunks."""
        chunk = self.prefill_chunk if positions is None and self.prefill_chunk else max(1, ids.shape[0])
        pieces = []
        for i in range(0, ids.shape[0], chunk):
            x = self._layers(ids[i : i + chunk], start + i, positions)  # [chunk, H], before the final norm
            # a compiled step's result is a buffer the next chunk reuses: every row kept is a copy
            pieces.append(x[-1:] if last_only else x.clone())
        x = pieces[-1] if last_only else torch.cat(pieces)
        head = compiled_step.for_head(self, x)
        with self.timers.section("lm_head"):
            if head is not None:  # the final norm and LM head as one Numba call
                return head(x)
            return self.lm_head(self.norm(x)).float()

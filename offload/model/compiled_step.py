"""The compiled decode step's side in the model: which decoder layers it runs, and their arguments, prepared once.

A layer keeps its torch modules (prefill, the reference path, the GPU). For a few tokens on the CPU in float32,
with packed dense weights (dense="int8"/"int4") and CPU-kernel experts, `for_layer` returns a CompiledLayer that
runs the token mixer (attention, MLA or Gated DeltaNet) and the MLP block as one Numba call each
(csrc_py.decode_step); any part it does not cover (an option without a compiled form, torch weights) stays in
torch, and a layer with nothing to compile returns None. Where every layer compiles whole, `for_stack` gives the
Transformer one CompiledStack that runs them all (two Numba calls a layer, no torch op or module call per layer),
and `for_head` the final norm and packed LM head as one more call. The numbers are the torch path's within float32
rounding (tests/test_decode_step.py); tests/test_compiled_stack.py counts the calls a step makes.

OFFLOAD_COMPILED_STEP=0 in the environment, or `set_enabled(False)`, forces the torch path (A/B measurements).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ..config import RouterConfig
from .attention import Attention
from .compiled_indexer import IndexerPlan
from .gated_deltanet import L2_EPS, GatedDeltaNet
from .layers import FusedLinear, QuantLinear, SwiGLU
from .mla import MLA
from .moe import MoE

if TYPE_CHECKING:
    from .rope import RotaryTable
    from .transformer import DecoderLayer

ENV_SWITCH = "OFFLOAD_COMPILED_STEP"
MAX_TOKENS = 8  # the compiled stages run on the calling thread: a decode step's few rows, not a prefill
_NOT_BUILT = object()
_enabled = os.environ.get(ENV_SWITCH, "1") != "0"


def set_enabled(on: bool) -> bool:
    """Turn the compiled step on or off for every model in this process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(on)
    return previous


def enabled() -> bool:
    return _enabled


def for_layer(layer: DecoderLayer, x: torch.Tensor) -> CompiledLayer | None:
    """The compiled form of `layer` for hidden states x [T, H], or None where the torch path runs."""
    if not _applies(x):
        return None
    compiled = _compiled(layer)
    return compiled if compiled is not None and compiled.takes(x.shape[0]) else None


# The state each compiled block reproduces. A module or config that grows a field it does not know (a new attention
# feature, a new routing variant) keeps the torch path until the compiled code learns it: never other numbers.
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))
_ATTENTION_FIELDS = {"heads", "kv_heads", "head_dim", "qk_norm", "clip_qkv", "window", "scale", "qkv", "o_proj",
                     "q_norm", "k_norm", "sinks", "output_gate", "qk_norm_after_rope", "rope_interleaved", "chunk",
                     "rope_layer", "l2_eps", "temperature"}
_MLA_FIELDS = {"heads", "nope", "rope_dim", "v_dim", "rank", "interleaved", "input_projs", "q_a_norm", "q_b_proj",
               "kv_a_norm", "kv_b_proj", "k_b", "v_b", "o_proj", "scale", "w_uk", "w_uv", "indexer", "shares_selection",
               "selection"}
_DELTANET_FIELDS = {"k_heads", "v_heads", "k_dim", "v_dim", "conv_kernel", "conv_dim", "projections", "in_proj",
                    "conv_weight", "neg_A", "dt_bias", "norm_weight", "eps", "out_proj"}
_INDEXER_FIELDS = {"heads", "head_dim", "topk", "interleaved", "wq_b", "wk", "k_norm", "weights_proj"}
_LAYER_NORM_FIELDS = {"weight", "bias", "eps"}
# `graphs` replays device-position steps only; the compiled step runs at host positions.
_LAYER_FIELDS = {"timers", "input_norm", "attn", "post_attn_norm", "mlp", "_compiled_step", "graphs"}
# zero_centred changes where the weight meets the rounding to the model dtype: nothing, in the float32 step.
_NORM_FIELDS = {"weight", "eps", "zero_centred"}
_SWIGLU_FIELDS = {"gate_up", "down"}
_MOE_FIELDS = {"timers", "router_cfg", "router", "router_bias", "correction_bias", "experts", "shared", "shared_gate",
               "scales_input", "heat"}
_ROUTER_FIELDS = {"num_experts", "top_k", "scoring", "topk_method", "norm_topk_prob", "n_group", "topk_group",
                  "routed_scaling_factor", "has_correction_bias", "norm_min"}
_TOPK_METHODS = {"greedy", "group_limited_greedy", "noaux_tc"}


def _knows(module: torch.nn.Module, fields: set[str]) -> bool:
    """Whether `module` holds nothing beyond `fields` (and what every nn.Module holds)."""
    names = set(vars(module)) - _MODULE_INTERNALS
    names |= set(module._modules) | set(module._parameters) | set(module._buffers)
    return names <= fields


def _f32(t: torch.Tensor | None) -> np.ndarray:
    """A float32 numpy view (empty for None: 'absent' to the compiled code)."""
    if t is None:
        return np.zeros(0, np.float32)
    return t.detach().to(torch.float32).contiguous().numpy()


def _cache_array(t: torch.Tensor) -> np.ndarray:
    """A cache buffer as the compiled code writes and reads it in place: float32, or bf16 as its bits (uint16)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _exact_bf16_or_f32(w: torch.Tensor) -> np.ndarray:
    """w as bf16 bits (uint16, half the bytes a decode step reads) when every value is a bf16 value, as a bf16 or
    bf16-stored checkpoint's are; else as float32. The compiled code widens either to the same floats."""
    w = w.detach().to(torch.float32)
    narrow = w.to(torch.bfloat16)
    if torch.equal(narrow.to(torch.float32), w):
        return narrow.contiguous().view(torch.int16).numpy().view(np.uint16)
    return w.contiguous().numpy()


def _routing_codes(cfg: RouterConfig) -> tuple[int, int, int, int, int, int]:
    """(top_k, scoring, groups, n_group, topk_group, norm) for csrc_py.decode_step.route: the cases of
    offload.model.routing.route (sigmoid ranks groups by their two best choices whenever there are groups; softmax
    by their best score, for group_limited_greedy only)."""
    from csrc_py.decode_step import GROUPS_MAX, GROUPS_NONE, GROUPS_TOP2_SUM, SIGMOID, SOFTMAX

    grouped = cfg.n_group > 1
    if cfg.scoring == "sigmoid":
        scoring, groups = SIGMOID, GROUPS_TOP2_SUM if grouped else GROUPS_NONE
    else:
        scoring = SOFTMAX
        groups = GROUPS_MAX if grouped and cfg.topk_method == "group_limited_greedy" else GROUPS_NONE
    return cfg.top_k, scoring, groups, cfg.n_group, cfg.topk_group, int(cfg.norm_topk_prob)


@dataclass
class _SwiGLUArgs:
    """A packed SwiGLU (gate/up fused) as csrc_py.decode_step.swiglu takes it, and its scratch widths."""

    weights: tuple  # (gate_up packed, its bias, down packed, its bias)
    dims: tuple[int, int]  # (up_start, width)
    gate_up_width: int  # padded gate+up output
    out_width: int  # padded down output

    @classmethod
    def of(cls, mlp: SwiGLU) -> _SwiGLUArgs | None:
        if not _knows(mlp, _SWIGLU_FIELDS) or not isinstance(mlp.gate_up, FusedLinear) or \
                not isinstance(mlp.down, QuantLinear):
            return None
        gate_up, down = mlp.gate_up, mlp.down
        return cls((gate_up.packed.kernel_tuple(), _f32(gate_up.bias), down.packed.kernel_tuple(), _f32(down.bias)),
                   (gate_up.starts[1], gate_up.widths[0]), gate_up.packed.padded_shape[1], down.packed.padded_shape[1])

    @classmethod
    def absent(cls, fmt: str) -> _SwiGLUArgs:
        """Tiny matrices in `fmt` with width 0: the argument types of 'no shared expert', never read."""
        from csrc_py.formats import pack

        m = pack(torch.zeros(1, 32, 32), fmt)
        return cls((m.kernel_tuple(), _f32(None), m.kernel_tuple(), _f32(None)), (0, 0), 1, 1)

    def scratch(self, T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """gu [T, gate+up], act [T, width], y [T, padded out]."""
        return (np.zeros((T, self.gate_up_width), np.float32), np.zeros((T, max(self.dims[1], 1)), np.float32),
                np.zeros((T, self.out_width), np.float32))


class _MixerPlan:
    """A token mixer's plan: `args` prepares its block's arguments, `run` calls it."""

    def run(self, p: _Prepared, x: np.ndarray, out: np.ndarray, start: int) -> None:
        """out = x + the mixer's output for x [T, H] at positions start.., its cache written."""
        p.attn_block(x, out, *p.attn_head, start, *p.attn_tail)


@dataclass
class _AttentionPlan(_MixerPlan):
    """Attention's arguments to csrc_py.decode_step.attention_block that do not change between steps."""

    norm: tuple  # (weight, eps)
    qkv: tuple  # packed
    qkv_bias: np.ndarray
    dims: tuple[int, ...]
    flags: tuple[int, ...]  # (qk norm code, q/k norm after RoPE, interleaved RoPE, output gate, RoPE applies)
    q_norm: np.ndarray
    k_norm: np.ndarray
    q_scale: tuple[float, float, float]  # (L2 q/k norm eps, temperature floor_scale, attn_scale; 0: none)
    clip: float
    span: tuple[int, int]  # (sliding window, attention chunk; 0: none)
    scale: float
    sinks: np.ndarray
    o_proj: tuple
    o_bias: np.ndarray
    widths: tuple[int, int, int, int]  # padded qkv, gated q (0: no output gate), heads*head_dim, padded o_proj out

    @classmethod
    def build(cls, layer: DecoderLayer) -> _AttentionPlan | None:
        attn = layer.attn
        if type(attn) is not Attention or not _knows(attn, _ATTENTION_FIELDS) or \
                not isinstance(attn.qkv, FusedLinear) or not isinstance(attn.o_proj, QuantLinear):
            return None
        if attn.qk_norm and not (_knows(attn.q_norm, _NORM_FIELDS) and _knows(attn.k_norm, _NORM_FIELDS)):
            return None
        from csrc_py.decode_step import QK_NORM_FULL, QK_NORM_HEAD, QK_NORM_NONE

        heads, kv_heads, d = attn.heads, attn.kv_heads, attn.head_dim
        qk_norm = {None: QK_NORM_NONE, "head": QK_NORM_HEAD, "full": QK_NORM_FULL}[attn.qk_norm or None]
        eps = attn.q_norm.eps if qk_norm != QK_NORM_NONE else layer.input_norm.eps
        if qk_norm != QK_NORM_NONE and eps != layer.input_norm.eps:
            return None  # one eps per block in the compiled code
        return cls(
            norm=(_f32(layer.input_norm.weight), float(layer.input_norm.eps)),
            qkv=attn.qkv.packed.kernel_tuple(), qkv_bias=_f32(attn.qkv.bias),
            dims=(heads, kv_heads, d, *attn.qkv.starts),
            flags=(qk_norm, int(attn.qk_norm_after_rope), int(attn.rope_interleaved), int(attn.output_gate),
                   int(attn.rope_layer)),
            q_norm=_f32(attn.q_norm.weight if qk_norm else None), k_norm=_f32(attn.k_norm.weight if qk_norm else None),
            q_scale=(float(attn.l2_eps or 0.0), *(map(float, attn.temperature) if attn.temperature else (0.0, 0.0))),
            clip=float(attn.clip_qkv or 0.0), span=(int(attn.window or 0), int(attn.chunk or 0)),
            scale=float(attn.scale),
            sinks=_f32(attn.sinks), o_proj=attn.o_proj.packed.kernel_tuple(), o_bias=_f32(attn.o_proj.bias),
            widths=(attn.qkv.packed.padded_shape[1], 2 * heads * d if attn.output_gate else 0, heads * d,
                    attn.o_proj.packed.padded_shape[1]),
        )

    def args(self, T: int, H: int, cache, rope: RotaryTable) -> tuple[Callable, tuple, tuple]:
        """attention_block, and its arguments after (x, out) before the position and after it, with buffers for T
        rows: h [T, H], qkv_out, qg, att, o_out."""
        from csrc_py.decode_step import attention_block

        scratch = tuple(np.zeros((T, w), np.float32) for w in (H, *self.widths))
        head = (*self.norm, self.qkv, self.qkv_bias, self.dims, self.flags, self.q_norm, self.k_norm, self.q_scale,
                self.clip, _f32(rope.cos), _f32(rope.sin))
        tail = (_cache_array(cache.k), _cache_array(cache.v), self.span, self.scale, self.sinks, self.o_proj,
                self.o_bias, *scratch)
        return attention_block, head, tail


@dataclass
class _MLAPlan(_MixerPlan):
    """MLA's arguments to csrc_py.decode_step.mla_block (the absorbed form) that do not change between steps."""

    norm: tuple  # (weight, (input eps, q_a eps, kv_a eps))
    in_proj: tuple  # packed: q_proj or q_a_proj, then kv_a_proj_with_mqa
    in_bias: np.ndarray
    dims: tuple[int, ...]  # (heads, nope, rope, q_lora_rank or 0, kv_start)
    q_a_norm: np.ndarray
    q_b: tuple  # packed (in_proj again where there is no q-LoRA: never read)
    kv_a_norm: np.ndarray
    interleaved: bool
    # kv_b_proj's weight [heads, nope + v, rank], W_UK rows then W_UV rows (bf16 bits if exact); or, where the run
    # packs dense weights, (k_b, v_b) packed per head (mla.pack_absorbed)
    w_kv: np.ndarray | tuple
    scale: float
    o_proj: tuple
    o_bias: np.ndarray
    widths: tuple[int, ...]  # padded in_proj, q_lora_rank, padded q_b, heads*v, padded o_proj out, rank + rope
    attn: MLA  # DeepSeek Sparse Attention: its Selection carries the attended positions to and from the torch path
    indexer: IndexerPlan | None  # the layer's own lightning indexer

    @classmethod
    def build(cls, layer: DecoderLayer) -> _MLAPlan | None:
        attn = layer.attn
        q_lora = attn.q_b_proj is not None
        if type(attn) is not MLA or not _knows(attn, _MLA_FIELDS) or not isinstance(attn.input_projs, FusedLinear) \
                or not isinstance(attn.o_proj, QuantLinear) or (attn.k_b is None and (
                    attn.kv_b_proj.weight.dtype != torch.float32 or not attn.kv_b_proj.weight.is_contiguous())) or \
                (q_lora and not (isinstance(attn.q_b_proj, QuantLinear) and attn.q_b_proj.bias is None)) or \
                not all(_knows(n, _NORM_FIELDS) for n in (attn.kv_a_norm, attn.q_a_norm) if n is not None):
            return None
        ix = attn.indexer
        indexer = IndexerPlan.build(ix) if ix is not None and _knows(ix, _INDEXER_FIELDS) and \
            _knows(ix.k_norm, _LAYER_NORM_FIELDS) and q_lora else None
        if ix is not None and indexer is None:
            return None
        in_proj = attn.input_projs
        q_b = attn.q_b_proj.packed if q_lora else in_proj.packed
        return cls(
            norm=(_f32(layer.input_norm.weight), (float(layer.input_norm.eps),
                                                  float(attn.q_a_norm.eps if q_lora else 0.0),
                                                  float(attn.kv_a_norm.eps))),
            in_proj=in_proj.packed.kernel_tuple(), in_bias=_f32(in_proj.bias),
            dims=(attn.heads, attn.nope, attn.rope_dim, in_proj.widths[0] if q_lora else 0, in_proj.starts[1]),
            q_a_norm=_f32(attn.q_a_norm.weight if q_lora else None), q_b=q_b.kernel_tuple(),
            kv_a_norm=_f32(attn.kv_a_norm.weight), interleaved=bool(attn.interleaved),
            w_kv=_exact_bf16_or_f32(attn.kv_b_proj.weight).reshape(attn.heads, attn.nope + attn.v_dim, attn.rank)
            if attn.k_b is None else (attn.k_b.packed.kernel_tuple(), attn.v_b.packed.kernel_tuple()),
            scale=float(attn.scale),
            o_proj=attn.o_proj.packed.kernel_tuple(), o_bias=_f32(attn.o_proj.bias),
            widths=(in_proj.packed.padded_shape[1], max(in_proj.widths[0] if q_lora else 0, 1),
                    q_b.padded_shape[1], attn.heads * attn.v_dim, attn.o_proj.packed.padded_shape[1],
                    attn.rank + attn.rope_dim),
            attn=attn, indexer=indexer,
        )

    def run(self, p: _Prepared, x: np.ndarray, out: np.ndarray, start: int) -> None:
        """As the base, with DeepSeek Sparse Attention's positions: an indexer layer's choice is published in its
        Selection (a view of the buffer; None: every causal position), which a shared layer reads (whichever
        path its source layer ran)."""
        *tail, selection = p.attn_tail
        given = self.attn.selection.positions if self.attn.shares_selection else None
        if given is not None:  # the source layer's choice [T, k]
            selection = np.ascontiguousarray(given.numpy())
        width = 0 if given is None else selection.shape[1]
        selected = p.attn_block(x, out, *p.attn_head, start, *tail, selection, width)
        if self.indexer is not None:
            self.attn.selection.positions = torch.from_numpy(selection) if selected else None

    def args(self, T: int, H: int, cache, rope: RotaryTable) -> tuple[Callable, tuple, tuple]:
        """mla_block, and its arguments after (x, out) before the position and after it, with buffers for T rows."""
        from csrc_py.decode_step import mla_block

        scratch = tuple(np.zeros((T, w), np.float32) for w in (H, *self.widths))
        head = (*self.norm, self.in_proj, self.in_bias, self.dims, self.q_a_norm, self.q_b, self.kv_a_norm,
                _f32(rope.cos), _f32(rope.sin), self.interleaved)
        ix = self.indexer
        sparse = (None, np.zeros((0, 1), np.float32), np.zeros((T, 0), np.int64)) if ix is None else \
            (ix.args(T, cache.index_k.shape[0]), cache.index_k.numpy(), np.zeros((T, ix.dims[2]), np.int64))
        tail = (_cache_array(cache.c_kv), _cache_array(cache.k_rope), self.w_kv, self.scale, self.o_proj, self.o_bias,
                *scratch, *sparse)  # ... indexer, index_k, selection buffer: run() passes the selection and its width
        return mla_block, head, tail


@dataclass
class _DeltaNetPlan(_MixerPlan):
    """A Gated DeltaNet layer's arguments to csrc_py.decode_step.deltanet_block that do not change between steps."""

    norm: tuple  # (weight, (input eps, gated norm eps))
    in_proj: tuple  # packed
    cols: np.ndarray  # [conv_dim + Hv*dv + 2*Hv]: GatedDeltaNet.projection_columns
    dims: tuple[int, int, int, int]  # (Hk, Hv, dk, dv)
    conv_w: np.ndarray  # [conv_dim, kernel]
    neg_A: np.ndarray
    dt_bias: np.ndarray
    norm_w: np.ndarray  # the gated norm's [dv]
    out_proj: tuple
    widths: tuple[int, ...]  # padded in_proj, gathered columns, Hv*dv, padded out_proj out

    @classmethod
    def build(cls, layer: DecoderLayer) -> _DeltaNetPlan | None:
        net = layer.attn
        if type(net) is not GatedDeltaNet or not _knows(net, _DELTANET_FIELDS) or \
                not isinstance(net.in_proj, FusedLinear) or net.in_proj.bias is not None or \
                not isinstance(net.out_proj, QuantLinear) or net.out_proj.bias is not None:
            return None
        cols = net.projection_columns(net.in_proj.starts).numpy()
        return cls(
            norm=(_f32(layer.input_norm.weight), (float(layer.input_norm.eps), float(net.eps))),
            in_proj=net.in_proj.packed.kernel_tuple(), cols=cols, dims=(net.k_heads, net.v_heads, net.k_dim, net.v_dim),
            conv_w=_f32(net.conv_weight.reshape(net.conv_dim, net.conv_kernel)), neg_A=_f32(net.neg_A),
            dt_bias=_f32(net.dt_bias), norm_w=_f32(net.norm_weight), out_proj=net.out_proj.packed.kernel_tuple(),
            widths=(net.in_proj.packed.padded_shape[1], cols.size, net.v_heads * net.v_dim,
                    net.out_proj.packed.padded_shape[1]),
        )

    def run(self, p: _Prepared, x: np.ndarray, out: np.ndarray, start: int) -> None:
        """As GatedDeltaNet.forward: the state's position rules (a step at 0 starts afresh), the tokens folded in,
        and the state then stands after them."""
        p.cache.begin(start)
        p.attn_block(x, out, *p.attn_head)
        p.cache.position = start + x.shape[0]

    def args(self, T: int, H: int, cache, rope: RotaryTable) -> tuple[Callable, tuple, tuple]:
        """deltanet_block, and its arguments after (x, out), with buffers for T rows (no position: the state
        stands where the tokens go)."""
        from csrc_py.decode_step import deltanet_block

        Hv, dv = self.dims[1], self.dims[3]
        h, proj_out, mixed, core, o_out = (np.zeros((T, w), np.float32) for w in (H, *self.widths))
        args = (*self.norm, self.in_proj, self.cols, self.dims, self.conv_w, cache.conv.numpy(), self.neg_A,
                self.dt_bias, cache.state.numpy(), self.norm_w, L2_EPS, self.out_proj, h, proj_out, mixed,
                np.zeros((Hv, dv), np.float32), core, o_out)
        return deltanet_block, args, ()


@dataclass
class _MoEPlan:
    """MoE's arguments to csrc_py.decode_step.moe_block that do not change between steps."""

    moe: MoE
    norm: tuple
    router: np.ndarray  # [E, H], bf16 bits where exact
    router_bias: np.ndarray
    correction_bias: np.ndarray
    routing: tuple[int, ...]  # _routing_codes, then whether the routing weights scale the experts' inputs
    weighting: tuple[float, float]  # (routed_scaling_factor, norm_min)
    heat: np.ndarray
    experts: tuple  # (gate, up, down) packed
    expert_biases: tuple  # (gate, up, down) [E, width] float32, or [0, 0] each
    expert_act: np.ndarray  # [kind, alpha, limit]
    shared: _SwiGLUArgs
    shared_gate: np.ndarray

    @classmethod
    def build(cls, layer: DecoderLayer) -> _MoEPlan | None:
        cpu = sys.modules.get("offload.experts.cpu")  # not loaded: no CPU-kernel experts (and no Numba) here
        moe = layer.mlp
        cfg = moe.router_cfg
        if cpu is None or type(moe.experts) is not cpu.CpuExperts or not _knows(moe, _MOE_FIELDS) or \
                set(vars(cfg)) != _ROUTER_FIELDS or cfg.scoring not in ("softmax", "sigmoid") or \
                cfg.topk_method not in _TOPK_METHODS:
            return None
        shared = _SwiGLUArgs.absent(moe.experts.fmt) if moe.shared is None else _SwiGLUArgs.of(moe.shared)
        if shared is None:
            return None
        gate_w = moe.shared_gate
        if gate_w is not None and (gate_w.bias is not None or not isinstance(gate_w.weight, torch.Tensor)):
            return None
        kernel = moe.experts.kernel_arguments
        return cls(
            moe=moe, norm=(_f32(layer.post_attn_norm.weight), float(layer.post_attn_norm.eps)),
            router=_exact_bf16_or_f32(moe.router), router_bias=_f32(moe.router_bias),
            correction_bias=_f32(moe.correction_bias),
            routing=(*_routing_codes(cfg), int(moe.scales_input)),
            weighting=(float(cfg.routed_scaling_factor), float(cfg.norm_min)),
            heat=moe.heat.numpy(),
            experts=(kernel.gate, kernel.up, kernel.down), expert_biases=kernel.biases, expert_act=kernel.act,
            shared=shared, shared_gate=_f32(gate_w.weight.reshape(-1) if gate_w is not None else None),
        )

    def takes(self, tokens: int) -> bool:
        """Whether the fused kernel is the engine the torch path would also pick (csrc_py.dispatch.moe: experts
        with biases or another activation always take it; plain experts up to the crossover measured on this host)."""
        return self.moe.experts.fused_engine(tokens * self.moe.router_cfg.top_k, torch.float32)

    def args(self, T: int, H: int) -> tuple:
        """moe_block's arguments after x, with buffers for T rows: the input-scaled experts' pairs (T*K rows, or
        none), then h [T, H], logits [T, E], ids / weights [T, K], routed [T, H], then the shared expert's."""
        E, K = self.moe.router_cfg.num_experts, self.moe.router_cfg.top_k
        P = T * K if self.moe.scales_input else 0
        pairs = (np.zeros((P, H), np.float32), np.zeros((P, 1), np.int64), np.zeros((P, 1), np.float32),
                 np.zeros((P, H), np.float32))
        scratch = (np.zeros((T, H), np.float32), np.zeros((T, E), np.float32), np.zeros((T, K), np.int64),
                   np.zeros((T, K), np.float32), np.zeros((T, H), np.float32), *self.shared.scratch(T))
        return (*self.norm, self.router, self.router_bias, self.correction_bias, self.routing, self.weighting,
                self.heat, *self.experts, self.expert_biases, self.expert_act, pairs, self.shared.weights,
                self.shared.dims, self.shared_gate, *scratch)


@dataclass
class _MLPPlan:
    """A dense SwiGLU layer's arguments to csrc_py.decode_step.mlp_block."""

    norm: tuple
    swiglu: _SwiGLUArgs

    @classmethod
    def build(cls, layer: DecoderLayer) -> _MLPPlan | None:
        swiglu = _SwiGLUArgs.of(layer.mlp)
        if swiglu is None:
            return None
        return cls((_f32(layer.post_attn_norm.weight), float(layer.post_attn_norm.eps)), swiglu)

    def args(self, T: int, H: int) -> tuple:
        """mlp_block's arguments after x, with buffers for T rows."""
        s = self.swiglu
        return (*self.norm, s.weights, s.dims, np.zeros((T, H), np.float32), *s.scratch(T))


@dataclass
class _Prepared:
    """What a CompiledLayer passes for T tokens besides x, out and the position: views of the layer's cache and
    the rotary table it was prepared for, and buffers for T rows."""

    cache: object
    rope: object
    attn_block: object  # csrc_py.decode_step.attention_block, mla_block or deltanet_block
    attn_head: tuple  # its arguments after (x, out), before start (deltanet_block: all of them)
    attn_tail: tuple  # ... after start
    mlp_block: object  # csrc_py.decode_step.moe_block or mlp_block (None: torch)
    mlp: tuple  # its arguments after x


class CompiledLayer:
    """One decoder layer's compiled step: attention (or None: torch) and MLP (or None: torch) blocks."""

    def __init__(self, layer: DecoderLayer, attn: _MixerPlan | None, mlp: _MoEPlan | _MLPPlan | None):
        self.layer, self.attn, self.mlp = layer, attn, mlp
        self.moe = isinstance(mlp, _MoEPlan)  # the timers' "experts" section holds a MoE block
        self._prepared: dict[int, _Prepared] = {}  # tokens -> arguments
        self._takes: dict[int, bool] = {}  # tokens -> whether the compiled step runs them

    @classmethod
    def build(cls, layer: DecoderLayer) -> CompiledLayer | None:
        if not _knows(layer, _LAYER_FIELDS) or not all(_knows(n, _NORM_FIELDS) for n in (layer.input_norm,
                                                                                        layer.post_attn_norm)):
            return None
        mixer = {MLA: _MLAPlan, GatedDeltaNet: _DeltaNetPlan}.get(type(layer.attn), _AttentionPlan)
        attn = mixer.build(layer)
        if isinstance(layer.mlp, MoE):
            mlp = _MoEPlan.build(layer)
        elif isinstance(layer.mlp, SwiGLU):
            mlp = _MLPPlan.build(layer)
        else:
            mlp = None
        return cls(layer, attn, mlp) if attn is not None or mlp is not None else None

    @property
    def whole(self) -> bool:
        """Whether both blocks are compiled: the layer then runs with no torch op (what a CompiledStack takes)."""
        return self.attn is not None and self.mlp is not None

    def takes(self, tokens: int) -> bool:
        takes = self._takes.get(tokens)
        if takes is None:
            takes = self._takes[tokens] = not isinstance(self.mlp, _MoEPlan) or self.mlp.takes(tokens)
        return takes

    def prepared(self, T: int, H: int, cache, rope: RotaryTable) -> _Prepared:
        """The arguments for T tokens, made at the first step of that size (and again for another cache)."""
        p = self._prepared.get(T)
        if p is not None and p.cache is cache and p.rope is rope:
            return p
        from csrc_py.decode_step import mlp_block, moe_block

        block, head, tail = self.attn.args(T, H, cache, rope) if self.attn is not None else (None, (), ())
        mlp = self.mlp.args(T, H) if self.mlp is not None else ()
        mlp_fn = None if self.mlp is None else moe_block if self.moe else mlp_block
        p = self._prepared[T] = _Prepared(cache, rope, block, head, tail, mlp_fn, mlp)
        return p

    def run(self, p: _Prepared, x: np.ndarray, out: np.ndarray, start: int) -> None:
        """out = the layer's output for x [T, H] at positions start.. (float32 arrays, not the same one), both
        blocks compiled (`whole`): two Numba calls and the timers, nothing else."""
        timers = self.layer.timers
        t0 = time.perf_counter()
        self.attn.run(p, x, out, start)
        t1 = time.perf_counter()
        timers.add("attention", t1 - t0)
        p.mlp_block(out, *p.mlp)
        if self.moe:
            timers.add("experts", time.perf_counter() - t1)

    def __call__(self, x: torch.Tensor, start: int, cache, rope: RotaryTable) -> torch.Tensor:
        """The layer's output for x [T, H] at positions start.. (a new tensor; x is left as it was)."""
        layer = self.layer
        T, H = x.shape
        p = self.prepared(T, H, cache, rope)
        on = np.empty((T, H), np.float32)
        out = torch.from_numpy(on)
        if self.whole:
            self.run(p, x.detach().contiguous().numpy(), on, start)
            return out
        t0 = time.perf_counter()
        if self.attn is not None:
            self.attn.run(p, x.detach().contiguous().numpy(), on, start)
        else:
            out.copy_(x + layer.attn(layer.input_norm(x), start, cache, rope))
        t1 = time.perf_counter()
        layer.timers.add("attention", t1 - t0)
        if self.mlp is not None:
            p.mlp_block(on, *p.mlp)
            if self.moe:
                layer.timers.add("experts", time.perf_counter() - t1)
        else:
            out = out + layer.mlp(layer.post_attn_norm(out))
        return out


def _compiled(layer: DecoderLayer) -> CompiledLayer | None:
    """The layer's CompiledLayer (built at the first ask), or None."""
    compiled = layer.__dict__.get("_compiled_step", _NOT_BUILT)
    if compiled is _NOT_BUILT:
        compiled = CompiledLayer.build(layer)
        layer.__dict__["_compiled_step"] = compiled
    return compiled


def _applies(x: torch.Tensor) -> bool:
    """Whether hidden states x [T, H] are a compiled step's: on the CPU, float32, a few rows, the step enabled."""
    return _enabled and x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] <= MAX_TOKENS


class CompiledStack:
    """Every decoder layer of a model as one loop over the compiled layers: per layer two Numba calls on numpy
    buffers (two, used in turn, allocated once per token count), no torch op, no module call. Built where every
    layer is `whole`; a layer that declines a token count (`takes`) sends that step back to the per-layer path."""

    def __init__(self, layers: list[CompiledLayer]):
        self.layers = layers
        self._buffers: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # tokens -> the two [T, H] buffers
        self._takes: dict[int, bool] = {}

    @classmethod
    def of(cls, transformer) -> CompiledStack | None:
        stack = transformer.__dict__.get("_compiled_stack", _NOT_BUILT)
        if stack is _NOT_BUILT:
            layers = [_compiled(layer) for layer in transformer.layers]
            stack = cls(layers) if layers and all(c is not None and c.whole for c in layers) else None
            transformer.__dict__["_compiled_stack"] = stack
        return stack

    def takes(self, tokens: int) -> bool:
        takes = self._takes.get(tokens)
        if takes is None:
            takes = self._takes[tokens] = all(c.takes(tokens) for c in self.layers)
        return takes

    def __call__(self, x: torch.Tensor, start: int, caches: list, rope: RotaryTable) -> torch.Tensor:
        """The last layer's output for x [T, H] at positions start.. . It is one of the stack's buffers, which the
        next call overwrites: read it (the final norm does) before the next step."""
        return torch.from_numpy(self.run(x.detach().contiguous().numpy(), start, caches, rope))

    def run(self, x: np.ndarray, start: int, caches: list, rope: RotaryTable) -> np.ndarray:
        """As __call__ on float32 arrays: x [T, H] is only read (it may be a view of the embedding table)."""
        T, H = x.shape
        buffers = self._buffers.get(T)
        if buffers is None:
            buffers = self._buffers[T] = (np.empty((T, H), np.float32), np.empty((T, H), np.float32))
        a, out = x, buffers[0]
        for layer, cache in zip(self.layers, caches):
            p = layer.prepared(T, H, cache, rope)
            layer.run(p, a, out, start)
            a, out = out, (buffers[1] if out is buffers[0] else buffers[0])
        return a


def for_stack(transformer, x: torch.Tensor) -> CompiledStack | None:
    """The compiled form of all of `transformer`'s decoder layers for hidden states x [T, H], or None where any
    layer runs (wholly or in part) on the torch path."""
    if not _applies(x):
        return None
    stack = CompiledStack.of(transformer)
    return stack if stack is not None and stack.takes(x.shape[0]) else None


class CompiledHead:
    """The final RMSNorm and a packed LM head as one Numba call (csrc_py.decode_step.head_block) on the last
    rows of a step: the torch path's norm, linear and bias within float32 rounding, and the same engine
    (csrc_py.dispatch.linear's crossover decides, per row count)."""

    def __init__(self, norm: tuple, lm_head, bias: np.ndarray):
        self.norm, self.lm_head, self.bias = norm, lm_head, bias
        self.packed = lm_head.kernel_tuple()
        self._takes: dict[int, bool] = {}
        self._scratch: dict[int, np.ndarray] = {}  # tokens -> h [T, H]

    @classmethod
    def of(cls, transformer) -> CompiledHead | None:
        head = transformer.__dict__.get("_compiled_head", _NOT_BUILT)
        if head is _NOT_BUILT:
            norm, lm_head = transformer.norm, transformer.lm_head
            head = None
            if _knows(norm, _NORM_FIELDS) and type(lm_head) is QuantLinear and \
                    _knows(lm_head, {"packed", "bias"}) and lm_head.packed.shape[0] == 1:
                head = cls((_f32(norm.weight), float(norm.eps)), lm_head.packed, _f32(lm_head.bias))
            transformer.__dict__["_compiled_head"] = head
        return head

    def takes(self, tokens: int) -> bool:
        takes = self._takes.get(tokens)
        if takes is None:
            from csrc_py.dispatch import linear_uses_torch

            takes = self._takes[tokens] = not linear_uses_torch(self.lm_head, tokens)
        return takes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """logits [T, V] float32 (a new tensor) for the last layer's output x [T, H]."""
        return torch.from_numpy(self.run(x.detach().contiguous().numpy()))

    def run(self, x: np.ndarray) -> np.ndarray:
        """As __call__ on float32 arrays: logits [T, V], a view of a new array's rows (padded to whole panels)."""
        from csrc_py.decode_step import head_block

        T, H = x.shape
        h = self._scratch.get(T)
        if h is None:
            h = self._scratch[T] = np.empty((T, H), np.float32)
        logits = np.empty((T, self.lm_head.padded_shape[1]), np.float32)
        head_block(x, *self.norm, self.packed, self.bias, h, logits)
        return logits[:, :self.lm_head.shape[1]]


def for_head(transformer, x: torch.Tensor) -> CompiledHead | None:
    """The compiled final norm and LM head for x [T, H], or None where the torch modules run them."""
    if not _applies(x):
        return None
    head = CompiledHead.of(transformer)
    return head if head is not None and head.takes(x.shape[0]) else None


class CompiledToken:
    """One decode token on the CPU, all compiled: the embedding row (a view of the float32 table), the stack, the
    final norm and LM head, on numpy arrays. What a generation calls per token where `for_token` offers it: the
    same Numba calls as forward's compiled path, without its torch ops and module calls around them."""

    def __init__(self, embed: np.ndarray, stack: CompiledStack, head: CompiledHead, timers):
        self.embed, self.stack, self.head, self.timers = embed, stack, head, timers

    def __call__(self, token: int, start: int, caches: list, rope: RotaryTable) -> np.ndarray:
        """logits [V] float32 (a new array's row) of `token` at position `start`, the caches written."""
        if not 0 <= token < self.embed.shape[0]:  # a slice past the table would be empty, not an error
            raise IndexError(f"token id {token} is outside the embedding table's {self.embed.shape[0]} rows")
        x = self.stack.run(self.embed[token : token + 1], start, caches, rope)  # [1, H]
        t0 = time.perf_counter()
        logits = self.head.run(x)[0]
        self.timers.add("lm_head", time.perf_counter() - t0)
        return logits


def for_token(transformer) -> CompiledToken | None:
    """The compiled form of a whole one-token decode step at a host position, or None where it runs as forward
    does (the step disabled, a device, positions on the device, a float32-less embedding, a torch layer or head)."""
    if not _enabled:
        return None
    step = transformer.__dict__.get("_compiled_token", _NOT_BUILT)
    if step is _NOT_BUILT:
        step, embed = None, transformer.embed
        if transformer.step_positions is None and embed.device.type == "cpu" and embed.dtype == torch.float32:
            stack, head = CompiledStack.of(transformer), CompiledHead.of(transformer)
            if stack is not None and head is not None and stack.takes(1) and head.takes(1):
                step = CompiledToken(embed.detach().numpy(), stack, head, transformer.timers)
        transformer.__dict__["_compiled_token"] = step
    return step

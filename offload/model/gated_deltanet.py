"""Gated DeltaNet: the linear-attention layers of Qwen3-Next and Qwen3.5, over a fixed-size RecurrentState.

One layer: x -> q, k, v (one short causal depthwise convolution + SiLU over the three), z (output gate), b, a
-> per value head the gated delta rule on a [d_k, d_v] matrix state S:

    S <- exp(g_t) S                          g_t = -exp(A_log) * softplus(a_t + dt_bias)   (decay, <= 0)
    S <- S + k_t (beta_t (v_t - S^T k_t))^T  beta_t = sigmoid(b_t)                         (delta rule)
    o_t = S^T q_t                            q, k L2-normalised, q scaled by d_k^-1/2

-> RMSNorm(o) * silu(z) per head -> out_proj. Decode folds one token in (`recurrent_gated_delta_rule`); a prefill
runs the same recurrence over chunks of 64 (`chunked_gated_delta_rule`: within a chunk the delta-rule updates are
solved as one triangular system, so the work is matrix products, not T sequential steps), as transformers' torch
fallback and flash-linear-attention do. On CUDA, flash-linear-attention's kernels are used when it is installed;
the torch forms are the oracle and the CPU path.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..weights.source import WeightSource
from .kv_cache import RecurrentState
from .layers import group_linears, load_linear
from .positions import Positions
from .rope import RotaryTable

CHUNK = 64  # positions per chunk of the prefill form
L2_EPS = 1e-6  # q/k L2 normalisation's epsilon


def l2norm(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    """x / |x| over the last dim, as flash-linear-attention and transformers compute it."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def recurrent_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token. q, k [H, T, dk] (normalised, q scaled), v [H, T, dv], g, beta [H, T], state [H, dk, dv], all
    fp32 -> (out [H, T, dv], final state). `state` is updated in place (decode allocates no [H, dk, dv] tensor:
    at real sizes each fresh one is megabytes the CPU page-faults in)."""
    out = torch.empty_like(v)
    for t in range(q.shape[1]):
        state.mul_(g[:, t].exp()[:, None, None])
        remembered = torch.bmm(k[:, t, None, :], state)  # [H, 1, dv]: what S already predicts for k_t
        delta = (v[:, t, None, :] - remembered) * beta[:, t, None, None]
        state.baddbmm_(k[:, t, :, None], delta)  # S += k_t delta^T
        out[:, t] = torch.bmm(q[:, t, None, :], state)[:, 0]
    return out, state


def chunked_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                             beta: torch.Tensor, state: torch.Tensor, chunk: int = CHUNK
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same recurrence over chunks of `chunk` positions (shapes as recurrent_gated_delta_rule): within a chunk,
    the updates are the WY form (I + tril(beta K K^T, -1))^-1 solved once; across chunks, the state is carried."""
    H, T, dv = v.shape
    pad = (-T) % chunk  # padded positions have k = 0, beta = 0, g = 0: they change nothing
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (T + pad) // chunk
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    q, k, k_beta, v_beta = (x.reshape(H, n, chunk, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    decay = g.reshape(H, n, chunk).cumsum(-1)  # log of the decay from the chunk's start to each position
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    pair_decay = (decay[..., :, None] - decay[..., None, :]).masked_fill(upper, float("-inf")).exp()  # [H,n,C,C]
    system = (k_beta @ k.transpose(-1, -2)) * pair_decay
    intra = (q @ k.transpose(-1, -2)) * pair_decay  # within-chunk attention
    new_values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    k_cumdecay = torch.linalg.solve_triangular(system, k_beta * decay.exp()[..., None], upper=False,
                                               unitriangular=True)
    q = q * decay.exp()[..., None]
    k = k * (decay[..., -1:] - decay).exp()[..., None]
    chunk_decay = decay[..., -1].exp()[..., None, None]  # [H, n, 1, 1]
    out = torch.empty_like(new_values)  # [H, n, C, dv]
    for i in range(n):
        v_new = new_values[:, i] - k_cumdecay[:, i] @ state  # the part the state does not already predict
        out[:, i] = q[:, i] @ state + intra[:, i] @ v_new
        state = state * chunk_decay[:, i] + k[:, i].transpose(-1, -2) @ v_new
    return out.reshape(H, n * chunk, dv)[:, :T], state


@functools.cache
def fla_kernels():
    """flash-linear-attention's (chunked, recurrent) gated delta rule kernels, or None when it is not installed."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except ImportError:
        return None
    return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [T, Hk, dk], v [T, Hv, dv], g, beta [T, Hv], state [Hv, dk, dv] fp32 -> (out [T, Hv, dv] in v's dtype,
    new state; one token updates `state` in place). Each key head serves Hv/Hk consecutive value heads; q and k are
    L2-normalised here."""
    T, dtype = q.shape[0], v.dtype
    group = v.shape[1] // k.shape[1]
    q, k = q.repeat_interleave(group, dim=1), k.repeat_interleave(group, dim=1)
    kernels = fla_kernels() if q.device.type == "cuda" else None
    if kernels is not None:
        chunk, recurrent = kernels
        out, state = (recurrent if T == 1 else chunk)(
            q[None], k[None], v[None], g[None].float(), beta[None].float(), initial_state=state[None],
            output_final_state=True, use_qk_l2norm_in_kernel=True)
        return out[0].to(dtype), state[0].float()
    q, k, v, g, beta = (x.transpose(0, 1).float().contiguous() for x in (q, k, v, g, beta))  # heads first
    q, k = l2norm(q), l2norm(k)
    q = q * q.shape[-1] ** -0.5
    rule = recurrent_gated_delta_rule if T == 1 else chunked_gated_delta_rule
    out, state = rule(q, k, v, g, beta, state)
    return out.transpose(0, 1).to(dtype), state


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) * weight * silu(gate) over the last dim (normalise, then gate), in fp32 as the reference does."""
    x32 = x.float()
    normed = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed * F.silu(gate.float())).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """One Gated DeltaNet layer (`model.layers.{i}.linear_attn`), the token mixer of a `linear_attention` layer."""

    def __init__(self, cfg: ModelConfig, layer: int, src: WeightSource):
        super().__init__()
        la, p, H = cfg.linear_attention, f"model.layers.{layer}.linear_attn", cfg.hidden_size
        self.k_heads, self.v_heads, self.k_dim, self.v_dim = (la.num_key_heads, la.num_value_heads, la.key_head_dim,
                                                              la.value_head_dim)
        self.conv_kernel, self.conv_dim, self.projections = la.conv_kernel, la.conv_dim, la.projections
        key_width, value_width = self.k_heads * self.k_dim, self.v_heads * self.v_dim
        if la.projections == "qkvz_ba":
            widths = (("in_proj_qkvz", 2 * key_width + 2 * value_width), ("in_proj_ba", 2 * self.v_heads))
        else:
            widths = (("in_proj_qkv", 2 * key_width + value_width), ("in_proj_z", value_width),
                      ("in_proj_b", self.v_heads), ("in_proj_a", self.v_heads))
        self.in_proj = group_linears([load_linear(src, f"{p}.{name}", width, H) for name, width in widths])
        self.conv_weight = src.take(f"{p}.conv1d.weight", (self.conv_dim, 1, self.conv_kernel))  # depthwise
        self.neg_A = -src.take(f"{p}.A_log", (self.v_heads,), dtype=torch.float32).exp()  # [Hv]
        self.dt_bias = src.take(f"{p}.dt_bias", (self.v_heads,), dtype=torch.float32)
        self.norm_weight = src.take(f"{p}.norm.weight", (self.v_dim,))
        self.eps = cfg.rms_norm_eps
        self.out_proj = load_linear(src, f"{p}.out_proj", H, value_width)

    def new_cache(self, max_context: int, dtype: torch.dtype, device: torch.device,
                  kv_dtype: torch.dtype | None = None) -> RecurrentState:
        """A fixed-size state in the model dtype (and fp32): kv_dtype is for the caches that grow with the context."""
        return RecurrentState(self.conv_dim, self.conv_kernel, self.v_heads, self.k_dim, self.v_dim, dtype, device)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [T, H] -> q|k|v [T, conv_dim] (the convolution's channel order), z [T, Hv, dv], b, a [T, Hv]."""
        T = x.shape[0]
        if self.projections == "qkvz_ba":  # grouped per key head: [q, k, v of its value heads, z of them]
            qkvz, ba = self.in_proj(x)
            r = self.v_heads // self.k_heads
            q, k, v, z = qkvz.reshape(T, self.k_heads, -1).split([self.k_dim, self.k_dim, r * self.v_dim,
                                                                   r * self.v_dim], dim=-1)
            b, a = ba.reshape(T, self.k_heads, 2 * r).split([r, r], dim=-1)
            qkv = torch.cat((q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)), dim=-1)
            return qkv, z.reshape(T, self.v_heads, self.v_dim), b.reshape(T, -1), a.reshape(T, -1)
        qkv, z, b, a = self.in_proj(x)
        return qkv, z.reshape(T, self.v_heads, self.v_dim), b, a

    def projection_columns(self, starts: list[int]) -> torch.Tensor:
        """Where `project` takes each of its outputs from the projections' outputs laid side by side (part i from
        column starts[i]): the columns of q|k|v (the convolution's channel order), z (head after head), b, a,
        as one int64 index [conv_dim + Hv*dv + 2*Hv]. The compiled decode step gathers with it."""
        Hk, Hv, dk, dv = self.k_heads, self.v_heads, self.k_dim, self.v_dim
        if self.projections != "qkvz_ba":  # four projections, each head after head
            return torch.cat([start + torch.arange(width) for start, width in
                              zip(starts, (self.conv_dim, Hv * dv, Hv, Hv))])
        r = Hv // Hk  # per key head: q [dk], k [dk], v [r*dv], z [r*dv] | b [r], a [r]
        per_head = torch.arange(Hk)[:, None]
        qkvz = starts[0] + per_head * (2 * dk + 2 * r * dv)
        ba = starts[1] + per_head * 2 * r
        parts = [(qkvz, 0, dk), (qkvz, dk, dk), (qkvz, 2 * dk, r * dv), (qkvz, 2 * dk + r * dv, r * dv),
                 (ba, 0, r), (ba, r, r)]  # q, k, v, z, b, a: (head bases, offset within the head, width)
        return torch.cat([(base + offset + torch.arange(width)).reshape(-1) for base, offset, width in parts])

    def conv(self, qkv: torch.Tensor, cache: RecurrentState) -> torch.Tensor:
        """Causal depthwise convolution + SiLU of qkv [T, C], continuing from (and updating) the cached window.
        As multiply-and-sum over each position's window: torch's depthwise conv1d costs ~100x more at decode."""
        window = torch.cat((cache.conv, qkv.transpose(0, 1).to(cache.conv.dtype)), dim=1)  # [C, kernel-1+T]
        cache.conv.copy_(window[:, window.shape[1] - cache.conv.shape[1]:])
        taps = window.unfold(1, self.conv_kernel, 1)  # [C, T, kernel]
        out = (taps * self.conv_weight).sum(-1)  # weight [C, 1, kernel] -> [C, T]
        return F.silu(out).transpose(0, 1).to(qkv.dtype)

    def forward(self, x: torch.Tensor, start: int | Positions, cache: RecurrentState, rope: RotaryTable | None = None
                ) -> torch.Tensor:
        T = x.shape[0]
        cache.begin(start)
        qkv, z, b, a = self.project(x)
        q, k, v = self.conv(qkv, cache).split([self.k_heads * self.k_dim] * 2 + [self.v_heads * self.v_dim], dim=-1)
        g = self.neg_A * F.softplus(a.float() + self.dt_bias)  # [T, Hv], log decay
        out, state = gated_delta_rule(q.reshape(T, self.k_heads, self.k_dim), k.reshape(T, self.k_heads, self.k_dim),
                                      v.reshape(T, self.v_heads, self.v_dim), g, b.sigmoid(), cache.state)
        if state is not cache.state:
            cache.state.copy_(state)
        cache.position += T  # begin() has put it at start
        out = gated_rms_norm(out, z, self.norm_weight, self.eps)  # [T, Hv, dv]
        return self.out_proj(out.reshape(T, self.v_heads * self.v_dim))

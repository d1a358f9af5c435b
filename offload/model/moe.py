"""The MoE block: router -> top-k -> experts contract (+ shared expert, optionally sigmoid-gated). Llama-4's
variant scales each chosen expert's input by its routing weight instead of its output."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import CheckpointNames
from ..config import ModelConfig
from ..timers import Timers
from ..experts.base import ExpertWeights, Experts, PackedExperts, start_experts
from ..weights.source import WeightSource
from .layers import SwiGLU, load_linear
from .routing import route

ExpertsFactory = Callable[[int, "ExpertWeights | PackedExperts"], Experts]  # (layer index, weights) -> backend


def load_expert_weights(cfg: ModelConfig, layer: int, names: CheckpointNames, src: WeightSource
                        ) -> ExpertWeights | PackedExperts:
    """One layer's routed experts: gate/up [E, I, H], down [E, H, I] (packed as they are in a store), with their
    biases and activation."""
    H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.router.num_experts
    prefix = f"model.layers.{layer}.{names.moe}.experts"
    if names.fused_experts is not None:
        weights = src.fused_expert_weights(prefix, names.fused_experts, E, I, H, cfg.expert_bias)
    else:
        weights = src.expert_weights(prefix, names.expert_proj, E, I, H)
    return replace(weights, activation=cfg.expert_activation)


def load_correction_bias(src: WeightSource, name: str, names: CheckpointNames, E: int) -> torch.Tensor:
    """The router's selection bias [E] in fp32, however many leading rows of one the checkpoint stores it with."""
    if names.correction_bias_rows is None:
        return src.take(name, (E,), dtype=torch.float32)
    return src.take(name, (names.correction_bias_rows, E), dtype=torch.float32).reshape(E)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, names: CheckpointNames, src: WeightSource,
                 make_experts: ExpertsFactory, timers: Timers):
        super().__init__()
        self.timers = timers
        p = f"model.layers.{layer}.{names.moe}"
        H, E = cfg.hidden_size, cfg.router.num_experts
        self.router_cfg = cfg.router_of(layer)
        # Routers run in fp32 whatever the model dtype: top-k choices must not flip with precision.
        self.router = src.take(f"{p}.{names.router}.weight", (E, H), dtype=torch.float32)  # [E, H]
        self.router_bias = src.take(f"{p}.{names.router}.bias", (E,), dtype=torch.float32) if cfg.router_bias else None
        self.correction_bias = load_correction_bias(src, f"{p}.{names.correction_bias}", names, E) \
            if cfg.router.has_correction_bias else None
        self.experts = make_experts(layer, load_expert_weights(cfg, layer, names, src))
        self.shared = (
            SwiGLU.load(src, f"{p}.{names.shared}", H, cfg.shared_intermediate_size, bias=cfg.mlp_bias)
            if cfg.shared_intermediate_size else None
        )
        self.shared_gate = (load_linear(src, f"{p}.shared_expert_gate", 1, H, quantize=False)
                            if cfg.shared_expert_gate else None)
        self.scales_input = cfg.router_scales_input
        self.heat = torch.zeros(E, dtype=torch.long, device=src.device)  # routing counts per expert, for profiles

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [T, H] -> (topk_ids [T, K], topk_weights [T, K])."""
        return route(F.linear(h.float(), self.router, self.router_bias), self.router_cfg, self.correction_bias)

    def routed_input_scaled(self, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_k expert_k(w_k * h) (Llama-4) through the experts contract sum_k w_k * expert_k(x): one call per
        routed slot k, on that slot's scaled input, with weight 1 (a single call for top-1)."""
        ones = torch.ones_like(weights[:, :1])  # [T, 1]
        y = None
        for k in range(ids.shape[1]):
            scaled = h * weights[:, k:k + 1].to(h.dtype)  # [T, H]
            out = self.experts(scaled, ids[:, k:k + 1], ones)
            y = out if y is None else y + out
        return y

    def forward(self, h: torch.Tensor, routed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """h [T, H] -> [T, H]; `routed`: the router's (ids, weights) for h when they were computed with the
        attention block (a replayed graph), else the router runs here."""
        with self.timers.section("router"):
            ids, weights = self.route(h) if routed is None else routed
            flat = ids.reshape(-1)
            self.heat.index_add_(0, flat, torch.ones_like(flat))  # fixed shapes: no host read (bincount has one)
        # The routed experts start first (a hybrid backend's CPU part then runs on the CPU workers while the
        # shared expert is computed) and are joined after. Hybrid backends split "experts" into device, CPU and
        # copy time.
        with self.timers.section("experts"):
            if self.scales_input:
                y = self.routed_input_scaled(h, ids, weights)
            else:
                finish = start_experts(self.experts, h, ids, weights)
        shared = None
        if self.shared is not None:
            with self.timers.section("shared_experts"):
                shared = self.shared(h)
                if self.shared_gate is not None:
                    shared = torch.sigmoid(self.shared_gate(h)) * shared
        if not self.scales_input:
            with self.timers.section("experts"):
                y = finish()
        return y if shared is None else y + shared

"""Placement: budgets, the model's inventory by weight group, and the planner that turns them into a Plan."""
from __future__ import annotations

from pathlib import Path

import torch

from ..arch import CheckpointNames
from ..config import ModelConfig
from ..experts.device import STAGING_RING_ENTRIES
from ..experts.link import HostLink
from .budget import detect_budgets
from .inventory import inventory, kv_cache_bytes
from .planner import AUTO_DENSE, AUTO_SLOTS, Plan, PlanError, PlanRequest, make_plan


def expert_host_bytes(cfg: ModelConfig, fmt: str) -> int:
    """One routed expert as the host holds it in format `fmt` and an upload copies it: gate, up and down, padding
    included, and the biases of experts that have them (gpt-oss), kept in float32 beside packed matrices and in
    the float format itself beside float ones (experts/cpu.py, experts/torch_host.py)."""
    from ..experts.torch_host import FLOAT_FORMATS

    H, I = cfg.hidden_size, cfg.moe_intermediate_size
    bias_params = 2 * I + H if cfg.expert_bias else 0
    if fmt in FLOAT_FORMATS:
        return (3 * H * I + bias_params) * FLOAT_FORMATS[fmt].itemsize
    from csrc_py.formats import empty

    return 2 * empty(fmt, 1, I, H).nbytes + empty(fmt, 1, H, I).nbytes + bias_params * 4


def has_device_tier(device: torch.device, gpu_memory: int | str | None, plan: Plan | str | Path | None) -> bool:
    """Whether a load places the model on a device tier (a GPU, a simulated budget or a given plan) rather than
    running it on the CPU alone."""
    return device.type == "cuda" or gpu_memory is not None or plan is not None


def dense_candidates(dense: str | None) -> tuple[str | None, ...]:
    """The device tier's dense formats the planner may choose from: any (model dtype first) when none is asked
    for; "bf16" asks for the model dtype."""
    if dense is None:
        return AUTO_DENSE
    return (None,) if dense == "bf16" else (dense,)


def slot_candidates(slots: str | None, host_format: str | None = None) -> tuple[str | None, ...]:
    """The pool rows' formats the planner may choose from when none is asked for: the model dtype, then the host's
    own int4 / int4s (the same values on either tier, uploads without dequantization) or else int8 then int4.
    "bf16" asks for the model dtype."""
    if slots is None:
        return (None, host_format) if host_format in ("int4", "int4s") else AUTO_SLOTS
    return (None,) if slots == "bf16" else (slots,)


def resolve_plan(cfg: ModelConfig, names: CheckpointNames, device: torch.device, dtype: torch.dtype,
                 host_format: str, max_context: int, gpu_memory: int | str | None, plan: Plan | str | Path | None,
                 heat=None, host_memory: int | str | None = None, dense: str | None = None,
                 slots: str | None = None, kv_dtype: torch.dtype | None = None) -> Plan | None:
    """The plan to load with: the one given (checked against the model and `dense`), or one made from the budgets
    when a GPU is used or a device budget is simulated; None when everything runs on the CPU alone.
    dense: the device tier's dense format ("bf16" | "int8" | "int4"); None lets the planner choose.
    slots: the format of pinned experts and cache slots ("bf16" | "int8" | "int4" | "int4s"); None lets it choose.
    kv_dtype: the KV cache's dtype (None: dtype)."""
    if isinstance(plan, (str, Path)):
        plan = Plan.load(plan)
    if plan is not None:
        check_plan_fits_model(plan, cfg, max_context)
        check_plan_holds_cache(plan, kv_cache_bytes(cfg, max_context, torch.tensor([], dtype=dtype).element_size(),
                                                    (kv_dtype or dtype).itemsize))
        if dense is not None and dense_candidates(dense) != (plan.dense_format,):
            raise PlanError(f"the plan keeps the dense weights as {plan.dense_format or plan.device_dtype or 'bf16'}, "
                            f"not {dense}; drop the dense option or make a new plan")
        if slots is not None and slot_candidates(slots) != (plan.slot_format,):
            kept = plan.slot_format or plan.device_dtype or "bf16"
            raise PlanError(f"the plan keeps pinned experts and slots as {kept}, not {slots}; drop the slots option "
                            "or make a new plan")
        return plan
    if not has_device_tier(device, gpu_memory, plan):
        return None
    budgets = detect_budgets(device, gpu_memory, host_memory)
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    request = PlanRequest(
        device_budget=budgets.device_bytes, host_budget=budgets.host_bytes, max_context=max_context,
        kv_cache_bytes=kv_cache_bytes(cfg, max_context, dtype_bytes, (kv_dtype or dtype).itemsize),
        dtype_bytes=dtype_bytes,
        expert_format=host_format,
        expert_host_bytes=expert_host_bytes(cfg, host_format),
        device_dtype=str(dtype).removeprefix("torch."), dense_formats=dense_candidates(dense),
        staging_ring_entries=STAGING_RING_ENTRIES,
        host_link_bytes=HostLink.buffer_bytes(cfg.hidden_size, cfg.router.top_k, max_context),
        slot_formats=slot_candidates(slots, host_format), stream_buffer_experts=2 * cfg.router.top_k,
        device_landing_entries=STAGING_RING_ENTRIES)
    return make_plan(inventory(cfg, names), request, heat)


def check_plan_fits_model(plan: Plan, cfg: ModelConfig, max_context: int) -> None:
    moe_layers = [i for i, sparse in enumerate(cfg.moe_layers) if sparse]
    if [l.layer for l in plan.layers] != moe_layers or any(
            l.num_experts != cfg.router.num_experts or max(l.pinned, default=0) >= cfg.router.num_experts
            for l in plan.layers):
        raise PlanError("the plan was made for a different model (its MoE layers or expert counts differ); "
                        "make a new one with `offload plan MODEL`")
    if max_context > plan.max_context:
        raise PlanError(f"the plan was made for max_context {plan.max_context}, not {max_context}; "
                        "load with that max_context or make a new plan")


def check_plan_holds_cache(plan: Plan, cache_bytes: int) -> None:
    """A plan sized its KV cache for one dtype: a load whose cache needs more (a float32 cache where the plan
    counted bf16) would overrun the device budget the plan kept to."""
    planned = plan.device_groups.get("kv_cache")
    if planned is not None and cache_bytes > planned:
        raise PlanError(f"the plan holds a {planned / 2**20:.1f} MiB KV cache, but this load's needs "
                        f"{cache_bytes / 2**20:.1f} MiB (a wider cache dtype than the plan's); load with the plan's "
                        "--kv-cache or make a new plan with this one")


__all__ = ["Plan", "PlanError", "PlanRequest", "make_plan", "resolve_plan", "inventory", "kv_cache_bytes",
           "detect_budgets", "expert_host_bytes", "has_device_tier", "dense_candidates", "slot_candidates"]

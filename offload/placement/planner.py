"""The placement planner: a pure function from model size, budgets and routing heat to a Plan.

Device tier first: embeddings, attention/MLA, the KV or latent cache for max_context, norms, routers, shared
experts, dense MLPs and the LM head, their dense weights in the model dtype or, when that leaves no room for a
cache slot per MoE layer, in int8 then int4 (model/device_quant.py; an explicit dense format is the only
candidate). What is left of the device budget holds routed experts: first a few cache slots per MoE layer (so the
prefetcher has somewhere to copy predicted experts), then pinned experts — the hottest by routing heat, or evenly
without heat. Every other expert stays on the host. The rows of pinned experts and slots hold the device dtype or,
when that leaves fewer than top-k slots per MoE layer, int8 then int4 (experts/quant_pool.py; an explicit slot
format is the only candidate). Where experts stay on the host, the device buffers their uploads go through (the
staging ring's landing buffers, then the whole-layer streaming double buffer where it fits) are reserved first;
the double buffer's rows are in the slots' format, so each candidate format is weighed with its own buffer.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..errors import OffloadError
from ..files import write_json_atomic
from .inventory import Inventory

MiB, GiB = 2**20, 2**30
LANDING, STREAM_BUFFER = "staging landing", "stream buffer"  # the device buffers' names in Plan.device_buffers


class PlanError(OffloadError):
    """The model cannot be placed within the budgets."""


@dataclass(frozen=True)
class LayerPlan:
    layer: int
    pinned: tuple[int, ...]  # expert ids resident on the device for good
    cache_slots: int  # device slots for experts copied in on demand or by the prefetcher
    num_experts: int

    @property
    def host_experts(self) -> int:
        return self.num_experts - len(self.pinned)


@dataclass(frozen=True)
class Plan:
    device_budget: int
    host_budget: int
    max_context: int
    expert_format: str  # host format of routed experts: "bf16" | "int8" | "int4" | "float32" | "float16"
    device_groups: dict[str, int]  # always-on-device weight groups and the KV cache, in bytes
    expert_device_bytes: int  # one routed expert's pool row: in the device dtype, or in slot_format
    expert_host_bytes: int  # one routed expert in the host format
    layers: tuple[LayerPlan, ...]
    device_dtype: str | None = None  # what the device tier's sizes assume ("float32", ...); None in older plans
    dense_format: str | None = None  # "int8" | "int4": the device tier's dense weights quantized; None: device dtype
    # Host buffers beside the experts, in bytes: the pinned staging ring that expert copies pass through and the
    # CPU workers' link buffers (experts/device.py, experts/link.py); empty in older plans.
    host_staging: dict[str, int] = field(default_factory=dict)
    slot_format: str | None = None  # "int8" | "int4" | "int4s": pinned experts and slots quantized; None: device dtype
    # Device buffers beside the weights, in bytes: the staging ring's landing buffers and, where it fits, the
    # whole-layer streaming double buffer (stream_buffer_experts rows in stream_buffer_format); without it (and in
    # older plans) no prefill chunk streams.
    device_buffers: dict[str, int] = field(default_factory=dict)
    stream_buffer_experts: int = 0
    stream_buffer_format: str | None = None  # the double buffer's rows: slot_format's; None: the device dtype

    @property
    def device_fixed_bytes(self) -> int:
        return sum(self.device_groups.values())

    @property
    def device_expert_bytes(self) -> int:
        return sum(len(l.pinned) + l.cache_slots for l in self.layers) * self.expert_device_bytes

    @property
    def device_buffer_bytes(self) -> int:
        return sum(self.device_buffers.values())

    @property
    def device_bytes(self) -> int:
        return self.device_fixed_bytes + self.device_buffer_bytes + self.device_expert_bytes

    @property
    def host_bytes(self) -> int:
        return sum(l.host_experts for l in self.layers) * self.expert_host_bytes

    @property
    def host_staging_bytes(self) -> int:
        return sum(self.host_staging.values())

    @property
    def copies_possible(self) -> bool:
        """Whether some layer can copy host experts into cache slots (the only case where prefetch can run)."""
        return any(l.host_experts and l.cache_slots for l in self.layers)

    def layer(self, index: int) -> LayerPlan:
        for layer in self.layers:
            if layer.layer == index:
                return layer
        raise KeyError(f"layer {index} has no routed experts in this plan")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            data = json.loads(text)
            data["layers"] = tuple(LayerPlan(**{**l, "pinned": tuple(l["pinned"])}) for l in data["layers"])
            return cls(**data)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise PlanError(f"not a plan file ({err}); write one with `offload plan MODEL --out plan.json`") from None

    def save(self, path: str | Path) -> None:
        write_json_atomic(Path(path), asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            return cls.from_json(Path(path).read_text())
        except OSError as err:
            raise PlanError(f"cannot read plan {path}: {err.strerror}") from None

    def table(self) -> str:
        """A readable summary: bytes per tier (every size in one unit), then pinned / slots / host experts per MoE
        layer."""
        size = _sizes(self.device_budget, self.device_bytes, self.host_bytes)  # the table's column and budget
        host_total = self.host_bytes + self.host_staging_bytes
        dense = f"dense {self.dense_format}" if self.dense_format else None
        slots = f"slots {self.slot_format}" if self.slot_format else None
        shown = [part for part in (self.device_dtype, dense, slots) if part]
        tier = "device tier" + (f" ({', '.join(shown)})" if shown else "")
        ram = _sizes(self.host_budget)
        rows = [f"device budget {size(self.device_budget)}, host budget {ram(self.host_budget)}, "
                f"max_context {self.max_context}, experts on host as {self.expert_format}"
                + (f", dense weights quantized to {self.dense_format}" if dense else "")
                + (f", pinned experts and slots quantized to {self.slot_format}" if slots else ""),
                "", f"{tier:<33} size"]
        rows += [f"  {group:<22}{size(n):>14}" for group, n in self.device_groups.items() if n]
        rows += [f"  {part:<22}{size(n):>14}" + self._buffer_note(part) for part, n in self.device_buffers.items()]
        rows += [f"  {'pinned + cache slots':<22}{size(self.device_expert_bytes):>14}",
                 f"  {'total':<22}{size(self.device_bytes):>14}",
                 f"{'host tier (' + self.expert_format + ')':<33} size",
                 f"  {'experts':<22}{size(self.host_bytes):>14}"]
        rows += [f"  {part:<22}{size(n):>14}" for part, n in self.host_staging.items()]
        rows += [f"  {'total':<22}{size(host_total):>14}", "",
                 f"{'layer':>6}{'pinned':>8}{'slots':>7}{'host':>6}  pinned ids"]
        for l in self.layers:
            ids = ",".join(map(str, l.pinned[:12])) + (",…" if len(l.pinned) > 12 else "")
            rows.append(f"{l.layer:>6}{len(l.pinned):>8}{l.cache_slots:>7}{l.host_experts:>6}  {ids}")
        return "\n".join(rows)

    def _buffer_note(self, part: str) -> str:
        """What a device buffer of the table holds, where it holds pool rows (the stream buffer)."""
        if part != STREAM_BUFFER:
            return ""
        fmt = self.stream_buffer_format or self.device_dtype or "the device dtype"
        return f"  {self.stream_buffer_experts} rows of {fmt}"


def _sizes(*shown: int) -> Callable[[int], str]:
    """A formatter for sizes shown together: all in GiB when the largest is at least 1 GiB, else all in MiB."""
    unit, name = (GiB, "GiB") if max(shown) >= GiB else (MiB, "MiB")
    return lambda n: f"{n / unit:.3f} {name}" if unit == GiB else f"{n / unit:.2f} {name}"


@dataclass(frozen=True)
class PlanRequest:
    """What a plan is made for, besides the model's inventory."""

    device_budget: int
    host_budget: int
    max_context: int
    kv_cache_bytes: int  # the attention cache for max_context
    dtype_bytes: int  # device compute dtype
    expert_format: str  # host format of routed experts
    expert_host_bytes: int  # one routed expert in that format
    slots_per_layer: int | None = None  # cache size per MoE layer; None: twice top-k as far as the budget allows
    device_dtype: str | None = None  # the device compute dtype's name, for the plan's table
    # The device tier's dense formats to choose from, in order (None: the device dtype); AUTO_DENSE quantizes
    # when the device dtype leaves no room for a cache slot per MoE layer.
    dense_formats: tuple[str | None, ...] = (None,)
    # Host buffers counted in host_budget: the staging ring's entries (one routed expert's packed host bytes each)
    # and the CPU workers' link buffers for the longest forward (0: not counted).
    staging_ring_entries: int = 0
    host_link_bytes: int = 0
    # The pool rows' formats to choose from, in order (None: the device dtype); AUTO_SLOTS quantizes when the
    # device dtype leaves fewer than top-k slots per MoE layer.
    slot_formats: tuple[str | None, ...] = (None,)
    # Device buffers reserved where experts stay on the host (0: not reserved): the streaming double buffer's rows
    # (in the slot format chosen) and the staging ring's landing entries (one expert's packed host bytes each).
    stream_buffer_experts: int = 0
    device_landing_entries: int = 0


AUTO_DENSE = (None, "int8", "int4")
AUTO_SLOTS = (None, "int8", "int4")


def make_plan(inv: Inventory, req: PlanRequest, heat: Sequence[Sequence[float]] | None = None) -> Plan:
    """Place a model. heat[i][e] counts how often MoE layer inv.moe_layers[i] routed to expert e."""
    E, L = inv.num_experts, len(inv.moe_layers)
    landing = req.device_landing_entries * req.expert_host_bytes  # what any upload lands in
    dense_format, groups = choose_dense_format(inv, req, L * inv.slot_bytes(req.dtype_bytes), landing)
    fixed = sum(groups.values())
    sizes = {fmt: inv.slot_bytes(req.dtype_bytes, fmt) for fmt in req.slot_formats}
    if L * E * sizes[req.slot_formats[0]] <= req.device_budget - fixed:
        slot_format, buffers = req.slot_formats[0], {}  # every expert on the device: nothing is uploaded
    else:
        check_landing_fits(fixed, landing, req)
        slot_format = choose_slot_format(req.slot_formats, req.device_budget - fixed - landing, sizes,
                                         L * min(inv.top_k, E), req.stream_buffer_experts)
        buffers = device_buffers(req, fixed, sizes[slot_format])
    expert_bytes = sizes[slot_format]
    room = req.device_budget - fixed - sum(buffers.values())
    capacity = room // expert_bytes if expert_bytes else 0
    if heat is not None and (len(heat) != L or any(len(row) != E for row in heat)):
        raise PlanError(f"routing heat must be {L} MoE layers x {E} experts; profile this model again")

    if capacity >= L * E:
        slots = [0] * L
        pinned = [list(range(E)) for _ in range(L)]
    else:
        want = req.slots_per_layer if req.slots_per_layer is not None else 2 * inv.top_k
        slots = _cache_slots(capacity, L, min(want, E))
        pinned = _pin(capacity - sum(slots), slots, E, heat)
    layers = tuple(LayerPlan(layer, tuple(sorted(p)), s, E) for layer, p, s in zip(inv.moe_layers, pinned, slots))
    uploads = any(layer.host_experts for layer in layers)
    staging = host_staging(req, uploads)
    buffers = buffers if uploads else {}
    streams = STREAM_BUFFER in buffers
    plan = Plan(req.device_budget, req.host_budget, req.max_context, req.expert_format, groups, expert_bytes,
                req.expert_host_bytes, layers, req.device_dtype, dense_format, staging, slot_format, buffers,
                req.stream_buffer_experts if streams else 0, slot_format if streams else None)
    check_host_fits(plan, req)
    return plan


def host_staging(req: PlanRequest, host_experts: bool) -> dict[str, int]:
    """The host buffers a device tier keeps beside the experts where some expert stays on the host, by name (those
    not counted left out): the staging ring (entries of one expert's packed bytes, as the host holds them) and the
    link to the CPU workers."""
    if not host_experts:
        return {}
    parts = {"staging ring": req.staging_ring_entries * req.expert_host_bytes, "host link": req.host_link_bytes}
    return {name: n for name, n in parts.items() if n}


def device_buffers(req: PlanRequest, fixed: int, row_bytes: int) -> dict[str, int]:
    """The device buffers of expert uploads, by name (those not reserved left out): the staging ring's landing
    entries (one expert's packed host bytes each), which every upload goes through, and the whole-layer streaming
    double buffer (rows of `row_bytes`: the slots' format) where it fits beside them and the `fixed` bytes (without
    it no prefill chunk streams)."""
    landing = req.device_landing_entries * req.expert_host_bytes
    stream = stream_buffer_bytes(req.device_budget - fixed - landing, req.stream_buffer_experts, row_bytes)
    parts = {LANDING: landing, STREAM_BUFFER: stream}
    return {name: n for name, n in parts.items() if n}


def stream_buffer_bytes(room: int, rows: int, row_bytes: int) -> int:
    """The streaming double buffer's bytes: `rows` rows of `row_bytes` where they fit in `room` (the device budget
    left beside the always-on weights and the landing buffers), else 0."""
    stream = rows * row_bytes
    return stream if stream <= room else 0


def check_landing_fits(fixed: int, landing: int, req: PlanRequest) -> None:
    """PlanError when the always-on-device weights and the landing buffers every upload goes through exceed the
    device budget (the stream buffer is reserved only where it fits)."""
    need = fixed + landing
    if need <= req.device_budget:
        return
    size = _sizes(need, req.device_budget)
    raise PlanError(f"the always-on-device weights ({size(fixed)}) and the buffers that expert uploads land in "
                    f"({size(landing)} of {LANDING}) exceed the device budget of {size(req.device_budget)}; raise "
                    "gpu_memory, lower max_context, quantize the dense weights (dense int8 / int4) or keep experts on "
                    "the host in a smaller format (experts int8 / int4)")


def choose_slot_format(formats: Sequence[str | None], room: int, slot_bytes: dict[str | None, int], needed: int,
                       stream_rows: int = 0) -> str | None:
    """The first of `formats` whose rows (slot_bytes each) give `needed` rows for pinned experts and slots in `room`
    bytes, else the one that gives the most (the first of equals): quantized rows only where the device dtype
    leaves too few. Each format's room first holds the streaming double buffer's `stream_rows` rows in that format,
    where they fit (stream_buffer_bytes)."""
    def rows(fmt: str | None) -> int:
        left = max(room, 0) - stream_buffer_bytes(max(room, 0), stream_rows, slot_bytes[fmt])
        return left // slot_bytes[fmt] if slot_bytes[fmt] else 0

    counts = [rows(fmt) for fmt in formats]
    enough = [i for i, n in enumerate(counts) if n >= needed]
    best = enough[0] if enough else max(range(len(formats)), key=lambda i: (counts[i], -i))
    return formats[best]


def check_host_fits(plan: Plan, req: PlanRequest) -> None:
    """PlanError when the host experts and staging buffers exceed the RAM budget, with the numbers and the fix."""
    need = plan.host_bytes + plan.host_staging_bytes
    if need <= req.host_budget:
        return
    size = _sizes(need, req.host_budget)
    staging = f" plus {size(plan.host_staging_bytes)} of staging buffers" if plan.host_staging else ""
    link = ", lower max_context (the CPU workers' link holds a whole prompt)" if req.host_link_bytes else ""
    raise PlanError(f"the experts left on the host need {size(plan.host_bytes)} as {req.expert_format}{staging} "
                    f"but only {size(req.host_budget)} of RAM is available; use a smaller expert format (int8, "
                    f"int4){link} or free memory")


def choose_dense_format(inv: Inventory, req: PlanRequest, slot_room: int, landing: int = 0
                        ) -> tuple[str | None, dict[str, int]]:
    """The first of req.dense_formats whose always-on-device groups (and KV cache) leave `slot_room` (a cache slot
    per MoE layer and the `landing` buffers uploads into it need) in the budget, else the first that leaves the
    landing buffers, else the first that fits at all, with its groups' bytes; PlanError if none fits."""
    options = [(fmt, {**inv.device_bytes(req.dtype_bytes, fmt), "kv_cache": req.kv_cache_bytes})
               for fmt in req.dense_formats]
    for room in (slot_room + landing, landing, 0):
        for fmt, groups in options:
            if sum(groups.values()) + room <= req.device_budget:
                return fmt, groups
    needs = [sum(groups.values()) for _, groups in options]
    size = _sizes(*needs, req.device_budget)
    dtype = req.device_dtype or f"{8 * req.dtype_bytes}-bit floats"
    each = [f"{size(n)} {'with ' + fmt + ' dense weights' if fmt else 'in ' + dtype}" for (fmt, _), n in
            zip(options, needs)]
    shown = " or ".join(filter(None, (", ".join(each[:-1]), each[-1])))
    hint = ", quantize the dense weights (dense int8 / int4)" if options[-1][0] is None else ""
    raise PlanError(
        f"attention, KV cache and other always-on-device weights need {shown} "
        f"(KV cache {size(req.kv_cache_bytes)} for max_context {req.max_context}) but the device budget is "
        f"{size(req.device_budget)}; lower max_context{hint}, use a smaller dtype or raise gpu_memory")


def _cache_slots(capacity: int, L: int, want: int) -> list[int]:
    """`want` slots per layer, spread evenly over the layers while the budget lasts."""
    per_layer, extra = divmod(min(capacity, want * L), L)
    return [per_layer + (1 if i < extra else 0) for i in range(L)]


def _pin(budget: int, slots: list[int], E: int, heat: Sequence[Sequence[float]] | None) -> list[list[int]]:
    """Pin `budget` experts, round-robin over layers without heat. With heat, each pin goes where it saves most:
    a layer's cache already catches about its `slots` hottest unpinned experts, so one more pin there is worth
    the heat of the expert just beyond them (pins + slots). A layer never pins more than E - slots experts."""
    L = len(slots)
    pinned: list[list[int]] = [[] for _ in range(L)]
    if heat is None:
        order = [(layer, e) for e in range(E) for layer in range(L)]  # expert 0 of every layer, then 1, ...
        for layer, e in order:
            if budget <= 0:
                break
            if len(pinned[layer]) < E - slots[layer]:
                pinned[layer].append(e)
                budget -= 1
        return pinned
    ranked = [sorted(range(E), key=lambda e: (-heat[layer][e], e)) for layer in range(L)]  # hottest first

    def marginal(layer: int) -> float:
        beyond = len(pinned[layer]) + slots[layer]
        return heat[layer][ranked[layer][beyond]] if beyond < E else float("-inf")

    while budget > 0:
        layer = max((l for l in range(L) if len(pinned[l]) < E - slots[l]), key=lambda l: (marginal(l), -l),
                    default=None)
        if layer is None:
            break
        pinned[layer].append(ranked[layer][len(pinned[layer])])  # pin the layer's hottest unpinned expert
        budget -= 1
    return pinned

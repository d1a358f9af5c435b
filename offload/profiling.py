"""Profiles: what a workload did (routing heat per layer and expert, hit rates, prefetch precision/recall,
bytes moved, time per component), a plan tuned to it, and a prediction of decode tokens/s for a plan.

`run_profile` runs the prompts twice: once with the plan the load options give (the default plan for the
budget, or --plan), then with a plan tuned to the measured heat (the same budget and cache slots, the hottest
experts pinned). For each it reports the predicted and the measured decode tokens/s and expert hit rate.

The prediction (`predict_tokens_per_s`) is deliberately simple, a sum per decoded token of:
  - the time that does not scale with hits and misses (attention, routers, shared experts, norms, LM head, and
    the experts' dispatch and copies), measured in the profile's decode steps;
  - per MoE layer, top_k expert uses: a hit (an expert resident on the device) and a miss (computed by the CPU
    workers) each cost what they cost in the profile's decode steps (`measured_use_costs`: device-expert and
    CPU-expert seconds over the hits and misses; the load's cost model prices a kind the run never saw).
The share of hits per layer is the heat of its pinned experts, plus the heat of its `cache_slots` hottest other
experts, over the layer's total heat: the cache is modelled as always holding the hottest experts it can, which
LRU/LFU with the prefetcher approach on skewed routing but never beat. Calibrated on the first run, the
prediction reproduces that run's speed; for another plan it is an estimate, a guide for comparing plans.
"""
from __future__ import annotations

import gc
import importlib.util
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import OffloadError
from .experts.cost import CostModel
from .experts.hybrid import ExpertSizes
from .files import new_file_mode, write_json_atomic
from .generate import check_fits
from .placement import Plan

if TYPE_CHECKING:
    from .api import Model

Prompt = str | Sequence[int]  # text, or token ids
Heat = Sequence[Sequence[float]]  # [MoE layer][expert]


def read_heat(path: Path) -> list[list[float]]:
    """The routing heat [MoE layer][expert] of a profile.json."""
    try:
        heat = json.loads(Path(path).read_text())["heat"]
    except OSError as error:
        raise OffloadError(f"cannot read profile {path}: {error.strerror}") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise OffloadError(f"{path} is not a profile (no 'heat'); write one with `offload profile`") from None
    if not isinstance(heat, list) or not all(isinstance(row, list) for row in heat):
        raise OffloadError(f"{path}: 'heat' must be a list of per-layer lists; write it with `offload profile`")
    return heat


def read_prompts(path: Path) -> list[str]:
    """One prompt per line of a UTF-8 text file; blank lines are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8 text"
        raise OffloadError(f"cannot read prompts file {path}: {reason}; pass a text file with one prompt per "
                           "line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise OffloadError(f"prompts file {path} has no prompts (every line is blank); write one prompt per line")
    return prompts


# --- the prediction: pure functions over numbers -------------------------------------------------------------

def expected_hit_share(pinned: Sequence[int], cache_slots: int, heat_row: Sequence[float]) -> float:
    """The share of a layer's expert uses served from the device: the pinned experts' heat plus the heat of the
    `cache_slots` hottest experts that are not pinned (the cache modelled as holding them), over the layer's
    total heat. A layer with no heat counts as uniform routing."""
    E = len(heat_row)
    total = sum(heat_row)
    if total <= 0:
        return min(len(pinned) + cache_slots, E) / E
    pinned_set = set(pinned)
    others = sorted((h for e, h in enumerate(heat_row) if e not in pinned_set), reverse=True)
    return (sum(heat_row[e] for e in pinned_set) + sum(others[:cache_slots])) / total


def check_heat_fits(plan: Plan, heat: Heat) -> None:
    if len(heat) != len(plan.layers) or any(len(row) != l.num_experts for row, l in zip(heat, plan.layers)):
        raise OffloadError(f"the heat is {len(heat)} MoE layers x {len(heat[0]) if heat else 0} experts but the "
                           f"plan has {len(plan.layers)} MoE layers; profile this model again")


def predict_hit_rate(plan: Plan, heat: Heat) -> float:
    """The expected decode hit rate: every MoE layer serves top_k uses per token, so the layers weigh the same."""
    check_heat_fits(plan, heat)
    shares = [expected_hit_share(l.pinned, l.cache_slots, row) for l, row in zip(plan.layers, heat)]
    return sum(shares) / len(shares) if shares else 1.0


@dataclass(frozen=True)
class UseCosts:
    """Decode seconds of one expert use: a hit (resident on the device) and a miss (computed by the CPU workers)."""

    hit_seconds: float
    miss_seconds: float


def predict_tokens_per_s(plan: Plan, heat: Heat, use: UseCosts, fixed_seconds_per_token: float, top_k: int) -> float:
    """Decode tokens/s of `plan` for a workload with this heat (the model in the module docstring):
    1 / (fixed + sum over MoE layers of top_k * (hit share * hit seconds + miss share * miss seconds))."""
    check_heat_fits(plan, heat)
    seconds = fixed_seconds_per_token
    for layer, row in zip(plan.layers, heat):
        share = expected_hit_share(layer.pinned, layer.cache_slots, row)
        seconds += top_k * (share * use.hit_seconds + (1 - share) * use.miss_seconds)
    return 1 / seconds if seconds > 0 else float("inf")


def measured_use_costs(decode: "DecodeCounters", cost: CostModel | None, sizes: ExpertSizes) -> UseCosts | None:
    """Seconds per hit and per miss as the profile run measured them (device-expert and CPU-expert time over the
    hits and misses); where a run had none of one kind, the load's cost model prices it. None: nothing to go on."""
    hits, misses = decode.hits, decode.expert_uses - decode.hits
    device, cpu = decode.components.get("device_experts", 0.0), decode.components.get("cpu_experts", 0.0)
    hit = device / hits if hits else (sizes.flops_per_token / cost.device_flops if cost else None)
    miss = cpu / misses if misses else (sizes.host_bytes / cost.cpu_bytes_per_s if cost else None)
    if hit is None or miss is None:
        return None
    return UseCosts(hit, miss)


def cost_model_from_stats(numbers: dict[str, float]) -> CostModel:
    """The CostModel behind model.stats()["cost_model"] (which reports GB/s and GFLOP/s)."""
    return CostModel(cpu_bytes_per_s=numbers["cpu_GBps"] * 1e9, cpu_flops=numbers["cpu_GFLOPs"] * 1e9,
                     copy_bytes_per_s=numbers["copy_GBps"] * 1e9, device_flops=numbers["device_GFLOPs"] * 1e9)


# --- measuring one plan ----------------------------------------------------------------------------------------

@dataclass
class DecodeCounters:
    """The decode steps of every prompt (the prefill, which produces the first token, left out)."""

    steps: int = 0
    seconds: float = 0.0  # model time, as in GenerationStats.decode_seconds
    expert_uses: int = 0
    hits: int = 0
    components: dict[str, float] = field(default_factory=dict)  # timer sections' seconds

    @property
    def tokens_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.expert_uses if self.expert_uses else 1.0

    @property
    def non_expert_seconds_per_token(self) -> float:
        """Decode time that does not scale with expert hits and misses: attention, routers, the LM head, and
        the experts' own dispatch and copies — everything but the device-expert and CPU-expert sections."""
        per_use = self.components.get("device_experts", 0.0) + self.components.get("cpu_experts", 0.0)
        return max(self.seconds - per_use, 0.0) / self.steps if self.steps else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "seconds": round(self.seconds, 6), "tokens_per_s": round(self.tokens_per_s, 3),
                "expert_uses": self.expert_uses, "hits": self.hits, "hit_rate": round(self.hit_rate, 4),
                "seconds_per_token": {k: round(v / self.steps, 9) for k, v in sorted(self.components.items())}
                if self.steps else {}}


@dataclass
class PlanRun:
    """What one plan did on the prompts."""

    name: str  # "default" (planned from the budget), "given" (--plan) or "tuned"
    plan: Plan
    heat: list[list[int]]  # [MoE layer][expert]
    stats: dict[str, Any]  # model.stats() after the last prompt
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode: DecodeCounters = field(default_factory=DecodeCounters)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "prompt_tokens": self.prompt_tokens,
                "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 3), "decode": self.decode.as_dict(),
                "pinned": [list(l.pinned) for l in self.plan.layers],
                "cache_slots": [l.cache_slots for l in self.plan.layers], "stats": self.stats}


def _counters(stats: dict[str, Any]) -> tuple[int, int, dict[str, float]]:
    """(expert uses, hits, seconds per timer section) so far."""
    layers = stats["layers"]
    return sum(l["expert_uses"] for l in layers), sum(l["hits"] for l in layers), dict(stats["seconds"])


def _run_prompt(model: Model, ids: list[int], max_new_tokens: int, run: PlanRun) -> None:
    """Greedy, eos ignored (so every plan decodes the same number of tokens); the decode steps' counters are the
    difference between the stats after the prefill and at the end."""
    generation = model.stream(ids, max_new_tokens=max_new_tokens, ignore_eos=True, seed=0, reuse_cache=False)
    tokens = generation.token_ids()
    next(tokens)  # the prefill, which samples the first token
    uses0, hits0, seconds0 = _counters(model.stats())
    for _ in tokens:
        pass
    uses1, hits1, seconds1 = _counters(model.stats())
    g, d = generation.result.stats, run.decode
    run.prompt_tokens += g.prompt_tokens
    run.prefill_seconds += g.prefill_seconds
    d.steps += g.generated_tokens - 1
    d.seconds += g.decode_seconds
    d.expert_uses += uses1 - uses0
    d.hits += hits1 - hits0
    for name, seconds in seconds1.items():
        d.components[name] = d.components.get(name, 0.0) + seconds - seconds0.get(name, 0.0)


def prompt_ids(model: Model, prompt: Prompt) -> list[int]:
    """Token ids as given; text as a user message through the chat template when there is one, else plain."""
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    if model.tokenizer is not None and model.tokenizer.chat_template is not None:
        return model.chat_prompt([{"role": "user", "content": prompt}])
    return model.encode(prompt)


@dataclass(frozen=True)
class Measured:
    """One plan's run and what the model told about itself."""

    run: PlanRun
    ids: list[list[int]]  # the prompts as token ids
    cost: CostModel | None  # None when no layer has CPU experts: nothing was measured
    sizes: ExpertSizes
    top_k: int
    device: str  # where the model ran and in which dtype: the tuned plan is made for the same
    dtype: str


PromptProgress = Callable[[str, int, int], None]  # (plan name, prompts done, prompts in all)


def measure_plan(model_path: Path, prompts: Sequence[Prompt], max_new_tokens: int, name: str,
                 load_options: dict[str, Any], on_prompt: PromptProgress | None = None) -> Measured:
    """Load with load_options, warm up, then run every prompt with fresh counters."""
    from . import load

    model = load(model_path, **load_options)
    model.transformer.timers.exact = True  # each section's own time, not its launch's
    ids = [prompt_ids(model, p) for p in prompts]
    for prompt in ids:  # every prompt fits, or fail before the long part
        check_fits(len(prompt), max_new_tokens, model.max_context)
    # First-call costs (allocations, caches) out.
    model.generate(ids[0], max_new_tokens=2, ignore_eos=True, reuse_cache=False)
    model.reset_stats()
    run = PlanRun(name, model.plan, [], {})
    for done, prompt in enumerate(ids, 1):
        _run_prompt(model, prompt, max_new_tokens, run)
        if on_prompt is not None:
            on_prompt(name, done, len(ids))
    run.heat, run.stats = model.routing_heat(), model.stats()
    cfg = model.config
    sizes = ExpertSizes(model.plan.expert_host_bytes, model.plan.expert_device_bytes,
                        2 * 3 * cfg.hidden_size * cfg.moe_intermediate_size)
    cost = cost_model_from_stats(run.stats["cost_model"]) if run.stats["cost_model"] else None
    return Measured(run, ids, cost, sizes, cfg.router.top_k, str(model.device),
                    str(model.transformer.embed.dtype).removeprefix("torch."))


def _release_device_memory() -> None:
    """Free the last model's device memory: planning on a GPU reads its free memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def tuned_plan(model_path: Path, baseline: Plan, heat: Heat, device: str, dtype: str) -> Plan:
    """The plan for the same budget, context, expert and dense formats with the hottest experts pinned (the planner
    keeps the cache slots: it gives them out before pinning)."""
    from . import plan

    from .experts.torch_host import FLOAT_FORMATS

    experts = None if baseline.expert_format in FLOAT_FORMATS else baseline.expert_format  # None: the dtype's
    return plan(model_path, gpu_memory=baseline.device_budget, max_context=baseline.max_context,
                experts=experts, device=device, dtype=dtype, heat=heat, dense=baseline.dense_format or "bf16")


# --- the profile -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReportRow:
    plan: str
    pinned: int  # experts pinned over all MoE layers
    cache_slots: int
    predicted_hit_rate: float
    hit_rate: float  # measured in the decode steps
    predicted_tokens_per_s: float | None  # None without a cost model
    tokens_per_s: float  # measured decode tokens/s


@dataclass(frozen=True)
class Profile:
    model: str
    prompts: int
    max_new_tokens: int
    moe_layers: list[int]
    heat: list[list[int]]  # [MoE layer][expert], from the first run
    cost: CostModel | None  # as measured at the first load; None: nothing to predict with
    sizes: ExpertSizes
    top_k: int
    fixed_seconds_per_token: float  # decode time that does not scale with hits and misses, from the first run
    use_costs: UseCosts | None  # seconds per hit and per miss, from the first run
    runs: tuple[PlanRun, ...]  # the plan the options gave, then the tuned one
    tuned: Plan
    report: tuple[ReportRow, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "prompts": self.prompts, "max_new_tokens": self.max_new_tokens,
                "moe_layers": self.moe_layers, "heat": self.heat,
                "cost_model": self.cost.as_dict() if self.cost else None, "expert_sizes": asdict(self.sizes),
                "top_k": self.top_k,
                "fixed_seconds_per_token": round(self.fixed_seconds_per_token, 9),
                "use_costs": asdict(self.use_costs) if self.use_costs else None,
                "report": [asdict(r) for r in self.report], "runs": [r.as_dict() for r in self.runs]}


def report_row(run: PlanRun, heat: Heat, use: UseCosts | None, fixed: float, top_k: int) -> ReportRow:
    plan = run.plan
    predicted = predict_tokens_per_s(plan, heat, use, fixed, top_k) if use else None
    return ReportRow(run.name, sum(len(l.pinned) for l in plan.layers), sum(l.cache_slots for l in plan.layers),
                     predict_hit_rate(plan, heat), run.decode.hit_rate, predicted, run.decode.tokens_per_s)


def check_profile_args(model_path: Path, device: str, gpu_memory: int | str | None, plan: Any,
                       max_new_tokens: int, prompts: Sequence[Prompt]) -> None:
    """Fail before any weight is read."""
    from .api import resolve_device
    from .tokenizer import Tokenizer

    if not prompts:
        raise OffloadError("no prompts to profile; give at least one")
    if any(isinstance(p, str) for p in prompts) and not Tokenizer.exists(model_path):
        raise OffloadError(f"{model_path} has no tokenizer.json (or tiktoken.model) to encode text prompts; profile it "
                           "from Python with token-id prompts (offload.profiling.run_profile)")
    if max_new_tokens < 2:
        # The first token comes out of the prefill; decode needs at least one more step to be measured.
        raise OffloadError(f"max_new_tokens must be at least 2 to measure decoding, got {max_new_tokens}")
    if resolve_device(device).type != "cuda" and gpu_memory is None and plan is None:
        raise OffloadError("no GPU is visible: give the device budget to profile with, e.g. gpu_memory='12GiB' "
                           "(--gpu-memory 12GiB), or a plan")


def run_profile(model_path: str | Path, prompts: Sequence[Prompt], max_new_tokens: int = 32,
                on_step: Callable[[str], None] | None = None, on_prompt: PromptProgress | None = None,
                **load_options: Any) -> Profile:
    """Profile the prompts under the plan load_options give, tune a plan to the routing heat, and run the prompts
    again under it. load_options go to offload.load (gpu_memory or plan is needed on a machine without a GPU).
    on_step(message) says what starts; on_prompt(plan name, done, total) follows each run's prompts."""
    say = on_step or (lambda message: None)
    model_path = Path(model_path)
    check_profile_args(model_path, load_options.get("device", "auto"), load_options.get("gpu_memory"),
                       load_options.get("plan"), max_new_tokens, prompts)
    name = "default" if load_options.get("plan") is None else "given"
    say(f"profiling {len(prompts)} prompt(s) x {max_new_tokens} new tokens with the {name} plan")
    first = measure_plan(model_path, prompts, max_new_tokens, name, load_options, on_prompt)
    _release_device_memory()
    heat = first.run.heat
    tuned = tuned_plan(model_path, first.run.plan, heat, first.device, first.dtype)
    say("profiling the tuned plan")
    second = measure_plan(model_path, first.ids, max_new_tokens, "tuned", {**load_options, "plan": tuned},
                          on_prompt)
    _release_device_memory()
    fixed = first.run.decode.non_expert_seconds_per_token
    runs = (first.run, second.run)
    use = measured_use_costs(first.run.decode, first.cost, first.sizes)
    report = tuple(report_row(r, heat, use, fixed, first.top_k) for r in runs)
    moe_layers = [l.layer for l in first.run.plan.layers]
    return Profile(str(model_path), len(prompts), max_new_tokens, moe_layers, heat, first.cost, first.sizes,
                   first.top_k, fixed, use, runs, tuned, report)


# --- outputs ---------------------------------------------------------------------------------------------------

SHADES = " ░▒▓█"  # no use .. the most used expert
COLOURS = ("grey30", "blue", "cyan", "yellow", "red")


def heat_level(value: float, hottest: float) -> int:
    """0 for an unused expert, else 1..4 by the share of the hottest expert's heat."""
    if value <= 0 or hottest <= 0:
        return 0
    return 1 + min(int(4 * value / hottest), 3)


def heatmap_text(heat: Heat, moe_layers: Sequence[int]) -> Text:
    """One row per MoE layer, one cell per expert, shaded by heat relative to the hottest expert anywhere."""
    hottest = max((max(row, default=0) for row in heat), default=0)
    text = Text()
    width = len(str(max(moe_layers, default=0)))
    text.append(f"{'':>{width + 6}}experts 0..{len(heat[0]) - 1 if heat else 0}\n")
    for layer, row in zip(moe_layers, heat):
        text.append(f"layer {layer:>{width}} ")
        for value in row:
            level = heat_level(value, hottest)
            text.append(SHADES[level], style=COLOURS[level])
        text.append("\n")
    text.append(f"shade: uses as a share of the hottest expert's {hottest:g}: ' ' none, ░ <25%, ▒ <50%, "
                "▓ <75%, █ 75% or more")
    return text


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file beside path, renamed over it once complete."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.fchmod(fd, new_file_mode())
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_heatmap_png(heat: Heat, moe_layers: Sequence[int], path: Path) -> None:
    # A bare Figure, not pyplot: no GUI backend is touched and the caller's pyplot state is left alone.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, len(heat[0]) * 0.12 + 2), max(2.0, len(heat) * 0.3 + 1)))
    ax = fig.subplots()
    image = ax.imshow(heat, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(moe_layers)), [str(l) for l in moe_layers])
    ax.set_title("routing heat (uses per expert)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    _write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def write_heatmap_txt(text: Text, path: Path) -> None:
    """The shades carry the heat, so the plain text (colours dropped) still reads."""
    _write_atomic(path, lambda tmp: tmp.write_text(text.plain + "\n", encoding="utf-8"))


def make_out_dir(path: Path) -> Path:
    try:
        path.expanduser().mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OffloadError(f"cannot create {path}: {error.strerror or error}; choose a writable folder") from None
    return path.expanduser()


def write_profile(profile: Profile, out_dir: Path) -> list[Path]:
    """profile.json, plan.json (the tuned plan) and heatmap.png (heatmap.txt without matplotlib) in out_dir."""
    out_dir = make_out_dir(out_dir)
    written = [out_dir / "profile.json", out_dir / "plan.json"]
    write_json_atomic(written[0], profile.as_dict())
    profile.tuned.save(written[1])
    try:
        if have_matplotlib():
            written.append(out_dir / "heatmap.png")
            write_heatmap_png(profile.heat, profile.moe_layers, written[-1])
        else:
            written.append(out_dir / "heatmap.txt")
            write_heatmap_txt(heatmap_text(profile.heat, profile.moe_layers), written[-1])
    except OSError as error:
        raise OffloadError(f"cannot write {written[-1]}: {error.strerror or error}; choose a writable folder") from None
    return written


def render(profile: Profile, console: Console) -> None:
    """The report: one row per plan, predicted and measured decode speed and expert hit rate."""
    title = (f"decode of {profile.prompts} prompt(s) x {profile.max_new_tokens} new tokens; "
             f"{profile.fixed_seconds_per_token * 1e3:.2f} ms/token besides expert compute")
    table = Table(title=title, title_justify="left")
    table.add_column("plan")
    for column in ("pinned", "slots", "predicted tok/s", "measured tok/s", "predicted hit rate", "hit rate"):
        table.add_column(column, justify="right")
    if profile.cost is None:
        table.caption = ("no tok/s prediction: with this budget every expert is on the device, so loading measured "
                         "no cost model")
    for r in profile.report:
        predicted = "-" if r.predicted_tokens_per_s is None else f"{r.predicted_tokens_per_s:.1f}"
        table.add_row(r.plan, str(r.pinned), str(r.cache_slots), predicted, f"{r.tokens_per_s:.1f}",
                      f"{r.predicted_hit_rate:.1%}", f"{r.hit_rate:.1%}")
    console.print(table)

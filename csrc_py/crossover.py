"""Engine crossovers measured on the host: from how many rows per expert torch's matmul beats a fused Numba kernel.

csrc_py.dispatch runs a call through the fused kernel (memory-bound at few rows: each weight byte read once) or
through torch's matmul (compute-bound at many rows). Where the two cross depends on the CPU (the kernels' ISA tier,
whether torch's bf16 matmul is native), the format, the activations' dtype, the shape and the thread count, so it
is measured on the host the first time a call of an *engine class* is dispatched, and kept on disk:

- `EngineClass`: (kind "moe" | "linear", format, activation dtype, shape class). A shape class rounds each side to
  a power of two in [MIN_SIDE, MAX_SIDE]; the measurement runs on random weights of exactly that shape, so it
  costs at most ~3 x 1024 x 1024 weights per call whatever the model's size (big matrices share a class: both
  engines scale with the weights, so the crossover in rows per expert barely moves with size).
- `time_engines`: both engines on a few row counts (ROWS, fewer when BUDGET_S of timed calls is spent), best of
  REPEATS, interleaved, each call after a cache eviction (a model's layer reads its experts from DRAM; a small
  class's weights left in the cache would flatter the memory-bound fused kernel). What to call comes from the
  caller (dispatch builds the engines; tests feed fake timings).
- `derive`: the crossover from the timings (a pure function): the row count where torch's time falls below the
  fused kernel's for good, interpolated between measured points; None when torch does not win at the last one.
- `torch_wins(rows, experts, crossover)`: the per-call decision (a pure function).
- `CrossoverCache`: a JSON file next to Numba's cache (NUMBA_CACHE_DIR, else csrc_py/__pycache__), entries keyed
  by `host_key()` (CPU model, ISA tier, torch version, kernel sources, torch's bf16 path, thread counts), so a new
  CPU, tier, torch, kernel edit or thread count measures again. An unreadable file gives one warning and is
  rewritten; a cache that cannot be written is only a warning too (the crossovers then live for the process).
- `Crossovers`: memo -> cache -> measure, and the fixed thresholds when OFFLOAD_CROSSOVERS=fixed or when a
  measurement fails (one warning).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import llvmlite.binding as llvm
import numba
import torch

from csrc_py import simd
from csrc_py.jit_cache import PACKAGE_HASH
from offload.errors import OffloadError

MODE_VARIABLE = "OFFLOAD_CROSSOVERS"
MODES = ("measure", "fixed")
ROWS = (1, 4, 16, 64)  # rows per expert timed, while the budget lasts
BUDGET_S = 0.3  # seconds of timed engine calls per engine class (JIT warm-up and weight packing excluded)
REPEATS = 3  # calls per engine and row count; the fastest counts (a preempted call only looks slower)
MIN_SIDE, MAX_SIDE = 64, 1024
CACHE_NAME = "crossovers.json"
CACHE_VERSION = 1
_PACKAGE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class EngineClass:
    """The calls one crossover stands for. dims: moe (H, I) of gate/up [I, H] and down [H, I]; linear (O, K)."""

    kind: str
    fmt: str
    dtype: str  # the activations torch computes in: "bf16" or "f32"
    dims: tuple[int, int]

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.fmt}/{self.dtype}/{self.dims[0]}x{self.dims[1]}"


def side_class(n: int) -> int:
    """n rounded to the nearest power of two (in log scale), clamped to [MIN_SIDE, MAX_SIDE]."""
    return min(MAX_SIDE, max(MIN_SIDE, 1 << max(0, round(math.log2(max(n, 1))))))


def engine_class(kind: str, fmt: str, dtype: str, a: int, b: int) -> EngineClass:
    return EngineClass(kind, fmt, dtype, (side_class(a), side_class(b)))


def torch_wins(rows: int, experts: int, crossover: int | None) -> bool:
    """Whether `rows` token-expert pairs over at most `experts` experts go to torch: at least `crossover` rows
    per used expert (None: never)."""
    return crossover is not None and rows > 0 and rows >= crossover * min(experts, rows)


@dataclass(frozen=True)
class Timings:
    """Seconds of one call of each engine at each measured row count (rows ascending)."""

    rows: tuple[int, ...]
    fused: tuple[float, ...]
    torch: tuple[float, ...]


def derive(t: Timings) -> int | None:
    """The smallest row count from which torch is faster, or None if it is not faster at the largest measured.

    Torch must win at the largest measured row count and at every count from the crossing on (a win followed by
    a loss is noise or a cache effect); the crossing is interpolated linearly between the two measured counts
    around it. Nothing is extrapolated past the largest count: on a busy host one preempted call can fake a trend,
    and a wrong "torch" costs far more than a missed one (the fused kernel is the engine outside the range)."""
    diff = [tt - tf for tf, tt in zip(t.fused, t.torch)]  # > 0: the fused kernel is faster
    if not diff or diff[-1] > 0:
        return None
    first = len(diff) - 1
    while first > 0 and diff[first - 1] <= 0:
        first -= 1
    if first == 0:
        return t.rows[0]
    r0, r1, d0, d1 = t.rows[first - 1], t.rows[first], diff[first - 1], diff[first]
    return min(r1, max(r0 + 1, math.ceil(r0 + (r1 - r0) * d0 / (d0 - d1))))


def time_engines(fused: Callable[[int], object], torch_engine: Callable[[int], object],
                 rows: Sequence[int] | None = None, budget_s: float | None = None, repeats: int = REPEATS,
                 clock: Callable[[], float] = time.perf_counter, before: Callable[[], object] | None = None
                 ) -> Timings:
    """Time both engines (callables of a row count) at each row count (default ROWS), interleaved, best of
    `repeats`; stops after the row count at which the timed calls pass `budget_s` (default BUDGET_S). Each engine
    runs once untimed first (JIT); `before` runs untimed before every timed call (dispatch evicts the caches)."""
    rows = ROWS if rows is None else rows
    budget_s = BUDGET_S if budget_s is None else budget_s
    fused(rows[0])
    torch_engine(rows[0])
    measured: list[tuple[int, float, float]] = []
    spent = 0.0
    for r in rows:
        best = [math.inf, math.inf]
        for _ in range(repeats):
            for i, engine in enumerate((fused, torch_engine)):
                if before is not None:
                    before()
                start = clock()
                engine(r)
                seconds = clock() - start
                best[i] = min(best[i], seconds)
                spent += seconds
        measured.append((r, *best))
        if spent > budget_s:
            break
    return Timings(*(tuple(column) for column in zip(*measured)))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_key(native_bf16: bool) -> dict[str, str]:
    """What a measured crossover depends on besides its engine class; any change measures again."""
    return {"cpu": f"{_cpu_model()} ({llvm.get_host_cpu_name()})", "tier": simd.TIER, "torch": torch.__version__,
            "kernels": PACKAGE_HASH.hex()[:16], "torch_bf16": "native" if native_bf16 else "software",
            "threads": f"numba {numba.get_num_threads()}, torch {torch.get_num_threads()}"}


def cache_path() -> Path:
    """Next to Numba's cache of the kernels: NUMBA_CACHE_DIR when set, else csrc_py/__pycache__."""
    root = numba.config.CACHE_DIR
    return (Path(root) if root else _PACKAGE / "__pycache__") / CACHE_NAME


class CrossoverCache:
    """The on-disk crossovers: {"version", "hosts": {key: {"key": {...}, "crossovers": {label: rows | null}}}}.
    Hosts with other kernel sources are dropped when the file is written (their kernels are gone)."""

    def __init__(self, path: Path, key: dict[str, str]) -> None:
        self.path, self.key = path, key
        self.key_text = json.dumps(key, sort_keys=True)
        self._warned = False

    def _read(self) -> dict:
        """The whole file's hosts (empty when missing or unreadable: then one warning)."""
        try:
            data = json.loads(self.path.read_text())
            hosts = data["hosts"]
            if data.get("version") != CACHE_VERSION or not isinstance(hosts, dict) or not all(
                    isinstance(h, dict) and isinstance(h.get("key"), dict) and isinstance(h.get("crossovers"), dict)
                    for h in hosts.values()):
                raise ValueError("not a crossover cache of this version")
            return hosts
        except (FileNotFoundError, NotADirectoryError):  # nothing stored yet (or no folder for it: see store)
            return {}
        except (OSError, ValueError, KeyError, TypeError) as error:
            self._warn(f"crossover cache {self.path} is unreadable ({error}): measuring again and rewriting it")
            return {}

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def load(self) -> dict[str, int | None]:
        """This host key's crossovers by engine class label."""
        entries = self._read().get(self.key_text, {}).get("crossovers", {})
        return {label: v for label, v in entries.items() if v is None or (isinstance(v, int) and v > 0)}

    def store(self, label: str, crossover: int | None) -> None:
        """Add one crossover (read, merge, replace atomically: concurrent processes lose nothing but races)."""
        hosts = {text: h for text, h in self._read().items() if h["key"].get("kernels") == self.key["kernels"]}
        hosts.setdefault(self.key_text, {"key": self.key, "crossovers": {}})["crossovers"][label] = crossover
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"version": CACHE_VERSION, "hosts": hosts}, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as error:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            self._warn(f"cannot write the crossover cache {self.path} ({error.strerror or error}): crossovers are "
                       f"measured again in every process; set NUMBA_CACHE_DIR to a writable folder")


class Crossovers:
    """Crossover per engine class: memo, then the on-disk cache, then a measurement (stored), in "measure" mode;
    `fixed(fmt)` in "fixed" mode or when measuring fails. `choices` says what was used and where it came from."""

    def __init__(self, measure: Callable[[EngineClass], Timings], fixed: Callable[[str], int | None],
                 cache: CrossoverCache | None, mode: str = "measure") -> None:
        if mode not in MODES:
            raise OffloadError(f"{MODE_VARIABLE}={mode!r} is not a crossover mode: use one of {', '.join(MODES)}")
        self.measure, self.fixed, self.cache, self.mode = measure, fixed, cache, mode
        self.choices: dict[str, tuple[int | None, str]] = {}  # label -> (crossover, "measured" | "cached" | ...)
        self._memo: dict[tuple, int | None] = {}
        self._stored: dict[str, int | None] | None = None
        self._lock = threading.Lock()

    def get(self, kind: str, fmt: str, dtype: str, a: int, b: int) -> int | None:
        """The crossover (rows per expert) of calls of this kind, format, activation dtype and shape."""
        raw = (kind, fmt, dtype, a, b)
        if raw in self._memo:
            return self._memo[raw]
        with self._lock:
            if raw not in self._memo:
                self._memo[raw] = self._resolve(engine_class(*raw))
            return self._memo[raw]

    def _resolve(self, cls: EngineClass) -> int | None:
        if cls.label in self.choices:
            return self.choices[cls.label][0]
        value, source = self._lookup(cls)
        self.choices[cls.label] = (value, source)
        return value

    def _lookup(self, cls: EngineClass) -> tuple[int | None, str]:
        if self.mode == "fixed":
            return self.fixed(cls.fmt), "fixed"
        if self.cache is not None:
            if self._stored is None:
                self._stored = self.cache.load()
            if cls.label in self._stored:
                return self._stored[cls.label], "cached"
        try:
            value = derive(self.measure(cls))
        except Exception as error:  # a measurement must never stop a model: today's thresholds instead
            warnings.warn(f"measuring the {cls.label} engine crossover failed ({type(error).__name__}: {error}): "
                          f"using the fixed thresholds; set {MODE_VARIABLE}=fixed to skip measuring",
                          RuntimeWarning, stacklevel=5)
            return self.fixed(cls.fmt), "fixed (measuring failed)"
        if self.cache is not None:
            self._stored[cls.label] = value
            self.cache.store(cls.label, value)
        return value, "measured"


def mode() -> str:
    """OFFLOAD_CROSSOVERS: "measure" (default) or "fixed" (today's thresholds, no timing: deterministic runs)."""
    return os.environ.get(MODE_VARIABLE, "measure").strip() or "measure"

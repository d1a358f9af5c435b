"""The Python API: offload.load(path) -> Model with logits / generate / stream / chat / chat_stream."""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from .arch import architecture
from .checks import check_load, check_max_context, check_token_ids
from .config import ModelConfig
from .decode_threads import DecodeThreads
from .decode_threads import parse as parse_decode_threads
from .errors import OffloadError
from .experts.builder import ExpertsBuilder, ExpertsOptions, check_prefill_chunk, default_host_format
from .experts.cost import PrefetchChoice
from .generate import Generation, GenerationRequest, GenerationRun, PromptCacheStats
from .host_load import LoadMeter
from .model.block_graphs import cuda_capture
from .model.transformer import Transformer
from .openmp_env import gpu_present, on_a_passing_thread
from .placement import Plan, has_device_tier, resolve_plan
from .stats import reset_runtime_stats, runtime_stats
from .timers import Timers
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .weights.checkpoint import Checkpoint, read_config, read_json
from .weights.source import WeightSource, known_extras
from .weights.store import store_formats

log = logging.getLogger("offload")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OffloadError(f"device={device!r} but no CUDA GPU is visible; use device='cpu' or 'auto'")
    if device != "cpu" and not device.startswith("cuda"):
        raise OffloadError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # fp32 on the CPU keeps dense math exact to the reference; bf16 on a GPU halves its memory.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise OffloadError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


KV_CACHE_DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}  # load's kv_cache


def resolve_kv_dtype(kv_cache: str | None, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the caches that grow with the context: kv_cache's, or the model dtype for None."""
    if kv_cache is None:
        return dtype
    if kv_cache not in KV_CACHE_DTYPES:
        raise OffloadError(f"kv_cache must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache!r}")
    return KV_CACHE_DTYPES[kv_cache]


def eos_token_ids(folder: Path, config: ModelConfig, tokenizer: Tokenizer | None) -> tuple[int, ...]:
    """generation_config.json's eos ids win over config.json's; the tokenizer's eos is the last resort."""
    gen_path = folder / "generation_config.json"
    if gen_path.exists():
        eos = read_json(gen_path).get("eos_token_id")
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (int(eos),)
    if config.eos_token_ids:
        return config.eos_token_ids
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return (tokenizer.eos_token_id,)
    return ()


@dataclass(frozen=True)
class LoadInfo:
    seconds: float
    checkpoint_bytes: int  # tensor bytes in the checkpoint files
    skipped_tensors: int
    jit_seconds: float  # compiling or loading the CPU kernels from Numba's cache
    cpu_threads: int
    expert_format: str | None  # host format of the routed experts on the CPU workers; None: all in torch
    # "int8" | "int4": dense weights quantized (on the device tier's torch kernels, or the CPU kernels on a CPU-only
    # run); None: in the model dtype
    dense_format: str | None = None
    store: bool = False  # loaded from a pre-quantized store (`offload convert`)


class ModelLock:
    """Serialises the calls that use a model's cache. Waiting is right across threads; within one thread the
    holder can only be an unfinished stream, and waiting for it would wait forever, so that is an error."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None  # thread id of the holder

    def __enter__(self) -> ModelLock:
        if self._owner == threading.get_ident():
            raise OffloadError("this thread already has an unfinished stream on this model; exhaust it or call "
                               "its close() (or use `with model.stream(...) as run:`) before the next call")
        self._lock.acquire()
        self._owner = threading.get_ident()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._owner = None
        self._lock.release()

    @contextmanager
    def unless_busy(self) -> Iterator[bool]:
        """Hold the lock if no other thread does (yields True) without waiting for it; the thread that holds it
        counts as idle, since it can only be between two steps when it gets here."""
        if self._owner == threading.get_ident():
            yield True
            return
        held = self._lock.acquire(blocking=False)
        if held:
            self._owner = threading.get_ident()
        try:
            yield held
        finally:
            if held:
                self._owner = None
                self._lock.release()


class Model:
    """A loaded checkpoint ready to generate.

    A Model is safe to share between threads: it holds one sequence's cache, so calls that use it (logits,
    generate, stream, chat, chat_stream, reset_stats) are serialised by a lock, and a second thread waits for
    the first. A stream holds the lock from its first piece until it is exhausted, closed (`run.close()`, or
    leaving `with model.stream(...) as run:`) or garbage-collected; in the thread that holds it, another call
    raises OffloadError instead of waiting forever."""

    def __init__(self, path: Path, config: ModelConfig, transformer: Transformer, tokenizer: Tokenizer | None,
                 eos_ids: tuple[int, ...], load_info: LoadInfo, plan: Plan | None, experts: ExpertsBuilder,
                 decode_threads: DecodeThreads | None = None):
        self.path, self.config, self.transformer, self.tokenizer = path, config, transformer, tokenizer
        self.eos_token_ids = eos_ids
        self.load_info = load_info
        self.plan = plan  # None when every expert stays on the device tier (or all run on the CPU workers)
        self._experts = experts
        self.decode_threads = decode_threads  # the CPU decode step's thread count per step; None: as configured
        self._last: Generation | None = None
        self._prompt_cache = PromptCacheStats()
        self._lock = ModelLock()

    def stats(self) -> dict[str, Any]:
        """Runtime counters since load (or reset_stats): per-layer expert hits and misses, prefetch precision and
        recall, bytes copied, seconds per component, prompt tokens reused from the caches vs computed, the last
        generation's tokens/s, load and JIT time. The last decode step's expert counts join at its step boundary,
        taken here unless another thread is generating (then they lag by that step)."""
        with self._lock.unless_busy() as idle:
            if idle:
                self._experts.settle()
        return runtime_stats(self._experts, self.transformer.timers, self._last, self.load_info, self._prompt_cache)

    def routing_heat(self) -> list[list[int]]:
        """How often each MoE layer routed to each expert since load (or reset_stats): [MoE layer][expert]."""
        return [moe.heat.tolist() for moe in self.transformer.moe_blocks()]

    def reset_stats(self) -> None:
        with self._lock:
            reset_runtime_stats(self._experts, self.transformer.timers)
            self._prompt_cache.clear()  # in place: a run made before the reset counts into the same object
            for moe in self.transformer.moe_blocks():
                moe.heat.zero_()

    @property
    def prefetch(self) -> PrefetchChoice | None:
        """Whether the prefetcher runs and why; None where no layer is hybrid (nothing to prefetch). Decided
        automatically, it changes at step boundaries with the precision the prefetcher measures."""
        return self._experts.prefetch_choice

    @property
    def max_context(self) -> int:
        return self.transformer.max_context

    @property
    def device(self) -> torch.device:
        return self.transformer.embed.device

    def logits(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Prefill logits [T, vocab] (float32, on the CPU) for token_ids from a fresh context."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        check_token_ids(ids.tolist(), self.config.vocab_size)
        if ids.numel() > self.max_context:
            raise OffloadError(f"{ids.numel()} tokens exceed max_context={self.max_context}; "
                               "load with a larger max_context")
        with self._lock, torch.inference_mode():
            return self.transformer(ids.to(self.device), 0).cpu()

    def encode(self, text: str) -> list[int]:
        return self._require_tokenizer().encode(text)

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise OffloadError(f"{self.path} has no tokenizer.json or tiktoken.model; pass token ids instead of text")
        return self.tokenizer

    def _request(self, prompt: str | Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, ignore_eos: bool = False,
                 reuse_cache: bool = True) -> GenerationRequest:
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        check_token_ids(ids, self.config.vocab_size)
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                  repetition_penalty=repetition_penalty, seed=seed)
        return GenerationRequest(ids, max_new_tokens, sampling, stops, ignore_eos, reuse_cache)

    def stream(self, prompt: str | Sequence[int], **sampling: Any) -> GenerationRun:
        """Iterate for text pieces as they are produced; the run's `.result` holds the Generation afterwards.
        The run holds the model from its first piece until exhausted or closed (see the class docstring).

        The prefill resumes after the longest prefix of the prompt the model's caches already hold (a chat's
        earlier turns), with the same logits as a full prefill; reuse_cache=False prefills from position 0."""
        run = GenerationRun(self.transformer, self.tokenizer, self.eos_token_ids, self._request(prompt, **sampling),
                            self._lock, self._prompt_cache, self.decode_threads)
        self._last = run.result
        return run

    def generate(self, prompt: str | Sequence[int], **sampling: Any) -> Generation:
        with self.stream(prompt, **sampling) as run:
            for _ in run:
                pass
        return run.result

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of the chat template applied to messages, with the generation prompt added; `tools` (OpenAI
        function specs) are given to the template, which writes them in the model's own tool-call format."""
        tok = self._require_tokenizer()
        text = tok.apply_chat_template(messages, add_generation_prompt=True, **({"tools": tools} if tools else {}))
        # The template writes the special tokens (bos included) itself.
        return tok.encode(text, add_special_tokens=False)

    def chat(self, messages: list[dict[str, str]], **sampling: Any) -> Generation:
        return self.generate(self.chat_prompt(messages), **sampling)

    def chat_stream(self, messages: list[dict[str, str]], **sampling: Any) -> GenerationRun:
        return self.stream(self.chat_prompt(messages), **sampling)


ProgressCallback = Callable[[int, int, str], None]  # (bytes read so far, total bytes, current file name)
EXPERT_FORMATS = ("bf16", "int8", "int4", "int4s")
QUANTIZED_DENSE = ("int8", "int4", "int4s")  # dense formats quantized at load


def _off_the_calling_thread(load_model: Callable[..., Model]) -> Callable[..., Model]:
    """Where no GPU is present, run a load on a thread that ends with it (openmp_env.on_a_passing_thread): its
    parallel regions (packing, the kernels' warm-up, crossovers) then leave no OpenMP team behind, and the thread
    that generates, the caller's or a server's worker, holds the only one (a second live team throttles every
    parallel region). Ctrl-C in the caller stops the load at its next tensor read. The caller's torch dispatch modes
    (a profiler, a FakeTensorMode, a memory probe) and the load's thread counts are per thread: carried over."""

    @functools.wraps(load_model)
    def load_on_a_passing_thread(*args: Any, on_progress: ProgressCallback | None = None, **kwargs: Any) -> Model:
        if gpu_present():  # passive waits there, and CUDA graph captures on the caller's streams
            return load_model(*args, on_progress=on_progress, **kwargs)
        modes = _get_current_dispatch_mode_stack()

        def work(cancelled: threading.Event) -> Model:
            def progress(done: int, total: int, file_name: str) -> None:
                if cancelled.is_set():
                    raise KeyboardInterrupt  # Ctrl-C in the caller, which waits for this thread: read no further
                if on_progress is not None:
                    on_progress(done, total, file_name)

            with ExitStack() as stack:
                for mode in modes:
                    stack.enter_context(mode)
                return load_model(*args, on_progress=progress, **kwargs)

        model = on_a_passing_thread(work)
        from csrc_py.threads import use

        use(model.load_info.cpu_threads)
        return model

    return load_on_a_passing_thread


@_off_the_calling_thread
def load(path: str | Path, device: str = "auto", max_context: int | None = None, dtype: str = "auto",
         experts: str | None = None, cpu_threads: int | None = None, gpu_memory: int | str | None = None,
         plan: Plan | str | Path | None = None, cache_policy: str = "lru", prefetch: bool | None = None,
         dense: str | None = None, slots: str | None = None, prefill_chunk: int | None = None,
         cuda_graphs: bool | None = None, profile: str | Path | None = None, decode_threads: int | str = "auto",
         kv_cache: str | None = None, on_progress: ProgressCallback | None = None
         ) -> Model:
    """Load a Hugging Face MoE checkpoint folder (config.json + safetensors), or a pre-quantized store written by
    `offload convert`, for generation.

    max_context: tokens the cache is allocated for, prompt and reply together (default: the model's
                 max_position_embeddings, at most 4096); checked against that limit and free RAM before any
                 weight is read.
    experts:     host format of routed experts run by the CPU workers: "bf16" | "int8" | "int4" | "int4s" (symmetric
                 int4 at Q4_0's 0.5625 bytes per weight, docs/formats.md). With
                 device="cpu" and no gpu_memory, every routed expert runs on the CPU workers in this format;
                 None keeps them in torch with the rest of the model (exact, the reference path). A quantized
                 checkpoint (FP8, compressed-tensors, MXFP4, GPTQ, AWQ) defaults to the format its scheme maps
                 onto (weights.quant; `offload inspect` shows it), as a store defaults to its own.
    gpu_memory:  device budget ("12GiB", bytes). With a GPU, the default is its free memory; on a machine
                 without one it simulates a device tier of that size (planner, cache and prefetcher run as on
                 a GPU). Experts that do not fit stay on the host in `experts` format (default: the model
                 dtype, so that placement never changes the numbers).
    plan:        a Plan or a plan.json path to use instead of planning from the budgets.
    prefetch:    copy the experts a decode step ran on the CPU into cache slots for the next step (and, in a
                 prefill, the next layers' predicted experts); None: only where the cost model measured at load
                 says a copy saves more CPU time than it costs at the estimated hit rate, reviewed at step
                 boundaries from the precision the prefetcher measures (experts/cost.py; `Model.prefetch` says
                 on or off and why).
    profile:     a profile.json from `offload profile`: its routing heat gives prefetch's hit-rate estimate
                 before one is measured (instead of uniform routing's top-k / experts).
    dense:       format of the attention / MLA projections, dense MLPs, shared experts and the LM head:
                 "int8" | "int4" | "int4s" quantized at load, "bf16" in the model dtype. On a device tier (a GPU, a
                 gpu_memory budget or a plan) they run through torch's int8 / int4 weight-only matmuls
                 (model/device_quant.py) and None lets the planner choose (the model dtype while it leaves room
                 for a cache slot per MoE layer, then int8, then int4; the plan's table says which). On the CPU
                 alone they run through the quantized CPU kernels, and None keeps them in torch. A store's
                 formats are its defaults for experts and, on the CPU alone, dense.
    slots:       format of the routed experts held on the device tier (pinned experts and cache slots):
                 "int8" | "int4" | "int4s" quantized rows run by torch's weight-only matmuls (experts/quant_pool.py;
                 an upload from a host of the same int4 format keeps its values), "bf16" the model dtype. None lets
                 the planner choose: the model dtype while it leaves top-k slots per MoE layer, then int8, then
                 int4 (the plan's table says which). Needs a device tier (a GPU, gpu_memory or a plan).
    prefill_chunk: tokens per prefill forward; a longer prompt runs in chunks (default 512, raised to the
                 cost model's stream threshold where a device tier streams experts; offload/experts/stream.py).
    cuda_graphs: replay each layer's attention + norm + router block of a decode step from a CUDA graph captured
                 once per context bucket (a capture that fails leaves that layer eager, with one warning). None
                 (default): on where the model loads on a CUDA device (on an H200 the graphs replay the eager steps
                 exactly, experts on the GPU or on the CPU workers; decode 2.1-3.1x on the demo model); False: eager
                 steps. True without a CUDA device is refused.
    cpu_threads: threads for the CPU workers and torch (default: physical cores).
    decode_threads: threads of a CPU-only decode step: "auto" times steps at cpu_threads and at fewer while it
                 generates and keeps the fastest, re-measured as the host's load changes (offload/decode_threads.py;
                 the numbers never depend on it); an int fixes the count (at most cpu_threads).
    kv_cache:    dtype of the KV cache (MLA: the latent cache): "float32" | "bf16"; None keeps the model dtype
                 (float32 on the CPU, bf16 on a GPU). "bf16" on the CPU halves the cache's memory and the bytes a
                 decode step reads from it, and rounds every cached value to bf16 (8 significant bits): the
                 numbers change, by about what a bf16 model's cache changes them. The compiled decode step (a
                 CPU-only run with a dense format) reads the bf16 values in place; the torch path widens the
                 cached prefix to the model dtype each forward, a copy that keeps the memory saving but not the
                 read saving.
    on_progress: called after each tensor is read with the bytes read so far and in total.
    """
    t0 = time.perf_counter()
    checkpoint = Checkpoint(path)
    hf = checkpoint.config_json
    arch = architecture(hf.get("model_type"))
    config = arch.config_from_hf(hf)
    max_context = check_load(checkpoint, config, max_context, device, dtype, gpu_memory, plan, kv_cache)
    _check_formats(experts, dense, slots)
    check_prefill_chunk(prefill_chunk)
    fixed_decode_threads = parse_decode_threads(decode_threads)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    kv_dtype = resolve_kv_dtype(kv_cache, torch_dtype)
    device_tier = has_device_tier(torch_device, gpu_memory, plan)
    _check_slots_on_device_tier(slots, device_tier)
    cuda_graphs = _resolve_cuda_graphs(cuda_graphs, torch_device)
    if device_tier and fixed_decode_threads is not None:
        raise OffloadError("decode_threads sets the threads of a CPU-only decode step; with a device tier the CPU "
                           "experts run on their workers: set cpu_threads instead")
    experts, dense = _store_defaults(checkpoint, experts, dense, device_tier)
    placement = resolve_plan(config, arch.names, torch_device, torch_dtype,
                             experts or default_host_format(torch_dtype), max_context, gpu_memory, plan, dense=dense,
                             slots=slots, kv_dtype=kv_dtype)
    if placement is not None and experts is not None and experts != placement.expert_format:
        raise OffloadError(f"the plan keeps experts on the host as {placement.expert_format}, not {experts}; "
                           "drop the experts option or make a new plan")
    host_format = placement.expert_format if placement is not None else experts
    heat = _profile_heat(profile, placement)
    # The device tier's dense format is the plan's (chosen by the budget, or the one asked for); a CPU-only run
    # packs dense weights for the CPU kernels only when asked.
    dense_format = placement.dense_format if placement is not None else dense if dense in QUANTIZED_DENSE else None
    kernel_formats = (host_format,) if device_tier else (host_format, dense_format)
    threads, jit_seconds = _start_cpu_workers([f for f in kernel_formats if f], cpu_threads, device_tier)
    decode = _decode_threads(fixed_decode_threads, threads, device_tier, any(kernel_formats))

    total, done = checkpoint.nbytes(), [0]

    def on_read(file_name: str, nbytes: int) -> None:
        done[0] += nbytes
        if on_progress is not None:
            on_progress(done[0], total, file_name)

    timers = Timers(torch_device)
    builder = ExpertsBuilder(config, ExpertsOptions(host_format, placement, cache_policy, prefetch, heat=heat),
                             torch_device, torch_dtype, timers)
    src = WeightSource(checkpoint, torch_dtype, torch_device, rename=arch.checkpoint_name, on_read=on_read,
                       dense_format=dense_format, expert_format=host_format, dense_on_device=device_tier,
                       huge_pages=_store_in_huge_pages(checkpoint, device_tier))
    transformer = Transformer(config, arch.names, src, builder, max_context, timers, builder.settle,
                              device_positions=device_tier, kv_dtype=kv_dtype)
    if cuda_graphs:
        transformer.capture_graphs(cuda_capture(torch.cuda.graph_pool_handle()))
    skipped = src.finish(known_extras(config.num_hidden_layers, config.num_extra_layers, arch.runtime_name,
                                      arch.skipped_prefixes))
    checkpoint.release()  # what the model kept (copies, or a store's mapped arrays) stays; the rest is unmapped
    builder.attach_prefetcher(transformer.routers())
    transformer.prefill_chunk = builder.prefill_chunk(prefill_chunk)
    if host_format in EXPERT_FORMATS or dense_format is not None:
        _prepare_crossovers(transformer, torch_dtype)
    folder = checkpoint.folder
    tokenizer = Tokenizer.from_dir(folder) if Tokenizer.exists(folder) else None
    info = LoadInfo(time.perf_counter() - t0, total, len(skipped), jit_seconds, threads, host_format, dense_format,
                    store_formats(checkpoint) is not None)
    return Model(folder, config, transformer, tokenizer, eos_token_ids(folder, config, tokenizer), info,
                 placement, builder, decode)


def _decode_threads(fixed: int | None, threads: int, device_tier: bool, cpu_kernels: bool) -> DecodeThreads | None:
    """The decode step's thread counts: a fixed count as asked (at most `threads`); measured among `threads` and
    fewer where the step is CPU-only and runs the CPU kernels; else None (left as configured: on a device tier
    the CPU experts run on their own workers, and torch alone decodes as torch sets itself)."""
    if fixed is not None:
        return DecodeThreads.fixed(min(fixed, threads))
    if device_tier or not cpu_kernels or threads < 2:
        return None
    return DecodeThreads.auto(threads, load=LoadMeter())


def plan(path: str | Path, gpu_memory: int | str | None = None, max_context: int | None = None,
         experts: str | None = None, device: str = "auto", dtype: str = "auto",
         heat: list[list[float]] | None = None, host_memory: int | str | None = None,
         dense: str | None = None, slots: str | None = None, kv_cache: str | None = None) -> Plan:
    """The placement load() would use for these budgets, from config.json alone (no weight is read).
    experts: host format of offloaded experts; None keeps them in the device dtype, as load() does.
    dense: the device tier's dense format ("bf16" | "int8" | "int4" | "int4s"); None lets the planner choose, as
    load() does.
    slots: the format of pinned experts and cache slots ("bf16" | "int8" | "int4" | "int4s"); None lets the planner
    choose, as load() does.
    heat[i][e]: how often the i-th MoE layer routed to expert e (from `offload profile`).
    host_memory: the RAM to plan for (default: what is available now), e.g. to size a machine not at hand.
    kv_cache: the KV cache's dtype, as load() takes it ("float32" | "bf16"; None: the device dtype)."""
    hf = read_config(path)  # a folder with config.json alone is enough
    arch = architecture(hf.get("model_type"))
    config = arch.config_from_hf(hf)
    max_context = check_max_context(config, max_context)
    _check_formats(experts, dense, slots)
    torch_device = resolve_device(device)
    if torch_device.type != "cuda" and gpu_memory is None:
        raise OffloadError("no GPU is visible: give the device budget to plan for, e.g. gpu_memory='12GiB' "
                           "(--gpu-memory 12GiB)")
    torch_dtype = resolve_dtype(dtype, torch_device)
    kv_dtype = resolve_kv_dtype(kv_cache, torch_dtype)
    return resolve_plan(config, arch.names, torch_device, torch_dtype, experts or default_host_format(torch_dtype),
                        max_context, gpu_memory, None, heat, host_memory, dense, slots, kv_dtype)


def _profile_heat(profile: str | Path | None, placement: Plan | None) -> list[list[float]] | None:
    """A profile's routing heat, checked against the plan's MoE layers before any weight is read; None without a
    profile, or without a plan (no expert is copied, so the heat has nothing to estimate)."""
    if profile is None:
        return None
    from .profiling import check_heat_fits, read_heat

    heat = read_heat(Path(profile))
    if placement is None:
        return None
    check_heat_fits(placement, heat)
    return heat


def _store_in_huge_pages(checkpoint: Checkpoint, device_tier: bool) -> bool:
    """Whether a CPU-only run reads a store's packed matrices into huge pages (weights.hugepages) rather than
    memory-mapping them: asked for, offered by the kernel, and the copies fit in the memory available. Asked for
    but not possible is one warning, and the store stays mapped."""
    from .weights import hugepages
    from .weights.store import packed_entries, packed_nbytes

    hugepages.check_setting(os.environ)
    needed = packed_nbytes(checkpoint, packed_entries(checkpoint))  # 0: not a store
    if os.environ.get(hugepages.ENV_SWITCH) != "1" or needed == 0:
        return False
    if device_tier:
        log.warning("%s=1 reads a store into huge pages on a CPU-only run; with a device tier it stays memory-mapped",
                    hugepages.ENV_SWITCH)
        return False
    if not hugepages.offered(os.environ, hugepages.system_mode()):
        log.warning("%s=1, but the kernel offers no transparent huge pages (%s: %s): the store stays memory-mapped",
                    hugepages.ENV_SWITCH, hugepages.THP_SETTING, hugepages.system_mode())
        return False
    import psutil

    available = psutil.virtual_memory().available
    if not hugepages.copies_fit(needed, available):
        log.warning("%s=1, but the store's %.1f GiB of packed weights would leave less than %.0f GiB of the %.1f GiB "
                    "available: it stays memory-mapped", hugepages.ENV_SWITCH, needed / 2**30,
                    hugepages.RESERVE_BYTES / 2**30, available / 2**30)
        return False
    return True


def _check_formats(experts: str | None, dense: str | None, slots: str | None = None) -> None:
    for option, value in (("experts", experts), ("dense", dense), ("slots", slots)):
        if value is not None and value not in EXPERT_FORMATS:
            raise OffloadError(f"{option} must be one of {', '.join(EXPERT_FORMATS)}, got {value!r}")


def _check_slots_on_device_tier(slots: str | None, device_tier: bool) -> None:
    """A slot format is for the device tier's experts: refused where everything runs on the CPU alone."""
    if slots is not None and not device_tier:
        raise OffloadError(f"slots={slots!r} sets the format of experts held on a device tier, and this load has "
                           "none; drop slots or give gpu_memory (or a plan, or a CUDA device)")


def _resolve_cuda_graphs(cuda_graphs: bool | None, device: torch.device) -> bool:
    """CUDA graphs for decode blocks: on by default on a CUDA device; asked for on another device, refused."""
    if cuda_graphs is None:
        return device.type == "cuda"
    if cuda_graphs and device.type != "cuda":
        raise OffloadError(f"cuda_graphs needs a CUDA device, and this model loads on {device}; drop cuda_graphs "
                           "(--no-cuda-graphs) or load with device='cuda'")
    return cuda_graphs


def _store_defaults(checkpoint: Checkpoint, experts: str | None, dense: str | None, device_tier: bool
                    ) -> tuple[str | None, str | None]:
    """A store's formats are the defaults (on a device tier the plan chooses the dense format, and the store's
    packed dense weights are dequantized for it); asking for other expert formats than a store holds is an error,
    and so is another dense format than its packed one where everything runs on the CPU. A quantized checkpoint's
    scheme names its default."""
    formats = store_formats(checkpoint)
    if formats is None:
        # A quantized checkpoint's experts default to the format its grid maps onto (weights.quant).
        scheme = checkpoint.scheme
        return experts or (scheme.expert_format if scheme is not None else None), dense
    if experts is not None and experts != formats.experts:
        raise OffloadError(f"{checkpoint.folder} holds {formats.experts} experts, not {experts}; load it without "
                           "experts= or convert the original checkpoint again")
    if not device_tier and dense is not None and formats.dense != "bf16" and dense != formats.dense:
        raise OffloadError(f"{checkpoint.folder} holds {formats.dense} dense weights, not {dense}; load it without "
                           "dense= or convert the original checkpoint again")
    return formats.experts, dense or (None if device_tier else formats.dense)


def _prepare_crossovers(transformer: Transformer, dtype: torch.dtype) -> None:
    """Choose between the CPU kernels and torch for this model's shapes at load (measured once per host, then
    cached: csrc_py/crossover.py), not in the middle of its first reply."""
    from csrc_py.dispatch import prepare
    from .experts.cpu import CpuExperts
    from .model.layers import FusedLinear, QuantLinear

    gates, hybrid = [], False
    for block in transformer.moe_blocks():
        experts = block.experts
        cpu = experts if isinstance(experts, CpuExperts) else getattr(experts, "cpu", None)
        hybrid |= cpu is not experts
        if isinstance(cpu, CpuExperts):
            gates.append(cpu.gate)
    linears = [m.packed for m in transformer.modules() if isinstance(m, (QuantLinear, FusedLinear))]
    # A hybrid layer's CPU inputs travel as float32 (experts/link.py); CPU-only layers get the model dtype.
    prepare(gates, linears, torch.float32 if hybrid else dtype)


def _start_cpu_workers(formats: list[str], cpu_threads: int | None, device_tier: bool) -> tuple[int, float]:
    """Set the thread counts; compile (or load from cache) the CPU kernels of `formats` now, not mid-reply (with
    a device tier, the hybrid layers' block entry too)."""
    formats = [f for f in formats if f in EXPERT_FORMATS]  # float32 / float16 host experts run in torch
    if not formats:
        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        return torch.get_num_threads(), 0.0
    from csrc_py.threads import set_threads
    from .experts.cpu import warmup

    threads = set_threads(cpu_threads)
    return threads, sum(warmup(fmt, host_link=device_tier) for fmt in dict.fromkeys(formats))

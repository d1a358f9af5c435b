"""End-to-end prefill and decode tokens/s of offload, transformers and llama.cpp on one checkpoint, in one run.

    python tools/bench_e2e.py CHECKPOINT                      # every available engine, 2 threads, 3 rounds
    python tools/bench_e2e.py CHECKPOINT --engines offload-int8,llama.cpp-q8_0 --rounds 5 --json out.json
    python tools/bench_e2e.py CHECKPOINT --offload-store STORE  # adds offload on a pre-quantized store

CHECKPOINT is a Hugging Face folder (config.json + safetensors) of a model offload runs; the llama.cpp engines
need one tools/gguf_export.py exports: mixtral, qwen3_moe or deepseek_v2 (a GGUF per checkpoint and format; a
checkpoint it refuses skips them with its one-line reason). Engines:
  offload-int8, offload-int4, offload.load(device="cpu", experts=..., dense=...), Model.generate; dense is
  offload-int4s               the experts' format unless --dense says otherwise (matched bits, as the GGUFs);
                              int4s is Q4_0's grid and bytes (llama.cpp-q4_0's weights exactly, dense too)
  offload-int8-torchstep,     the same with the compiled CPU decode step off (OFFLOAD_COMPILED_STEP=0 in the
  offload-int4-torchstep,     worker): the torch path, for a compiled/torch A/B in one run (not in the default list)
  offload-int4s-torchstep
  offload-store               offload.load(--offload-store) as stored (only with --offload-store)
  transformers                AutoModelForCausalLM in --hf-dtype (bfloat16)
  llama.cpp-q8_0, -q4_0       llama-cpp-python on a GGUF written by tools/gguf_export.py (cached in --gguf-dir,
                              reused while newer than the checkpoint: delete it to export again)
  llama.cpp-f16               the same with F16 weights (not in the default list)
A llama.cpp-q4_0 GGUF is Q4_0 in every matrix, as llama.cpp's Q4_0 usually means; --gguf-dense q8_0 keeps the
token embedding, attention and LM head at Q8_0 (compare with --dense int8). Norms and routers: F32.

Every engine gets the same seeded random prompt of --prompt-tokens ids and decodes --new-tokens tokens greedily
with eos ignored, on --threads threads. One generation per round: prefill = the prompt in one pass up to the last
position's logits (offload and transformers compute the LM head for that position only, as llama.cpp does);
decode = the new-tokens - 1 single-token steps after it (the first new token comes out of the prefill), each a
forward pass plus a greedy pick. offload's figures are its GenerationStats (model time only, the same steps);
transformers and llama.cpp are timed by a manual loop over the KV cache (transformers: past_key_values, no
generate() overhead). A short warm-up generation precedes the measured one in every worker.

Each (round, engine) runs in a fresh subprocess (this script with --worker ENGINE, printing one JSON line), so one
engine's memory is released before the next starts; rounds interleave the engines so all see the same machine
noise. Reported: medians over rounds of prefill and decode tokens/s and load seconds, the largest peak RSS
(ru_maxrss: includes memory-mapped weight pages touched), how many of the first greedy tokens agree with
transformers' (random weights: near-ties make quantized engines diverge early), and the ratios the targets are
about, each as the ratio of the two engines' medians, as the ratio in every round and as the median of those (the
same-minute ratios: the host's drift between rounds moves each engine's median, not them). offload's rows also
give the kernels' ISA tier and, per decode token, the time inside the Numba kernels (every call csrc_py.dispatch
makes into them, and each block of the compiled decode step, its head included, is timed: wall time of the Numba
call, so its dispatch, argument unboxing and the parallel regions inside count as "in kernels"), the time outside
them per layer ((decode wall time per token - that) / layers: torch ops, conversions, Python, the embedding,
sampling and the logits' finiteness check, so on a shallow model the per-token part weighs on it more than on a
deep one), the weight bytes those kernels read (top-k experts and the packed dense matrices; torch-side weights
such as norms and routers are not counted), and the share of the bandwidth floor: those bytes over the read
bandwidth measured in the same round (the median of read probes, two before the round's first engine and one after
every engine, each a worker of its own: a torch sum over 1 GiB on --threads threads, best of 3, in huge pages
where the kernel offers them, as offload keeps its weights: offload/weights/hugepages.py; a burst of the host's
memory system that one probe catches does not set the median, even with a single engine), against the measured
time per token. A llama.cpp engine whose GGUF holds the same bytes as an offload engine of the run (int8 and Q8_0,
int4s and Q4_0, experts and dense alike) gets its share of the same floor, and the report prints 1 / that share:
how much faster than llama.cpp an engine reading at the probes' rate can be on that host. A round whose probes
agree within STEADY_SPREAD is steady; the ratio table also gives the median over the steady rounds alone, since a
burst of the memory system that lasts about as long as one engine's run falls on one engine of the round and not on
the other. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import inspect
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil

OFFLOAD_EXPERTS = {"offload-int8": "int8", "offload-int4": "int4", "offload-int4s": "int4s",
                   "offload-int8-torchstep": "int8", "offload-int4-torchstep": "int4",
                   "offload-int4s-torchstep": "int4s"}
TORCH_STEP_ENGINES = ("offload-int8-torchstep", "offload-int4-torchstep",
                      "offload-int4s-torchstep")  # compiled decode step off
GGUF_TYPES = {"llama.cpp-q8_0": "q8_0", "llama.cpp-q4_0": "q4_0", "llama.cpp-f16": "f16"}
DEFAULT_ENGINES = ("offload-int8", "offload-int4", "offload-int4s", "offload-store", "transformers",
                   "llama.cpp-q8_0", "llama.cpp-q4_0")
ALL_ENGINES = (*DEFAULT_ENGINES, *TORCH_STEP_ENGINES, "llama.cpp-f16")
RESULT_PREFIX = "BENCH_E2E_RESULT "
BANDWIDTH = "bandwidth"  # the worker that measures the read bandwidth: twice before a round, once after each engine
WARMUP_PROMPT, WARMUP_NEW = 64, 4
AGREEMENT_TOKENS = 16  # first greedy tokens kept per worker to compare engines
# (label, numerator engine, denominator engine, metric)
RATIOS = (
    ("offload-int8 / llama.cpp-q8_0 decode", "offload-int8", "llama.cpp-q8_0", "decode_tok_s"),
    ("offload-int4 / llama.cpp-q4_0 decode", "offload-int4", "llama.cpp-q4_0", "decode_tok_s"),
    ("offload-int4s / llama.cpp-q4_0 decode", "offload-int4s", "llama.cpp-q4_0", "decode_tok_s"),
    ("offload-int4s / offload-int4 decode", "offload-int4s", "offload-int4", "decode_tok_s"),
    ("offload-int8 / transformers decode", "offload-int8", "transformers", "decode_tok_s"),
    ("offload-int4 / transformers decode", "offload-int4", "transformers", "decode_tok_s"),
    ("offload-int8 / transformers prefill", "offload-int8", "transformers", "prefill_tok_s"),
    ("offload-int4 / transformers prefill", "offload-int4", "transformers", "prefill_tok_s"),
    ("offload-int8 / llama.cpp-q8_0 prefill", "offload-int8", "llama.cpp-q8_0", "prefill_tok_s"),
    ("offload-int4 / llama.cpp-q4_0 prefill", "offload-int4", "llama.cpp-q4_0", "prefill_tok_s"),
    ("offload-int4s / llama.cpp-q4_0 prefill", "offload-int4s", "llama.cpp-q4_0", "prefill_tok_s"),
    ("offload-int8 compiled / torch step decode", "offload-int8", "offload-int8-torchstep", "decode_tok_s"),
    ("offload-int4 compiled / torch step decode", "offload-int4", "offload-int4-torchstep", "decode_tok_s"),
)


# ---------------------------------------------------------------- worker side: one engine, one generation


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def timed_generation(prefill: Callable[[list[int]], int], step: Callable[[int], int], prompt: list[int],
                     new_tokens: int) -> dict:
    """Greedy generation through an engine's prefill (prompt -> first token) and step (token -> next token)."""
    t0 = time.perf_counter()
    tokens = [prefill(prompt)]
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        tokens.append(step(tokens[-1]))
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens": tokens}


def offload_load_kwargs(args: argparse.Namespace, experts: str | None) -> tuple[dict, list[str]]:
    """offload.load keyword arguments for this engine, and notices (dense= is new: older versions lack it)."""
    import offload

    kwargs = dict(device="cpu", cpu_threads=args.threads, max_context=args.prompt_tokens + args.new_tokens,
                  dtype=args.offload_dtype)
    if "decode_threads" in inspect.signature(offload.load).parameters:
        kwargs["decode_threads"] = args.decode_threads
    if args.kv_cache is not None:  # an older offload.load without kv_cache= fails here, as it should
        kwargs["kv_cache"] = args.kv_cache
    if experts is None:  # a pre-quantized store: its formats are in the store
        return kwargs, []
    kwargs["experts"] = experts
    dense = experts if args.dense == "matched" else args.dense
    if "dense" in inspect.signature(offload.load).parameters:
        return {**kwargs, "dense": dense}, []
    return kwargs, [f"offload.load has no dense= yet: ran without it (dense={dense!r} ignored)"]


class KernelMeter:
    """Times every call into compiled code that reads weights: the Numba kernels csrc_py.dispatch calls (fused MoE
    layers, packed linears) and the compiled decode step's blocks (csrc_py.decode_step), by wrapping them in their
    modules' namespaces (looked up there at each call, the blocks when a layer's step is first prepared)."""

    WRAPPED = {"csrc_py.dispatch": ("moe_q8", "moe_q4", "moe_bf16", "linear_q8", "linear_q4", "linear_bf16"),
               "csrc_py.decode_step": ("attention_block", "mla_block", "deltanet_block", "moe_block", "mlp_block",
                                       "head_block")}

    def __init__(self) -> None:
        import importlib

        self.calls: list[tuple[int, float]] = []  # (rows of the call's first argument, seconds)
        for module_name, names in self.WRAPPED.items():
            module = importlib.import_module(module_name)
            for name in names:
                setattr(module, name, self._timed(getattr(module, name), name.startswith("linear_")))

    def _timed(self, kernel: Callable, per_matrix: bool) -> Callable:
        def timed(*args):
            start = time.perf_counter()
            kernel(*args)
            rows = args[0].shape[0] // (args[1].shape[0] if per_matrix else 1)  # a stack's rows split over it
            self.calls.append((rows, time.perf_counter() - start))
        return timed

    def decode_seconds_per_token(self, steps: int) -> float:
        """Kernel seconds per decode step of the last generation: its calls after the prefill's last multi-row
        call, less a prefill LM head call on the last position (the leftover of a whole number of calls per step)."""
        last_prefill = max((i for i, call in enumerate(self.calls) if call[0] > 1), default=-1)
        tail = self.calls[last_prefill + 1:]
        return sum(seconds for _, seconds in tail[len(tail) - len(tail) // steps * steps:]) / steps


def decode_weight_bytes(transformer) -> int:
    """Weight bytes one decode token reads through the CPU kernels: every packed dense matrix (QuantLinear,
    FusedLinear) and top_k experts' share of each routed-expert stack (one token's top_k experts are distinct).
    Torch-side weights (norms, routers, the embedding row) are left out."""
    from csrc_py.formats import PackedMatrix
    from offload.model.moe import MoE

    total = 0
    for m in transformer.modules():
        if isinstance(getattr(m, "packed", None), PackedMatrix):
            total += m.packed.nbytes
        if isinstance(m, MoE):
            stacks = [v for v in vars(m.experts).values() if isinstance(v, PackedMatrix)]
            total += sum(pm.nbytes * m.router_cfg.top_k // pm.shape[0] for pm in stacks)
    return total


def read_bandwidth(threads: int) -> float:
    """GB/s of a torch sum over 1 GiB on `threads` threads, best of 3, in the memory offload keeps its weights in
    (huge pages where the kernel offers them: offload.weights.hugepages; a read of 4 KiB pages is slower)."""
    import torch

    from offload.weights import hugepages

    torch.set_num_threads(threads)
    buf = torch.from_numpy(hugepages.empty((1 << 28,), "float32"))
    buf.fill_(1.0)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return buf.numel() * 4 / best / 1e9


def run_offload(args: argparse.Namespace, engine: str, prompt: list[int]) -> dict:
    import offload
    from csrc_py import dispatch, simd
    from offload.model import compiled_step

    path = args.offload_store if engine == "offload-store" else args.checkpoint
    kwargs, notes = offload_load_kwargs(args, OFFLOAD_EXPERTS.get(engine))
    t0 = time.perf_counter()
    model = offload.load(path, **kwargs)
    load_s = time.perf_counter() - t0
    meter = KernelMeter()
    model.generate(prompt[:WARMUP_PROMPT], max_new_tokens=WARMUP_NEW, ignore_eos=True)
    meter.calls.clear()
    g = model.generate(prompt, max_new_tokens=args.new_tokens, ignore_eos=True, reuse_cache=False)
    steps = args.new_tokens - 1
    kernel_s = meter.decode_seconds_per_token(steps)
    weight_bytes = decode_weight_bytes(model.transformer)
    token_s = g.stats.decode_seconds / steps
    layers = json.loads((Path(path) / "config.json").read_text()).get("num_hidden_layers", 0)
    crossovers = {label: {"rows_per_expert": value, "source": source}
                  for label, (value, source) in sorted(dispatch.crossovers().choices.items())}
    info = model.load_info
    decode = {"isa_tier": simd.TIER, "formats": {"experts": info.expert_format, "dense": info.dense_format},
              "crossovers": crossovers, "compiled_step": compiled_step.enabled(),
              "kernel_ms_per_token": kernel_s * 1e3, "weight_mb_per_token": weight_bytes / 1e6,
              "outside_us_per_layer": (token_s - kernel_s) / layers * 1e6 if layers else None,
              "decode_threads": g.stats.as_dict().get("decode_threads")}
    return {"load_s": load_s, "prefill_s": g.stats.prefill_seconds, "decode_s": g.stats.decode_seconds,
            "tokens": g.token_ids, "notes": notes, "decode_split": decode}


def run_transformers(args: argparse.Namespace, prompt: list[int]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=getattr(torch, args.hf_dtype)).eval()
    load_s = time.perf_counter() - t0
    cache = {}

    def prefill(ids: list[int]) -> int:
        out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        cache["past"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def step(token: int) -> int:
        out = model(torch.tensor([[token]]), past_key_values=cache["past"], use_cache=True)
        cache["past"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    with torch.inference_mode():
        timed_generation(prefill, step, prompt[:WARMUP_PROMPT], WARMUP_NEW)
        result = timed_generation(prefill, step, prompt, args.new_tokens)
    return {"load_s": load_s, **result, "notes": []}


def run_llama_cpp(args: argparse.Namespace, engine: str, prompt: list[int]) -> dict:
    import llama_cpp
    import numpy as np

    gguf_path = gguf_file(args, GGUF_TYPES[engine])
    n_batch = max(args.prompt_tokens, 512)  # the whole prompt in one batch and one micro-batch
    notes = [llama_build(llama_cpp)]
    if args.llama_buffers == "plain":
        notes.append(plain_weight_buffers(llama_cpp))
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=args.prompt_tokens + args.new_tokens + 16,
                          n_batch=n_batch, n_ubatch=n_batch, n_threads=args.threads, n_threads_batch=args.threads,
                          verbose=False)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def last_logits_argmax() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(logits.argmax())

    def prefill(ids: list[int]) -> int:
        llm.reset()
        llm.eval(ids)
        return last_logits_argmax()

    def step(token: int) -> int:
        llm.eval([token])
        return last_logits_argmax()

    timed_generation(prefill, step, prompt[:WARMUP_PROMPT], WARMUP_NEW)
    result = timed_generation(prefill, step, prompt, args.new_tokens)
    return {"load_s": load_s, **result, "notes": notes}


def llama_build(llama_cpp) -> str:
    """Which llama.cpp ran and the CPU features its build uses (llama_print_system_info). Another build, e.g. one
    compiled on the host with `CMAKE_ARGS=... pip install --target DIR llama-cpp-python`, runs with
    PYTHONPATH=DIR (docs/benchmarks.md shows one without AMX, which crashes on the Intel guest)."""
    features = " ".join(llama_cpp.llama_print_system_info().decode().split())
    return f"llama-cpp-python from {Path(llama_cpp.__file__).parent}: {features}"


def plain_weight_buffers(llama_cpp) -> str:
    """Have llama.cpp keep its weights in plain CPU buffers (model parameter use_extra_bufts = false: no AMX and
    no repacked Q4_0 / Q8_0 layouts; its AVX-512 / AVX2 Q4_0 x Q8_0 dot products on the file's blocks). With
    llama-cpp-python 0.3.36 on an Intel Xeon with AMX (a KVM guest), both extra buffer types end the process with
    a segmentation fault at the first eval; this is what runs there. A note says so: it is not llama.cpp at its
    fastest on such a host."""
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params  # what llama_cpp.Llama calls
    return "llama.cpp weights in plain CPU buffers, no AMX or repacked layouts (--llama-buffers plain)"


def engine_files(args: argparse.Namespace, engine: str) -> list[Path]:
    """The weight files an engine reads: its GGUF, or the safetensors shards of its folder."""
    if engine in GGUF_TYPES:
        return [gguf_file(args, GGUF_TYPES[engine]).resolve()]
    folder = args.offload_store if engine == "offload-store" else args.checkpoint
    return sorted(Path(folder).glob("*.safetensors"))


def preread(files: list[Path], chunk: int = 64 << 20) -> tuple[float, str | None]:
    """Read the files once, sequentially, so the engine starts on a warm page cache: on a slow disk a model that
    only just fits in RAM otherwise loads by random page faults, and that time would land in whichever phase
    touches a page first. (seconds, None), or (0, why not) when the files do not fit in the available memory."""
    total = sum(f.stat().st_size for f in files)
    available = psutil.virtual_memory().available
    if total > 0.9 * available:
        return 0.0, f"preread skipped: {total / 2**30:.1f} GiB of weights, {available / 2**30:.1f} GiB available"
    t0 = time.perf_counter()
    buffer = bytearray(chunk)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buffer):
                pass
    return time.perf_counter() - t0, None


def worker(args: argparse.Namespace) -> None:
    """Run one engine once and print its result as one JSON line."""
    engine, prompt = args.worker, random_prompt(args)
    preread_s, preread_note = 0.0, None
    if args.preread and engine != BANDWIDTH:
        preread_s, preread_note = preread(engine_files(args, engine))
    if engine in TORCH_STEP_ENGINES:  # offload.model.compiled_step reads the switch when it is first imported
        os.environ["OFFLOAD_COMPILED_STEP"] = "0"
    if engine == BANDWIDTH:
        print(RESULT_PREFIX + json.dumps({"engine": engine, "read_gbps": read_bandwidth(args.threads)}), flush=True)
        return
    if engine in OFFLOAD_EXPERTS or engine == "offload-store":
        result = run_offload(args, engine, prompt)
    elif engine == "transformers":
        result = run_transformers(args, prompt)
    else:
        result = run_llama_cpp(args, engine, prompt)
    result["prefill_tok_s"] = len(prompt) / result["prefill_s"]
    result["decode_tok_s"] = (args.new_tokens - 1) / result["decode_s"]
    result["tokens"] = [int(t) for t in result["tokens"][:AGREEMENT_TOKENS]]
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["preread_s"] = preread_s
    if preread_note:
        result["notes"].append(preread_note)
    print(RESULT_PREFIX + json.dumps({"engine": engine, **result}), flush=True)


# ---------------------------------------------------------------- parent side: engines, rounds, summary


def random_prompt(args: argparse.Namespace) -> list[int]:
    """The same seeded random token ids for every engine."""
    vocab = json.loads((args.checkpoint / "config.json").read_text())["vocab_size"]
    rng = random.Random(args.seed)
    return [rng.randrange(vocab) for _ in range(args.prompt_tokens)]


def gguf_file(args: argparse.Namespace, qtype: str) -> Path:
    dense = f"-dense-{args.gguf_dense}" if args.gguf_dense else ""
    return args.gguf_dir / f"{args.checkpoint.name}-{qtype}{dense}.gguf"


def available_engines(args: argparse.Namespace) -> list[str]:
    """The requested engines that can run here, with one line for each that is skipped and why."""
    engines = []
    for engine in args.engines:
        if engine == "offload-store" and args.offload_store is None:
            if args.engines_given:
                print("skip offload-store: give --offload-store PATH")
            continue
        if engine in GGUF_TYPES and importlib.util.find_spec("llama_cpp") is None:
            print(f"skip {engine}: llama_cpp is not importable (pip install llama-cpp-python builds it from source)")
            continue
        if engine in GGUF_TYPES and importlib.util.find_spec("gguf") is None:
            print(f"skip {engine}: the gguf package is missing for tools/gguf_export.py (pip install gguf)")
            continue
        if engine == "transformers" and importlib.util.find_spec("transformers") is None:
            print("skip transformers: not installed (pip install transformers)")
            continue
        engines.append(engine)
    return engines


def export_ggufs(args: argparse.Namespace, engines: list[str]) -> dict[str, float]:
    """Write the GGUF files the llama.cpp engines need (reused when newer than the checkpoint); seconds each. An
    engine whose export fails is removed from `engines`, with the exporter's reason."""
    seconds = {}
    source_time = max(p.stat().st_mtime for p in args.checkpoint.iterdir())
    for engine in list(engines):
        if engine not in GGUF_TYPES:
            continue
        out = gguf_file(args, GGUF_TYPES[engine])
        if out.exists() and out.stat().st_mtime > source_time:
            continue
        args.gguf_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(Path(__file__).with_name("gguf_export.py")), str(args.checkpoint), str(out),
                   "--type", GGUF_TYPES[engine], "--quiet"]
        if args.gguf_dense:
            command += ["--dense-type", args.gguf_dense]
        print(f"exporting {out} ...", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(command, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            print(f"skip {engine}: tools/gguf_export.py failed: {reason}")
            engines.remove(engine)
            continue
        seconds[engine] = time.perf_counter() - t0
    return seconds


def worker_command(args: argparse.Namespace, engine: str) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), str(args.checkpoint), "--worker", engine,
               "--threads", str(args.threads), "--decode-threads", str(args.decode_threads),
               "--prompt-tokens", str(args.prompt_tokens),
               "--new-tokens", str(args.new_tokens), "--seed", str(args.seed), "--dense", str(args.dense),
               "--offload-dtype", args.offload_dtype, "--hf-dtype", args.hf_dtype, "--gguf-dir", str(args.gguf_dir)]
    if args.preread:
        command.append("--preread")
    if args.gguf_dense:
        command += ["--gguf-dense", args.gguf_dense]
    command += ["--llama-buffers", args.llama_buffers]
    if args.offload_store is not None:
        command += ["--offload-store", str(args.offload_store)]
    return command


def run_worker(args: argparse.Namespace, engine: str) -> dict:
    """One (round, engine) in a fresh process: its result, or {"engine", "error"} with the end of its output."""
    proc = subprocess.run(worker_command(args, engine), capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    hint = ""
    if proc.returncode < 0 and engine in GGUF_TYPES and args.llama_buffers == "default":
        hint = (f" (llama.cpp killed by signal {-proc.returncode}; where its AMX or repacked weight buffers crash, "
                "as on an Intel AMX host with llama-cpp-python 0.3.36, --llama-buffers plain runs it without them)")
    return {"engine": engine, "error": f"exit code {proc.returncode}{hint}: " + "\n".join(tail)}


# A round's probes agree when the fastest read at most this many times the slowest's GB/s: the memory system held
# still through the round, so its engines read from the same one. On the shared hosts this is measured on, a burst
# (probes at 55-67 GB/s where the others read 27-36) lasts about as long as an engine's run.
STEADY_SPREAD = 1.25


def steady(readings: list[float]) -> bool:
    """Whether a round's probe readings agree (STEADY_SPREAD); False with fewer than two."""
    return len(readings) >= 2 and max(readings) <= STEADY_SPREAD * min(readings)


def round_bandwidth(probes: list[dict]) -> tuple[list[float], float | None]:
    """A round's probes (two before it, one after each engine): the GB/s of those that measured one, and their
    median, the round's read bandwidth (None where none did)."""
    readings = [p["read_gbps"] for p in probes if p.get("read_gbps")]
    return readings, statistics.median(readings) if readings else None


def floor_share(weight_mb_per_token: float, read_gbps: float, decode_s: float, steps: int) -> float:
    """The bandwidth floor of a token (its weight bytes over the read bandwidth) over the measured time per token."""
    return weight_mb_per_token * 1e6 / (read_gbps * 1e9) / (decode_s / steps)


def add_floor_share(result: dict, read_gbps: float | None, steps: int, readings: list[float]) -> None:
    """The round's read bandwidth, the probe readings it is the median of, and the share of the bandwidth floor into
    an offload result's decode split."""
    split = result.get("decode_split")
    if split is None or not read_gbps:
        return
    split["read_gbps"] = read_gbps
    split["read_probes_gbps"] = readings
    split["floor_share"] = floor_share(split["weight_mb_per_token"], read_gbps, result["decode_s"], steps)


def same_bytes_gguf(formats: dict | None) -> str | None:
    """The GGUF type holding exactly the bytes of offload's formats (int8 = Q8_0's 34 bytes per 32 weights, int4s =
    Q4_0's 18, on experts and dense matrices alike), None where no GGUF type does (int4's offsets, bf16, mixed)."""
    same = {"int8": "q8_0", "int4s": "q4_0"}
    if not formats or formats.get("experts") != formats.get("dense"):
        return None
    return same.get(formats.get("experts"))


def add_peer_floor_shares(round_results: dict[str, dict], read_gbps: float | None, steps: int) -> None:
    """Each llama.cpp result's share of the round's bandwidth floor, where an offload engine of the same round read
    exactly its bytes (same_bytes_gguf): the floor belongs to the weights, not the engine, so the offload engine's
    weight bytes per token are the llama.cpp engine's too. 1 / that share is the most any engine can be faster than
    it on this round's bandwidth."""
    if not read_gbps:
        return
    for engine, result in round_results.items():
        if engine not in GGUF_TYPES or "decode_s" not in result:
            continue
        twin = next((r["decode_split"] for r in round_results.values() if "decode_split" in r
                     and same_bytes_gguf(r["decode_split"].get("formats")) == GGUF_TYPES[engine]), None)
        if twin is not None:
            result["floor_share"] = floor_share(twin["weight_mb_per_token"], read_gbps, result["decode_s"], steps)


def median_of(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def agreement(tokens: list[int], reference: list[int]) -> int:
    """How many leading tokens two greedy generations share."""
    n = 0
    while n < min(len(tokens), len(reference)) and tokens[n] == reference[n]:
        n += 1
    return n


def thread_steps(counts: dict[str, int] | None) -> str:
    """"2: 120, 1: 7" (decode steps run at each thread count), "-" where the engine does not say."""
    return ", ".join(f"{n}: {steps}" for n, steps in counts.items()) if counts else "-"


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Medians per engine over its successful rounds."""
    reference = next((r["tokens"] for r in runs.get("transformers", []) if "tokens" in r), None)
    summary = {}
    for engine, results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            continue
        summary[engine] = {
            "prefill_tok_s": median_of(ok, "prefill_tok_s"), "decode_tok_s": median_of(ok, "decode_tok_s"),
            "load_s": median_of(ok, "load_s"), "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ok),
            "rounds": len(ok),
            "agree_with_transformers": agreement(ok[0]["tokens"], reference) if reference is not None else None,
        }
        shares = [r["floor_share"] for r in ok if "floor_share" in r]
        if shares:  # a llama.cpp engine's, over the rounds that had a same-bytes offload engine
            summary[engine]["floor_shares"] = shares
        if "decode_split" in ok[0]:  # the split of the median round by decode speed: its figures belong together
            middle = sorted(ok, key=lambda r: r["decode_tok_s"])[(len(ok) - 1) // 2]
            summary[engine]["decode_split"] = {**middle["decode_split"], "decode_tok_s": middle["decode_tok_s"]}
    return summary


def round_ratios(runs: dict[str, list[dict]], num: str, den: str, metric: str,
                 steady_only: bool = False) -> list[float]:
    """num / den in every round both engines ran in (with steady_only, only rounds whose probes agreed: `steady`):
    the same-minute ratio, which the host's drift between rounds does not move as it moves each engine's median."""
    return [a[metric] / b[metric] for a, b in zip(runs.get(num, []), runs.get(den, []))
            if "error" not in a and "error" not in b
            and (not steady_only or (a.get("probes_steady") and b.get("probes_steady")))]


def ratios(summary: dict[str, dict], runs: dict[str, list[dict]]) -> dict[str, dict]:
    """RATIOS' ratios, and each offload engine's against the llama.cpp engine of the same bytes (same_bytes_gguf:
    a store's formats are known only once it ran): per label, the ratio of the engines' medians, the ratio in each
    round both ran in, the median of those (None where they never ran in the same round), and the ratios and their
    median over the rounds whose probes agreed (`steady`)."""
    pairs, fixed = list(RATIOS), {pair[1:] for pair in RATIOS}
    for engine, s in summary.items():
        gguf = same_bytes_gguf(s.get("decode_split", {}).get("formats"))
        peer = next((name for name, qtype in GGUF_TYPES.items() if qtype == gguf and name in summary), None)
        if peer is not None:
            pairs += [(f"{engine} / {peer} {kind} (same bytes)", engine, peer, metric)
                      for kind, metric in (("decode", "decode_tok_s"), ("prefill", "prefill_tok_s"))
                      if (engine, peer, metric) not in fixed]
    values = {}
    for label, num, den, metric in pairs:
        if num in summary and den in summary:
            by_round = round_ratios(runs, num, den, metric)
            steady_rounds = round_ratios(runs, num, den, metric, steady_only=True)
            values[label] = {"of_medians": summary[num][metric] / summary[den][metric], "by_round": by_round,
                             "median_by_round": statistics.median(by_round) if by_round else None,
                             "steady_by_round": steady_rounds,
                             "median_steady": statistics.median(steady_rounds) if steady_rounds else None}
    return values


def print_report(args: argparse.Namespace, summary: dict[str, dict], ratio_values: dict[str, dict]) -> None:
    print(f"\n# {args.checkpoint.name}: prompt {args.prompt_tokens} tokens, decode {args.new_tokens} tokens, "
          f"{args.threads} threads, offload dense {args.dense}, transformers {args.hf_dtype}, "
          f"median of {args.rounds} interleaved rounds")
    print(f"| engine | prefill tok/s | decode tok/s | load s | peak RSS GB | first tokens = transformers "
          f"(of {min(AGREEMENT_TOKENS, args.new_tokens)}) |\n|---|---|---|---|---|---|")
    for engine, s in summary.items():
        agree = "-" if s["agree_with_transformers"] is None else s["agree_with_transformers"]
        print(f"| {engine} | {s['prefill_tok_s']:.1f} | {s['decode_tok_s']:.2f} | {s['load_s']:.2f} | "
              f"{s['peak_rss_bytes'] / 1e9:.2f} | {agree} |")
    split = {engine: s["decode_split"] for engine, s in summary.items() if "decode_split" in s}
    if split:  # the round with the median decode speed
        print("\n| engine | kernel ISA tier | decode threads: steps | decode ms/token | in kernels ms | "
              "outside kernels us/layer | kernel weight MB/token | read GB/s | % of bandwidth floor |\n"
              "|---|---|---|---|---|---|---|---|---|")
        for engine, d in split.items():
            outside, bw, floor = (("-" if d.get(k) is None else f"{d[k] * scale:.{digits}f}")
                                  for k, scale, digits in (("outside_us_per_layer", 1, 0), ("read_gbps", 1, 1),
                                                           ("floor_share", 100, 0)))
            print(f"| {engine} | {d['isa_tier']} | {thread_steps(d.get('decode_threads'))} | "
                  f"{1e3 / d['decode_tok_s']:.2f} | {d['kernel_ms_per_token']:.2f} | {outside} | "
                  f"{d['weight_mb_per_token']:.1f} | {bw} | {floor}% |")
        print("\nEngine crossovers each offload engine dispatched by (rows per expert from which torch's matmul "
              "runs instead of the fused kernel; csrc_py/crossover.py):")
        for engine, d in split.items():
            chosen = ", ".join(f"{label} {'never' if c['rows_per_expert'] is None else c['rows_per_expert']} "
                               f"({c['source']})" for label, c in d.get("crossovers", {}).items())
            print(f"- {engine} ({d['isa_tier']}): {chosen or 'none dispatched'}")
    peers = {engine: s["floor_shares"] for engine, s in summary.items() if "floor_shares" in s}
    if peers:
        print("\nllama.cpp's share of the same bandwidth floor (its GGUF holds the same-bytes offload engine's "
              "weights: the same bytes a token; each round's own read probes), and so how much faster than it an "
              "engine reading at the probes' rate can be:")
        for engine, shares in peers.items():
            share = statistics.median(shares)
            rounds = ", ".join(f"{100 * x:.0f}%" for x in shares)
            print(f"- {engine}: {100 * share:.0f}% of the floor (rounds: {rounds}): at most {1 / share:.2f}x")
    if ratio_values:
        print(f"\n| ratio | of the medians | by round | median by round | median of the steady rounds (probes within "
              f"{STEADY_SPREAD}x) |\n|---|---|---|---|---|")
        for label, r in ratio_values.items():
            by_round = " / ".join(f"{x:.2f}" for x in r["by_round"]) or "-"
            median = "-" if r["median_by_round"] is None else f"{r['median_by_round']:.2f}x"
            calm = ("none steady" if r["median_steady"] is None else
                    f"{r['median_steady']:.2f}x ({len(r['steady_by_round'])} of {len(r['by_round'])})")
            print(f"| {label} | {r['of_medians']:.2f}x | {by_round} | {median} | {calm} |")


def environment() -> dict:
    versions = {}
    for package in ("torch", "transformers", "llama-cpp-python", "gguf", "numba"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"python": platform.python_version(), "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "versions": versions}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="Hugging Face checkpoint folder (config.json + safetensors)")
    parser.add_argument("--engines", default=None, help=f"comma list of {', '.join(ALL_ENGINES)} "
                        "(default: all available but llama.cpp-f16)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-threads", default="auto",
                        help="offload.load decode_threads= (auto: measured while decoding, up to --threads)")
    parser.add_argument("--seed", type=int, default=0, help="of the random prompt")
    parser.add_argument("--dense", default="matched", choices=["matched", "bf16", "int8", "int4", "int4s", "None"],
                        help="offload's dense format (matched: as its experts; None: offload's default)")
    parser.add_argument("--offload-dtype", default="auto", help="offload.load dtype= (auto: float32 on the CPU)")
    parser.add_argument("--kv-cache", default=None, choices=["float32", "bf16"],
                        help="offload.load kv_cache= (default: not passed, the model dtype; llama.cpp's is F16)")
    parser.add_argument("--offload-store", type=Path, default=None, help="a pre-quantized offload store to add")
    parser.add_argument("--hf-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--gguf-dir", type=Path, default=None, help="where the GGUF files are cached "
                        "(default: CHECKPOINT-gguf beside the checkpoint)")
    parser.add_argument("--gguf-dense", default=None, choices=["f16", "q8_0", "q4_0"],
                        help="GGUF format of the non-expert matrices (default: as the experts)")
    parser.add_argument("--llama-buffers", default="default", choices=["default", "plain"],
                        help="plain: llama.cpp's weights in plain CPU buffers, without its AMX and repacked "
                             "layouts (both crash on an Intel AMX host; see plain_weight_buffers)")
    parser.add_argument("--json", type=Path, default=None, help="write every round and the summary here")
    parser.add_argument("--preread", action="store_true",
                        help="each worker first reads its engine's weight files sequentially (untimed, reported as "
                             "preread_s) when they fit in the available memory: for models near the RAM size on a "
                             "slow disk, where loading by page faults would otherwise dominate")
    parser.add_argument("--worker", default=None, choices=(*ALL_ENGINES, BANDWIDTH), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dense = None if args.dense == "None" else args.dense
    args.gguf_dir = args.gguf_dir or args.checkpoint.parent / f"{args.checkpoint.name}-gguf"
    args.engines_given = args.engines is not None
    args.engines = args.engines.split(",") if args.engines else list(DEFAULT_ENGINES)
    unknown = sorted(set(args.engines) - set(ALL_ENGINES))
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {', '.join(ALL_ENGINES)}")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2: decode speed needs a decode step")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    engines = available_engines(args)
    export_seconds = export_ggufs(args, engines)
    runs: dict[str, list[dict]] = {engine: [] for engine in engines}
    for round_index in range(args.rounds):  # interleaved: every engine once per round
        probes = [run_worker(args, BANDWIDTH) for _ in range(2)]  # with one after each engine: 3 or more probes
        # odd rounds run the engines in reverse (A B, B A, A B, ...): each engine is first as often as last, and
        # the engine at a round's boundary runs twice in a row, on the page cache it left
        round_results = {}
        for engine in engines if round_index % 2 == 0 else engines[::-1]:
            result = round_results[engine] = run_worker(args, engine)
            runs[engine].append(result)
            probes.append(run_worker(args, BANDWIDTH))
            status = result.get("error") or (f"prefill {result['prefill_tok_s']:.1f} tok/s, "
                                             f"decode {result['decode_tok_s']:.2f} tok/s")
            print(f"round {round_index + 1}/{args.rounds} {engine}: {status}", flush=True)
            for note in result.get("notes", []) if round_index == 0 else []:
                print(f"  note: {note}")
        readings, read_gbps = round_bandwidth(probes)
        calm = steady(readings)
        print(f"round {round_index + 1}/{args.rounds} read probes: "
              f"{', '.join(f'{x:.1f}' for x in readings) or 'none'} GB/s"
              + (f" (median {read_gbps:.1f}; {'steady' if calm else 'unsteady'})" if read_gbps else ""), flush=True)
        for result in round_results.values():
            result["probes_steady"] = calm
        for failed in (p for p in probes if "error" in p):
            print(f"  read probe failed: {failed['error']}")
        for engine, result in round_results.items():
            add_floor_share(result, read_gbps, args.new_tokens - 1, readings)
            if "floor_share" in result.get("decode_split", {}):
                d = result["decode_split"]
                print(f"round {round_index + 1}/{args.rounds} {engine}: {d['isa_tier']}; {100 * d['floor_share']:.0f}% "
                      f"of the bandwidth floor, {d['kernel_ms_per_token']:.2f} ms/token in kernels; decode threads: "
                      f"steps {thread_steps(d.get('decode_threads'))}", flush=True)
        add_peer_floor_shares(round_results, read_gbps, args.new_tokens - 1)
        for engine, result in round_results.items():
            if "floor_share" in result:
                print(f"round {round_index + 1}/{args.rounds} {engine}: {100 * result['floor_share']:.0f}% of the "
                      "bandwidth floor (the same bytes as offload's)", flush=True)
    summary = summarize(runs)
    ratio_values = ratios(summary, runs)
    print_report(args, summary, ratio_values)
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                    if k not in ("worker", "engines_given")}
        args.json.write_text(json.dumps({"settings": settings, "environment": environment(),
                                         "gguf_export_seconds": export_seconds, "runs": runs, "summary": summary,
                                         "ratios": ratio_values}, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

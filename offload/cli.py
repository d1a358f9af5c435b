"""The `offload` command. This module only parses arguments and delegates; errors become one red line, exit 2."""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Optional, get_type_hints

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

from . import __version__
from .errors import OffloadError, io_error_line

if TYPE_CHECKING:
    from .api import Model
    from .generate import GenerationRun

app = typer.Typer(add_completion=True, no_args_is_help=True,
                  help="Run large sparse MoE language models on one workstation.")
err = Console(stderr=True, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)
DEBUG = {"on": False}


def _version(value: bool) -> None:
    if value:
        out.print(f"offload {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
) -> None:
    DEBUG["on"] = debug


def print_error(error: OffloadError) -> None:
    """One red line; the traceback instead with --debug (call it while handling the error)."""
    if DEBUG["on"]:
        err.print_exception()
    else:
        err.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)


def user_errors(command: Callable) -> Callable:
    """Turn offload's errors and I/O errors (a full disk, a read-only folder, a missing file) into one red line
    and exit code 2, Ctrl-C into exit code 130; tracebacks only with --debug."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except OffloadError as error:
            if DEBUG["on"]:
                raise
            print_error(error)
            raise typer.Exit(2) from None
        except OSError as error:
            if DEBUG["on"]:
                raise
            print_error(OffloadError(io_error_line(error)))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[red]interrupted[/red]")
            raise typer.Exit(130) from None

    return run


def _load_option(default: Any, help: str, **option: Any) -> Any:
    """A LoadOptions field and its --option. `option` goes to typer.Option (e.g. min=1); for a choice, annotate
    the field with a Literal of the values."""
    return field(default=default, metadata={"option": typer.Option(default, help=help, **option)})


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model: one field per command-line option, shared by every command that loads one, and
    passed to offload.load() as keyword arguments. A new load option is one more field here."""

    device: str = _load_option("auto", "auto | cpu | cuda[:N]")
    max_context: Optional[int] = _load_option(
        None, "Tokens of context to allocate the cache for, prompt and reply together (default: the model's "
              "position limit, at most 4096).")
    experts: Optional[Literal["bf16", "int8", "int4", "int4s"]] = _load_option(
        None, "Host format of routed experts run by the CPU workers; int4s is symmetric int4 at Q4_0's bytes "
              "(default: torch on the device tier when "
              "everything fits; when offloading, the device dtype, so placement never changes the numbers).")
    cpu_threads: Optional[int] = _load_option(None, "Threads for the CPU workers and torch (default: physical cores).",
                                              min=1)
    decode_threads: str = _load_option(
        "auto", "Threads of a CPU-only decode step: auto measures cpu-threads against fewer while generating and "
                "keeps the fastest as the host's load changes; a number fixes it.")
    gpu_memory: Optional[str] = _load_option(
        None, "Device memory budget, e.g. 12GiB (default: free GPU memory; without a GPU, simulates a device of "
              "this size).")
    plan: Optional[Path] = _load_option(None, "Placement plan JSON to use (from `offload plan` or `offload profile`).")
    cache_policy: Literal["lru", "lfu"] = _load_option("lru", "Expert cache eviction policy.")
    prefetch: Optional[bool] = _load_option(
        None, "Copy the experts a decode step ran on the CPU into cache slots for the next step (default: where "
              "the copy and CPU-expert times measured at load say it pays).")
    profile: Optional[Path] = _load_option(
        None, "profile.json from `offload profile`: its routing heat gives prefetch's hit-rate estimate until the "
              "run measures one.")
    prefill_chunk: Optional[int] = _load_option(
        None, "Tokens per prefill forward; a longer prompt runs in chunks (default 512, raised to the cost model's "
              "stream threshold on a device tier).", min=1)
    dense: Optional[Literal["bf16", "int8", "int4", "int4s"]] = _load_option(
        None, "Format of attention, dense MLPs, shared experts and the LM head: int8 | int4 | int4s quantized (torch's "
              "int8/int4 matmuls on a device tier, the CPU kernels on the CPU alone), bf16 the model dtype "
              "(default: on a device tier the plan's choice, the model dtype while it fits; on the CPU alone "
              "torch, or a converted store's format, the only one a store takes there).")
    slots: Optional[Literal["bf16", "int8", "int4", "int4s"]] = _load_option(
        None, "Format of the routed experts held on the device tier (pinned experts and cache slots): int8 | int4 | "
              "int4s quantized rows (torch's int8/int4 matmuls), bf16 the model dtype (default: the plan's choice, "
              "the model dtype while it leaves top-k slots per MoE layer, then int8, then int4).")
    kv_cache: Optional[Literal["float32", "bf16"]] = _load_option(
        None, "Dtype of the KV cache (MLA: the latent cache): bf16 halves its memory and what a CPU decode step reads "
              "from it, and rounds the cached values to bf16 (default: the model dtype, float32 on the CPU).")
    cuda_graphs: Optional[bool] = _load_option(
        None, "Replay each layer's attention, norm and router of a decode step from a CUDA graph per context "
              "bucket (default: on with a CUDA device; --no-cuda-graphs runs the steps eagerly).")


def with_load_options(command: Callable) -> Callable:
    """Give a command every LoadOptions field as an --option; the command receives them as `load_options`."""
    types = get_type_hints(LoadOptions)
    extra = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.metadata["option"],
                               annotation=types[f.name]) for f in fields(LoadOptions)]

    @functools.wraps(command)
    def run(*args, **kwargs):
        options = LoadOptions(**{p.name: kwargs.pop(p.name) for p in extra})
        return command(*args, load_options=options, **kwargs)

    signature = inspect.signature(command)
    own = [p for p in signature.parameters.values() if p.name != "load_options"]
    run.__signature__ = signature.replace(parameters=own + extra)  # what typer reads the options from
    return run


def load_model(path: Path, options: LoadOptions, progress: bool) -> Model:
    """offload.load() with a progress bar on stderr when `progress` (the bar disappears once loaded)."""
    from . import load
    from .weights.checkpoint import Checkpoint

    if not progress:
        return load(path, **asdict(options))
    columns = (TextColumn("loading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[file]}"))
    with Progress(*columns, console=err, transient=True) as bar:
        # The total from the headers now: the kernels compile before the first tensor is read.
        task = bar.add_task("load", total=Checkpoint(path).nbytes(), file="")

        def on_progress(done: int, total: int, file_name: str) -> None:
            bar.update(task, completed=done, total=total, file=file_name)

        return load(path, on_progress=on_progress, **asdict(options))


def _print_stream(run: GenerationRun) -> None:
    """Print the pieces as they come, then the stats line; Ctrl-C stops the run and exits 130 after both."""
    from .chat import SCREEN_SAFE, stats_line

    try:
        for piece in run:
            out.print(piece.translate(SCREEN_SAFE), end="", markup=False, highlight=False)
            sys.stdout.flush()
    except KeyboardInterrupt:
        run.close()
    out.print()
    err.print(f"[dim]{stats_line(run.result)}[/dim]", highlight=False)
    _exit_if_interrupted(run)


def _exit_if_interrupted(run: GenerationRun) -> None:
    if run.result.finish_reason == "interrupted":
        err.print("[red]interrupted[/red]")
        raise typer.Exit(130)


MODEL_ARGUMENT = typer.Argument(..., metavar="MODEL", help="Hugging Face checkpoint folder.")


@app.command()
@user_errors
def demo(
    prompt: str = typer.Option("What is a list comprehension?", help="The user message."),
    max_new_tokens: int = typer.Option(96, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="Sampling temperature (0: greedy)."),
    top_k: int = typer.Option(40, help="0 = off."),
    repetition_penalty: float = typer.Option(
        1.3, help="1.0 = off; the small demo model repeats itself without one."),
    seed: int = typer.Option(0, help="Sampling seed."),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:N]"),
    experts: Optional[Literal["bf16", "int8", "int4", "int4s"]] = typer.Option(
        None, help="Run the routed experts on the CPU workers in this format."),
    path: bool = typer.Option(False, "--path", help="Print the demo model's folder (e.g. for offload chat) and exit."),
) -> None:
    """Ask the built-in demo model a question: a small MoE trained on Python's documentation, shipped with offload
    (no download). `offload chat "$(offload demo --path)"` talks to it."""
    from . import load
    from .demo import demo_model

    folder = demo_model()
    if path:
        out.print(str(folder), markup=False)
        return
    model = load(folder, device=device, max_context=1024, experts=experts)
    err.print(f"[dim]demo model: {model.config.model_type}, {model.config.num_hidden_layers} layers, "
              f"{model.config.router.num_experts} experts top-{model.config.router.top_k}, trained on Python's "
              f"documentation; on {model.device}[/dim]")
    err.print(f"[dim]{sampling_line(temperature, top_k, repetition_penalty)}[/dim]", highlight=False)
    out.print(f"[bold]user:[/bold] {escape(prompt)}\n[bold]assistant:[/bold] ", end="")
    _print_stream(model.chat_stream([{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_k=top_k, repetition_penalty=repetition_penalty,
                                    seed=seed))


def sampling_line(temperature: float, top_k: int, repetition_penalty: float) -> str:
    """How the demo samples, said once, since its defaults are not the other commands'."""
    how = "greedy" if temperature == 0 else f"temperature {temperature:g}"
    return (f"sampling: {how}, top-k {top_k or 'off'}, repetition penalty {repetition_penalty:g} "
            "(--temperature, --top-k and --repetition-penalty change them)")


@app.command()
@user_errors
@with_load_options
def generate(
    model_path: Path = MODEL_ARGUMENT,
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt text."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt from a file."),
    prompt_ids: Optional[str] = typer.Option(
        None, "--prompt-ids", help="The prompt as token ids, e.g. 1,2,3 (for checkpoints without a tokenizer)."),
    max_new_tokens: int = typer.Option(128, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_k: int = typer.Option(0, help="0 = off."),
    top_p: float = typer.Option(1.0, help="1.0 = off."),
    repetition_penalty: float = typer.Option(1.0, help="1.0 = off."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    ignore_eos: bool = typer.Option(False, help="Keep going past end-of-sequence tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print text, token ids, finish reason and stats as JSON."),
    *,
    load_options: LoadOptions,
) -> None:
    """Complete a prompt and print the completion."""
    from .checks import check_request, model_config, parse_token_ids, prompt_token_ids, resolve_max_context

    if sum(given is not None for given in (prompt, prompt_file, prompt_ids)) != 1:
        raise OffloadError("give exactly one of --prompt TEXT, --prompt-file FILE or --prompt-ids 1,2,3")
    if prompt_file is not None:
        try:
            prompt = prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or "not UTF-8 text"
            message = f"cannot read --prompt-file {prompt_file}: {reason}; pass a readable text file"
            raise OffloadError(message) from None
    config = model_config(model_path)  # everything below is checked before a weight is read
    ids = parse_token_ids(prompt_ids) if prompt_ids is not None else prompt_token_ids(model_path, prompt)
    check_request(ids, config, resolve_max_context(config, load_options.max_context), max_new_tokens,
                  temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed)
    model = load_model(model_path, load_options, progress=err.is_terminal)
    run = model.stream(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty=repetition_penalty, seed=seed, stop=stop, ignore_eos=ignore_eos)
    if not as_json:
        _print_stream(run)
        return
    try:
        for _ in run:
            pass
    except KeyboardInterrupt:
        run.close()  # the partial result is printed all the same, with finish_reason "interrupted"
    g = run.result
    out.print_json(json.dumps({"text": g.text, "token_ids": g.token_ids, "finish_reason": g.finish_reason,
                               "stats": g.stats.as_dict()}))
    _exit_if_interrupted(run)


@app.command()
@user_errors
@with_load_options
def chat(
    model_path: Path = MODEL_ARGUMENT,
    system: Optional[str] = typer.Option(None, "--system", help="System prompt, kept however long the chat gets."),
    temperature: float = typer.Option(0.7, help="0 = greedy."),
    top_p: float = typer.Option(0.9, help="1.0 = off."),
    top_k: int = typer.Option(0, help="0 = off."),
    repetition_penalty: float = typer.Option(1.0, help="1.0 = off (offload demo uses 1.3)."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop string ending a reply (repeatable)."),
    max_new_tokens: int = typer.Option(512, help="Most tokens per reply; the history is trimmed to leave room."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling (each reply starts from it)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Send one message, print the reply and leave."),
    transcript: Optional[Path] = typer.Option(
        None, "--transcript", help="Save the conversation to this file after every reply (default: a new file in "
                                   "~/.local/share/offload/chats; with --prompt, only when given)."),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Continue a saved conversation (from /save or the autosave); later turns are saved "
                               "to it unless --transcript says otherwise."),
    *,
    load_options: LoadOptions,
) -> None:
    """Chat with a model through its chat template. /help lists the commands; Ctrl-C stops a reply; the
    conversation is saved after every reply."""
    from .chat import (ChatLoop, ChatSession, default_transcript_path, model_summary, prepare_transcript_path,
                       read_transcript, require_chat_template, terminal_input)
    from .checks import check_chat

    require_chat_template(model_path)
    check_chat(model_path, load_options.max_context, max_new_tokens, system, prompt, temperature=temperature,
               top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, seed=seed)
    saved = read_transcript(resume) if resume is not None else None
    if transcript is None and (prompt is None or resume is not None):
        transcript = resume or default_transcript_path()
    if transcript is not None:
        transcript = prepare_transcript_path(transcript)
    model = load_model(model_path, load_options, progress=err.is_terminal)
    session = ChatSession(lambda messages: len(model.chat_prompt(messages)), model.max_context, max_new_tokens, system)
    if saved is not None:
        session.restore(saved if system is None else replace(saved, system=system))
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    repetition_penalty=repetition_penalty, stop=stop, seed=seed)
    loop = ChatLoop(model, session, sampling, out, err, terminal_input(), print_error, echo=not sys.stdin.isatty(),
                    transcript=transcript)
    if prompt is not None:
        if loop.once(prompt).finish_reason == "interrupted":
            raise typer.Exit(130)
        return
    err.print(f"[dim]{model_summary(model)}[/dim]", highlight=False)
    if saved is not None:
        turns = len(session.turns)
        err.print(f"[dim]resumed {turns} turn{'' if turns == 1 else 's'} from {resume}[/dim]", highlight=False)
    err.print(f"[dim]/help for commands; /exit, Ctrl-D or Ctrl-C twice to leave; the conversation is saved to "
              f"{transcript} after every reply[/dim]", highlight=False)
    loop.run()


@app.command()
@user_errors
@with_load_options
def serve(
    model_path: Path = MODEL_ARGUMENT,
    host: str = typer.Option("127.0.0.1", help="Address to listen on; 0.0.0.0 serves every interface (then set "
                                               "--api-key)."),
    port: int = typer.Option(8000, help="Port to listen on.", min=1, max=65535),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="OFFLOAD_API_KEY",
        help="Require 'Authorization: Bearer KEY' on /v1/* and /metrics (also read from OFFLOAD_API_KEY)."),
    max_waiting: int = typer.Option(
        8, help="Requests that may wait behind the one generating; the next gets HTTP 429.", min=0),
    name: Optional[str] = typer.Option(None, help="Model id the API reports (default: the folder's name)."),
    *,
    load_options: LoadOptions,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models) with
    a chat page at /, /health and /metrics. One sequence at a time; a prompt sharing a prefix with the previous
    one reuses its cache."""
    from .checks import model_config
    from .server import ServerOptions, check_address, serve as run_server

    model_config(model_path)  # a broken folder fails before anything else
    if api_key is not None and not api_key.strip():
        raise OffloadError("--api-key is empty; give a key, or leave the option out to serve without one")
    check_address(host, port)
    model = load_model(model_path, load_options, progress=err.is_terminal)
    options = ServerOptions(name or model.path.name, max_waiting, api_key)
    shown = f"[{host}]" if ":" in host else host
    open_to_others = not api_key and host not in ("127.0.0.1", "localhost", "::1")
    err.print(f"[dim]serving {options.model_name} on http://{shown}:{port} (chat page at /, OpenAI API at /v1)"
              f"{'; no --api-key: anyone who can reach this address can use it' if open_to_others else ''}[/dim]",
              highlight=False)
    run_server(model, options, host, port)


@app.command()
@user_errors
def convert(
    model_path: Path = MODEL_ARGUMENT,
    out_dir: Path = typer.Argument(..., metavar="OUT", help="Folder for the converted checkpoint (created)."),
    experts: Optional[Literal["int4", "int4s", "int8", "bf16"]] = typer.Option(
        None, help="Packed format of the routed experts; int4s is symmetric int4, Q4_0's bytes (default for a "
                   "quantized checkpoint: the format its "
                   "quantization maps onto, see `offload inspect`; required otherwise)."),
    dense: Literal["bf16", "int8", "int4", "int4s"] = typer.Option(
        "bf16", help="Packed format of the dense weights (attention, dense MLPs, shared experts, LM head) for "
                     "CPU-only runs; bf16 keeps them as the source stores them."),
) -> None:
    """Write a pre-quantized copy of a checkpoint that loads with no quantization step (memory-mapped).
    Streams one matrix at a time; run it again after an interruption to resume."""
    from .weights.checkpoint import Checkpoint
    from .weights.store import convert as convert_checkpoint, store_formats

    columns = (TextColumn("converting"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
               TimeRemainingColumn(), TextColumn("{task.fields[file]}"))
    resumed = [0]
    with Progress(*columns, console=err, transient=not err.is_terminal) as bar:
        task = bar.add_task("convert", total=_store_shards(model_path), file="")

        def on_shard(done: int, total: int, file_name: str, was_finished: bool) -> None:
            resumed[0] += was_finished
            bar.update(task, completed=done, total=total, file=file_name)

        folder = convert_checkpoint(model_path, out_dir, experts, dense, on_shard=on_shard)
    if resumed[0]:
        err.print(f"[dim]resumed: kept {resumed[0]} shards a previous run had finished[/dim]")
    formats = store_formats(Checkpoint(folder))
    out.print(f"wrote {folder} (experts {formats.experts}, dense {formats.dense}); load it like any checkpoint: "
              f"offload chat {folder}", markup=False)


@contextlib.contextmanager
def _counting_bar(unit: str, description: str, total: int) -> Iterator[tuple[Progress, int]]:
    """A transient bar on stderr counting `unit` (prompts, runs); hidden when stderr is not a terminal."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
               TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        yield bar, bar.add_task(description, total=total)


def _store_shards(model_path: Path) -> int | None:
    """How many shards `convert` writes, for its bar: one per decoder layer and one for the rest (as
    store.shard_roles). None where config.json cannot tell; convert then reports what is wrong."""
    from .weights.checkpoint import read_json

    try:
        layers = read_json(model_path / "config.json").get("num_hidden_layers")
    except OffloadError:
        return None
    return layers + 1 if isinstance(layers, int) else None


@app.command("inspect")
@user_errors
def inspect_(
    model_path: Path = MODEL_ARGUMENT,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Describe a checkpoint and what its weights cost per expert format, without loading any weight."""
    from .inspect import describe, render

    report = describe(model_path)
    if as_json:
        out.print_json(json.dumps(report))
    else:
        render(report, out)


@app.command("plan")
@user_errors
def plan_(
    model_path: Path = MODEL_ARGUMENT,
    gpu_memory: Optional[str] = typer.Option(None, help="Device budget, e.g. 12GiB (default: free GPU memory)."),
    host_memory: Optional[str] = typer.Option(
        None, help="RAM to plan for, e.g. 256GiB (default: the RAM available now; set it to size another machine)."),
    max_context: Optional[int] = typer.Option(
        None, help="Context the KV cache is sized for (default: the model's position limit, at most 4096)."),
    experts: Optional[Literal["bf16", "int8", "int4", "int4s"]] = typer.Option(
        None, help="Host format of offloaded experts (default: the device dtype, as when loading)."),
    dense: Optional[Literal["bf16", "int8", "int4", "int4s"]] = typer.Option(
        None, help="Device tier format of attention, dense MLPs, shared experts and the LM head (default: the "
                   "device dtype while it leaves room for a cache slot per MoE layer, then int8, then int4)."),
    slots: Optional[Literal["bf16", "int8", "int4", "int4s"]] = typer.Option(
        None, help="Format of the routed experts held on the device tier, pinned and cached (default: the device "
                   "dtype while it leaves top-k slots per MoE layer, then int8, then int4)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:N] (decides the device dtype)."),
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = typer.Option(
        "auto", help="Device dtype to plan for (auto: bfloat16 on a GPU, float32 on the CPU; bfloat16 plans for a "
                     "GPU from a machine without one)."),
    kv_cache: Optional[Literal["float32", "bf16"]] = typer.Option(
        None, help="KV cache dtype to plan for, as when loading (default: the device dtype)."),
    profile: Optional[Path] = typer.Option(None, help="profile.json from `offload profile`: pin the hottest experts."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="Write the plan as JSON to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON instead of a table."),
) -> None:
    """Show where every weight group and expert would live for a device budget, without loading any weight."""
    from . import plan as make
    from .experts.cost import prefetch_outlook
    from .profiling import read_heat

    placement = make(model_path, gpu_memory=gpu_memory, max_context=max_context, experts=experts, device=device,
                     dtype=dtype, heat=read_heat(profile) if profile else None, host_memory=host_memory, dense=dense,
                     slots=slots, kv_cache=kv_cache)
    if out_file is not None:
        placement.save(out_file)
        err.print(f"[dim]wrote {out_file}[/dim]")
    if as_json:
        out.print(placement.to_json(), markup=False)
    else:
        out.print(placement.table() + "\n\n" + prefetch_outlook(placement.copies_possible,
                                                                placement.expert_host_bytes), markup=False)


@app.command()
@user_errors
@with_load_options
def profile(
    model_path: Path = MODEL_ARGUMENT,
    prompts: Path = typer.Option(..., "--prompts", help="Text file with one prompt per line (blank lines skipped)."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for profile.json, plan.json and the heat map "
                                                    "(created if missing)."),
    max_new_tokens: int = typer.Option(32, help="Tokens to generate per prompt (eos is ignored)."),
    *,
    load_options: LoadOptions,
) -> None:
    """Record routing heat, hit rates and time per component; write a profile, a tuned plan and a heat map."""
    from .checks import check_profile_prompts
    from .profiling import (check_profile_args, have_matplotlib, heatmap_text, make_out_dir, read_prompts, render,
                            run_profile, write_profile)

    texts = read_prompts(prompts)
    check_profile_args(model_path, load_options.device, load_options.gpu_memory, load_options.plan, max_new_tokens,
                       texts)
    check_profile_prompts(model_path, texts, max_new_tokens, load_options.max_context)
    make_out_dir(out_dir)  # a folder that cannot be made fails now, not after the runs
    with _counting_bar("prompts", "profiling", len(texts)) as (bar, task):
        def on_prompt(plan_name: str, done: int, total: int) -> None:
            bar.update(task, description=f"{plan_name} plan", completed=done, total=total)

        result = run_profile(model_path, texts, max_new_tokens, on_step=lambda step: err.print(f"[dim]{step}[/dim]"),
                             on_prompt=on_prompt, **asdict(load_options))
    written = write_profile(result, out_dir)
    render(result, out)
    if not have_matplotlib():
        out.print(heatmap_text(result.heat, result.moe_layers))
    err.print(f"[dim]wrote {', '.join(str(path) for path in written)}[/dim]", highlight=False)


@app.command()
@user_errors
@with_load_options
def bench(
    model_path: Path = MODEL_ARGUMENT,
    prompt_tokens: int = typer.Option(128, help="Prompt length (random token ids from a fixed seed)."),
    gen_tokens: int = typer.Option(64, help="Tokens to generate per run (eos is ignored)."),
    repeat: int = typer.Option(3, help="Measured runs; the table shows medians."),
    warmup: int = typer.Option(1, help="Unmeasured runs first."),
    seed: int = typer.Option(0, help="Seed of the random prompt."),
    as_json: bool = typer.Option(False, "--json", help="Print medians and every run's stats as JSON."),
    *,
    load_options: LoadOptions,
) -> None:
    """Measure prefill and decode tokens/s."""
    from .bench import check_bench_args, render, run_bench
    from .checks import check_bench

    check_bench_args(prompt_tokens, gen_tokens, repeat, warmup)
    check_bench(model_path, prompt_tokens, gen_tokens, load_options.max_context)
    model = load_model(model_path, load_options, progress=err.is_terminal)
    with _counting_bar("runs (warm-up included)", "benchmarking", warmup + repeat) as (bar, task):
        result = run_bench(model, prompt_tokens, gen_tokens, repeat, warmup, seed,
                           on_run=lambda done, total: bar.update(task, completed=done))
    if as_json:
        out.print_json(json.dumps(result.as_dict()))
    else:
        render(result, out)


if __name__ == "__main__":
    app()

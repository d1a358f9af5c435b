"""The `offload` command. This module only parses arguments and delegates; errors become one red line, exit 2."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

from . import __version__
from .errors import OffloadError

app = typer.Typer(add_completion=True, no_args_is_help=True, help="Run large sparse MoE language models on one workstation.")
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


def user_errors(command: Callable) -> Callable:
    """Turn offload's errors (and Ctrl-C) into one red line and exit code 2; tracebacks only with --debug."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except OffloadError as error:
            if DEBUG["on"]:
                raise
            err.print(f"[red]error:[/red] {error}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[red]interrupted[/red]")
            raise typer.Exit(130) from None

    return run


def _print_stream(run) -> None:
    for piece in run:
        out.print(piece, end="", markup=False)
        sys.stdout.flush()
    out.print()
    stats = run.result.stats
    err.print(f"[dim]{stats.generated_tokens} tokens, prefill {stats.prefill_tokens_per_s:.1f} tok/s, "
              f"decode {stats.decode_tokens_per_s:.1f} tok/s, finish: {run.result.finish_reason}[/dim]")


@app.command()
@user_errors
def demo(
    prompt: str = typer.Option("Tell me about mixture-of-experts models.", help="The user message."),
    max_new_tokens: int = typer.Option(48, help="Tokens to generate."),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:N]"),
) -> None:
    """Build (once) and run the built-in demo model: a small MoE with RANDOM weights, so its text is gibberish."""
    from . import load
    from .demo import demo_checkpoint

    folder = demo_checkpoint()
    err.print(f"[yellow]demo model at {folder}: random weights — the output is not meant to make sense; "
              "it shows the whole pipeline running with no download.[/yellow]")
    model = load(folder, device=device, max_context=1024)
    err.print(f"[dim]{model.config.model_type}: {model.config.num_hidden_layers} layers, "
              f"{model.config.router.num_experts} experts top-{model.config.router.top_k}, on {model.device}[/dim]")
    out.print(f"[bold]user:[/bold] {prompt}\n[bold]assistant:[/bold] ", end="")
    _print_stream(model.chat_stream([{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens,
                                    ignore_eos=True))


@app.command()
@user_errors
def generate(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="Hugging Face checkpoint folder."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt text."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt from a file."),
    max_new_tokens: int = typer.Option(128, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_k: int = typer.Option(0, help="0 = off."),
    top_p: float = typer.Option(1.0, help="1.0 = off."),
    repetition_penalty: float = typer.Option(1.0, help="1.0 = off."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    ignore_eos: bool = typer.Option(False, help="Keep going past end-of-sequence tokens."),
    max_context: int = typer.Option(4096, help="Context length to allocate the cache for."),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:N]"),
    as_json: bool = typer.Option(False, "--json", help="Print text, token ids, finish reason and stats as JSON."),
) -> None:
    """Complete a prompt and print the completion."""
    from . import load

    if (prompt is None) == (prompt_file is None):
        raise OffloadError("give exactly one of --prompt TEXT or --prompt-file FILE")
    if prompt_file is not None:
        try:
            prompt = prompt_file.read_text()
        except OSError as error:
            raise OffloadError(f"cannot read --prompt-file {prompt_file}: {error.strerror}") from None
    model = load(model_path, device=device, max_context=max_context)
    run = model.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty=repetition_penalty, seed=seed, stop=stop, ignore_eos=ignore_eos)
    if not as_json:
        _print_stream(run)
        return
    for _ in run:
        pass
    g = run.result
    out.print_json(json.dumps({"text": g.text, "token_ids": g.token_ids, "finish_reason": g.finish_reason,
                               "stats": g.stats.as_dict()}))


if __name__ == "__main__":
    app()

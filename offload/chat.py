"""Chat: a conversation trimmed to the model's context, its slash commands, and the terminal loop around it.

History trimming keeps the system prompt and drops the oldest user/assistant turns until the next prompt plus
max_new_tokens fits max_context. A reply stopped with Ctrl-C stays in the history as far as it got, unmarked, so
the model sees exactly what the user saw.
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.console import Console
from rich.table import Table

from .api import Model
from .errors import ContextLengthError, OffloadError
from .files import write_json_atomic
from .generate import Generation
from .tokenizer import Tokenizer

Message = dict[str, str]
CountTokens = Callable[[list[Message]], int]  # prompt tokens of messages, chat template and generation prompt included

USER_PROMPT, CONTINUATION_PROMPT = "you> ", "...> "
BLOCK_FENCE = '"""'
COMMANDS = {
    "/help": "show this help",
    "/reset": "forget the conversation (the system prompt stays)",
    "/stats": "show the last reply's statistics",
    "/plan": "show where the weights and experts live (the placement plan)",
    "/save FILE": "write the conversation to FILE as JSON",
    "/exit": "leave (Ctrl-D and Ctrl-C at the prompt leave too)",
}
# Control characters in a reply (an escape sequence could clear or retitle the terminal) are shown as U+FFFD;
# the history keeps the text as generated.
SCREEN_SAFE = {code: "\ufffd" for code in [*range(0, 9), 11, 12, *range(14, 32), 127]}
INPUT_HELP = (f'End a line with \\ to continue the message on the next line, or put {BLOCK_FENCE} alone on a line to '
              "start and end a multi-line block. Start a message with // to send a leading /. Ctrl-C stops a reply.")


def turns_to_drop(fixed_tokens: int, turn_tokens: Sequence[int], budget: int) -> int | None:
    """How many of the oldest turns to drop so that fixed_tokens (system prompt and new message) plus the kept
    turns fit in budget tokens: the fewest that do, or None when the fixed part alone does not fit."""
    if fixed_tokens > budget:
        return None
    kept, dropped = sum(turn_tokens), 0
    while fixed_tokens + kept > budget:
        kept -= turn_tokens[dropped]
        dropped += 1
    return dropped


class MessageReader:
    """Assembles one message from input lines: a line ending in a backslash continues on the next line, and a
    line holding only three double quotes opens a block that runs to the next such line."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._in_block = False

    @property
    def continuing(self) -> bool:
        """True while a message is half-read: the next line belongs to it."""
        return self._in_block or bool(self._lines)

    def feed(self, line: str) -> str | None:
        """Take one line; return the message once it is complete, else None."""
        if self._in_block:
            if line.strip() == BLOCK_FENCE:
                return self._finish()
            self._lines.append(line)
            return None
        if line.strip() == BLOCK_FENCE and not self._lines:
            self._in_block = True
            return None
        if line.endswith("\\"):
            self._lines.append(line[:-1])
            return None
        self._lines.append(line)
        return self._finish()

    def _finish(self) -> str:
        text = "\n".join(self._lines)
        self._lines, self._in_block = [], False
        return text


@dataclass(frozen=True)
class Command:
    name: str  # e.g. "/save"
    argument: str = ""


def parse_command(text: str) -> Command | None:
    """The slash command in a one-line message, or None when the message is for the model."""
    if not text.startswith("/") or text.startswith("//") or "\n" in text:
        return None
    name, _, argument = text.strip().partition(" ")
    if name not in {usage.split()[0] for usage in COMMANDS}:
        raise OffloadError(f"unknown command {name}; /help lists the commands (start with // to send a leading /)")
    return Command(name, argument.strip())


def message_text(text: str) -> str:
    """What is sent for a message: a leading // stands for a literal /."""
    return text[1:] if text.startswith("//") else text


@dataclass
class Turn:
    user: str
    assistant: str
    tokens: int  # what the turn adds to the prompt, as measured when it was added


class ChatSession:
    """One conversation: the system prompt and user/assistant turns, trimmed to fit the context."""

    def __init__(self, count_tokens: CountTokens, max_context: int, max_new_tokens: int, system: str | None = None):
        self.count_tokens = count_tokens
        self.max_context, self.max_new_tokens = max_context, max_new_tokens
        self.system = system
        self.turns: list[Turn] = []
        self.last: Generation | None = None  # the last reply, for /stats

    @property
    def budget(self) -> int:
        """Prompt tokens allowed: the context minus room for a full reply."""
        return self.max_context - self.max_new_tokens

    def messages(self, turns: Sequence[Turn] | None = None, user: str | None = None) -> list[Message]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        body = []
        for turn in self.turns if turns is None else turns:
            body += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.assistant}]
        tail = [] if user is None else [{"role": "user", "content": user}]
        return head + body + tail

    def prompt(self, user: str) -> tuple[list[Message], int]:
        """The messages to send for a new user message, and how many old turns were dropped to make them fit.

        Trimming plans with the turns' measured token counts, then checks the exact count of the prompt, since
        a chat template may render a turn differently once it is no longer the latest one."""
        fixed = self.count_tokens(self.messages([], user))
        dropped = turns_to_drop(fixed, [t.tokens for t in self.turns], self.budget)
        if dropped is None:
            raise ContextLengthError(
                f"this message makes a {fixed}-token prompt{' with the system prompt' if self.system else ''}; "
                f"with room for max_new_tokens={self.max_new_tokens} it does not fit max_context={self.max_context}. "
                "Shorten it, lower --max-new-tokens or raise --max-context"
            )
        while dropped < len(self.turns) and self.count_tokens(self.messages(self.turns[dropped:], user)) > self.budget:
            dropped += 1
        del self.turns[:dropped]
        return self.messages(user=user), dropped

    def add_turn(self, user: str, reply: Generation) -> None:
        turn = Turn(user, reply.text, tokens=0)
        turn.tokens = self.count_tokens(self.messages([*self.turns, turn])) - self.count_tokens(self.messages())
        self.turns.append(turn)
        self.last = reply

    def reset(self) -> None:
        self.turns.clear()
        self.last = None

    def to_json(self) -> dict[str, Any]:
        return {"messages": self.messages()}


def stats_line(generation: Generation, hit_rate: float | None = None) -> str:
    """The dim line after each reply; `hit_rate` is the expert cache's (device-resident share of expert uses)."""
    s = generation.stats
    tokens = f"{s.generated_tokens} token{'' if s.generated_tokens == 1 else 's'}"
    cache = f", expert hit rate {hit_rate:.0%}" if hit_rate is not None else ""
    return (f"{tokens}, prefill {s.prefill_tokens_per_s:.1f} tok/s, "
            f"decode {s.decode_tokens_per_s:.1f} tok/s{cache}, finish: {generation.finish_reason}")


def stats_table(generation: Generation) -> Table:
    s = generation.stats
    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column()
    for key, value in [
        ("prompt tokens", str(s.prompt_tokens)),
        ("prefill", f"{s.prefill_seconds:.3f} s, {s.prefill_tokens_per_s:.1f} tok/s"),
        ("generated tokens", str(s.generated_tokens)),
        ("decode", f"{s.decode_seconds:.3f} s, {s.decode_tokens_per_s:.1f} tok/s"),
        ("finish", generation.finish_reason),
    ]:
        table.add_row(key, value)
    return table


def model_summary(model: Model) -> str:
    cfg, r = model.config, model.config.router
    return (f"{cfg.model_type}: {cfg.num_hidden_layers} layers ({cfg.num_moe_layers} MoE), {r.num_experts} experts "
            f"top-{r.top_k}, {'MLA' if cfg.mla else 'GQA'} attention, on {model.device}, "
            f"max_context {model.max_context}\n{placement_summary(model)}")


def placement_summary(model: Model) -> str:
    """One line: where the weights went."""
    plan = model.plan
    if plan is None:
        where = "on the CPU workers as " + model.load_info.expert_format if model.load_info.expert_format else \
            f"on {model.device} with the rest of the model"
        return f"all routed experts {where}"
    pinned = sum(len(l.pinned) for l in plan.layers)
    slots = sum(l.cache_slots for l in plan.layers)
    return (f"device {plan.device_bytes / 2**20:.1f} MiB of {plan.device_budget / 2**20:.1f} MiB "
            f"({pinned} experts pinned, {slots} cache slots), host {plan.host_bytes / 2**20:.1f} MiB of experts as "
            f"{plan.expert_format}")


def require_chat_template(folder: Path) -> None:
    """Fail before any weight is read when the checkpoint cannot chat: loading a large model takes minutes."""
    if Tokenizer.from_dir(folder.expanduser()).chat_template is None:
        raise OffloadError(f"{folder} has no chat template (tokenizer_config.json or chat_template.jinja); "
                           "use `offload generate` for plain prompts")


def terminal_input() -> Callable[[str], str]:
    """input(), with line editing and history when a terminal is attached and readline exists."""
    if sys.stdin.isatty() and importlib.util.find_spec("readline") is not None:
        importlib.import_module("readline")  # importing it is what hooks line editing into input()
    return input


class ChatLoop:
    """The interactive conversation: reads messages, runs commands, streams replies.

    I/O comes in through read_line and goes out through two consoles, so tests can drive it without a terminal.
    """

    def __init__(self, model: Model, session: ChatSession, sampling: dict[str, Any], out: Console, err: Console,
                 read_line: Callable[[str], str], show_error: Callable[[OffloadError], None], echo: bool = False):
        self.model, self.session, self.sampling = model, session, sampling
        self.out, self.err = out, err
        self.read_line, self.show_error = read_line, show_error
        self.echo = echo  # print what was read, for transcripts of piped input

    def run(self) -> None:
        """Until /exit, end of input or Ctrl-C at the prompt."""
        reader = MessageReader()
        while True:
            try:
                line = self.read_line(CONTINUATION_PROMPT if reader.continuing else USER_PROMPT)
            except (EOFError, KeyboardInterrupt):
                self.out.print()
                return
            if self.echo:
                self.out.print(line, markup=False, highlight=False)
            text = reader.feed(line)
            if text is None or not text.strip():
                continue
            try:
                if not self.handle(text):
                    return
            except OffloadError as error:
                self.show_error(error)
            except KeyboardInterrupt:
                self.err.print("[yellow]interrupted[/yellow]")

    def handle(self, text: str) -> bool:
        """Act on one message or command; False when the user asked to leave."""
        command = parse_command(text)
        if command is None:
            self.reply(message_text(text), header=True)
        elif command.name == "/exit":
            return False
        elif command.name == "/help":
            self.print_help()
        elif command.name == "/reset":
            self.session.reset()
            self.err.print("[dim]conversation cleared[/dim]")
        elif command.name == "/plan":
            self.out.print(self.model.plan.table() if self.model.plan else placement_summary(self.model),
                           markup=False, highlight=False)
        elif command.name == "/stats":
            if self.session.last is None:
                raise OffloadError("no reply yet; /stats shows the last reply's statistics")
            self.out.print(stats_table(self.session.last))
        elif command.name == "/save":
            if not command.argument:
                raise OffloadError("/save needs a file name: /save FILE")
            path = Path(command.argument)
            write_json_atomic(path, {"model": str(self.model.path), **self.session.to_json()})
            turns = len(self.session.turns)
            self.err.print(f"[dim]saved {turns} turn{'' if turns == 1 else 's'} to {path}[/dim]", highlight=False)
        return True

    def reply(self, text: str, header: bool = False) -> Generation:
        """Stream the model's reply to text. Ctrl-C stops it; what was produced so far stays in the history."""
        messages, dropped = self.session.prompt(text)
        if dropped:
            self.err.print(f"[yellow]dropped the {dropped} oldest turn{'s' if dropped > 1 else ''} to fit "
                           f"max_context={self.session.max_context} (the system prompt is kept)[/yellow]")
        run = self.model.chat_stream(messages, **self.sampling)
        if header:
            self.out.print("[bold]assistant>[/bold] ", end="")
        shown = 0  # characters of the reply on screen
        try:
            for piece in run:
                self._write(piece)
                shown += len(piece)
        except KeyboardInterrupt:
            run.result.finish_reason = "interrupted"
            # Ctrl-C can land between a piece being produced and printed: show all that the history keeps.
            self._write(run.result.text[shown:])
        self.out.print()
        self.session.add_turn(text, run.result)
        hit_rate = self.model.stats()["totals"]["hit_rate"]
        self.err.print(f"[dim]{stats_line(run.result, hit_rate)}[/dim]", highlight=False)
        return run.result

    def _write(self, text: str) -> None:
        # Straight to the file, not through rich: Ctrl-C can land anywhere in Python code, and a plain write is
        # one call, so it never leaves half a piece printed or the console's buffer in a half-updated state.
        self.out.file.write(text.translate(SCREEN_SAFE))
        self.out.file.flush()

    def print_help(self) -> None:
        table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
        for usage, what in COMMANDS.items():
            table.add_row(usage, what)
        self.out.print(table)
        self.out.print(INPUT_HELP, markup=False, highlight=False)

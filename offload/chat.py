"""Chat: a conversation trimmed to the model's context, its slash commands, and the terminal loop around it.

History trimming keeps the system prompt and takes the oldest user/assistant turns out of the prompt until the
next prompt plus max_new_tokens fits max_context; the transcript keeps every turn, and is saved after each one.
A reply stopped with Ctrl-C stays in the history as far as it got, unmarked, so the model sees exactly what the
user saw.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

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
LEAVE_WINDOW = 1.0  # seconds: a second Ctrl-C within this leaves the chat
COMMANDS = {
    "/help": "show this help",
    "/reset": "start afresh: the model forgets the conversation (the system prompt stays; the transcript keeps all)",
    "/stats": "show the last reply's statistics",
    "/plan": "show where the weights and experts live (the placement plan)",
    "/save FILE": "write the whole conversation to FILE as JSON",
    "/load FILE": "continue a conversation saved by /save or autosaved (later turns are saved to FILE)",
    "/exit": "leave (so do Ctrl-D, and Ctrl-C twice within a second)",
}
# Control characters in a reply (an escape sequence could clear or retitle the terminal) are shown as U+FFFD;
# the history keeps the text as generated.
SCREEN_SAFE = {code: "\ufffd" for code in [*range(0, 9), 11, 12, *range(14, 32), 127]}
INPUT_HELP = (f'End a line with \\ to continue the message on the next line, or put {BLOCK_FENCE} alone on a line to '
              "start and end a multi-line block. Start a message with // to send a leading /. Ctrl-C stops a reply "
              "or clears the line; the conversation is saved after every reply.")


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


@dataclass(frozen=True)
class Transcript:
    """A saved conversation: the system prompt, every (user, assistant) turn, and where the prompt starts."""
    system: str | None
    turns: list[tuple[str, str]]
    context_start: int = 0  # the turns before it are kept here but no longer sent (trimmed, or /reset)


class ChatSession:
    """One conversation: the system prompt and every user/assistant turn, of which the prompt holds those from
    `context_start` on. Trimming to fit the context and /reset move that start forward; no turn is ever deleted,
    so a saved conversation is always the whole of it."""

    def __init__(self, count_tokens: CountTokens, max_context: int, max_new_tokens: int, system: str | None = None):
        self.count_tokens = count_tokens
        self.max_context, self.max_new_tokens = max_context, max_new_tokens
        self.system = system
        self.turns: list[Turn] = []  # the transcript: every turn, in order
        self.context_start = 0  # index of the first turn still in the prompt
        self.last: Generation | None = None  # the last reply, for /stats

    @property
    def budget(self) -> int:
        """Prompt tokens allowed: the context minus room for a full reply."""
        return self.max_context - self.max_new_tokens

    @property
    def context_turns(self) -> list[Turn]:
        """The turns the model sees."""
        return self.turns[self.context_start:]

    def messages(self, turns: Sequence[Turn] | None = None, user: str | None = None) -> list[Message]:
        """The prompt's messages: the system prompt, `turns` (default: the context turns), then `user`."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        body = []
        for turn in self.context_turns if turns is None else turns:
            body += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.assistant}]
        tail = [] if user is None else [{"role": "user", "content": user}]
        return head + body + tail

    def prompt(self, user: str) -> tuple[list[Message], int]:
        """The messages to send for a new user message, and how many old turns were taken out of the prompt to
        make them fit.

        Trimming plans with the turns' measured token counts, then checks the exact count of the prompt, since
        a chat template may render a turn differently once it is no longer the latest one."""
        context = self.context_turns
        fixed = self.count_tokens(self.messages([], user))
        dropped = turns_to_drop(fixed, [t.tokens for t in context], self.budget)
        if dropped is None:
            raise ContextLengthError(
                f"this message makes a {fixed}-token prompt{' with the system prompt' if self.system else ''}; "
                f"with room for max_new_tokens={self.max_new_tokens} it does not fit max_context={self.max_context}. "
                "Shorten it, lower --max-new-tokens or raise --max-context"
            )
        while dropped < len(context) and self.count_tokens(self.messages(context[dropped:], user)) > self.budget:
            dropped += 1
        self.context_start += dropped
        return self.messages(user=user), dropped

    def add_turn(self, user: str, reply: Generation) -> None:
        self._append(user, reply.text)
        self.last = reply

    def _append(self, user: str, assistant: str) -> None:
        turn = Turn(user, assistant, tokens=0)
        turn.tokens = self.count_tokens(self.messages([*self.context_turns, turn])) - self.count_tokens(self.messages())
        self.turns.append(turn)

    def reset(self) -> None:
        """The model forgets the conversation; the transcript keeps it."""
        self.context_start = len(self.turns)
        self.last = None

    def restore(self, transcript: Transcript) -> None:
        """Continue a saved conversation: its turns become this session's, measured with this model's template."""
        self.system, self.turns, self.context_start, self.last = transcript.system, [], 0, None
        for user, assistant in transcript.turns[:transcript.context_start]:
            self.turns.append(Turn(user, assistant, tokens=0))  # out of the prompt: never measured
        self.context_start = len(self.turns)
        for user, assistant in transcript.turns[transcript.context_start:]:
            self._append(user, assistant)

    def to_json(self) -> dict[str, Any]:
        """Every message (the system prompt first, then each turn's user and assistant messages), and
        context_start: how many of the turns are no longer sent to the model."""
        return {"messages": self.messages(self.turns), "context_start": self.context_start}


def parse_transcript(data: Any, source: str) -> Transcript:
    """A Transcript from the JSON /save and the autosave write; `source` names it in errors."""
    fix = "pass a file written by /save or by the chat's autosave"
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise OffloadError(f"{source} holds no list of messages with a role and a content; {fix}")
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    body = messages[1:] if system is not None else messages
    roles = [m["role"] for m in body]
    if roles != ["user", "assistant"] * (len(body) // 2):
        raise OffloadError(f"{source}: after the optional system message the messages must alternate user, "
                           f"assistant (found {', '.join(roles[:6])}{', ...' if len(roles) > 6 else ''}); {fix}")
    turns = [(body[i]["content"], body[i + 1]["content"]) for i in range(0, len(body), 2)]
    start = data.get("context_start", 0)
    if not isinstance(start, int) or not 0 <= start <= len(turns):
        raise OffloadError(f"{source}: context_start must be a turn index from 0 to {len(turns)}, got {start!r}; "
                           f"{fix}")
    return Transcript(system, turns, start)


def read_transcript(path: Path) -> Transcript:
    """A saved conversation; one clear error for a file that is missing, unreadable or not one."""
    try:
        data = json.loads(path.expanduser().read_text(encoding="utf-8"))
    except OSError as error:
        raise OffloadError(f"cannot read {path}: {error.strerror or error}; pass a conversation saved by the "
                           "chat") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise OffloadError(f"{path} is not JSON ({error}); pass a conversation saved by the chat") from None
    return parse_transcript(data, str(path))


def default_transcript_path(now: float | None = None) -> Path:
    """Where a chat is autosaved unless --transcript says otherwise: the user's data folder, one file a session."""
    base = os.environ.get("XDG_DATA_HOME") or "~/.local/share"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return Path(base).expanduser() / "offload" / "chats" / f"chat-{stamp}-{os.getpid()}.json"


def prepare_transcript_path(path: Path) -> Path:
    """Check (before any weight is read) that the transcript can be written: its folder is made if missing."""
    path = path.expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OffloadError(f"cannot make {path.parent} for the chat transcript: {error.strerror or error}; pass "
                           "--transcript FILE in a writable folder") from None
    if path.is_dir() or not os.access(path.parent, os.W_OK):
        raise OffloadError(f"cannot write the chat transcript to {path}; pass --transcript FILE in a writable "
                           "folder")
    return path


def save_transcript(path: Path, model_path: Path, session: ChatSession) -> None:
    """Write the whole conversation atomically (a temporary file renamed over `path`, with the mode of any new
    file), so an interrupted save never leaves a broken one."""
    write_json_atomic(path, {"model": str(model_path), **session.to_json()})


class CtrlC:
    """Ctrl-C in the chat. Inside `armed()` (reading a line, generating a reply) it raises KeyboardInterrupt;
    anywhere else (adding a turn, saving the transcript, printing) it waits for the next armed section, so it
    never leaves the conversation half-updated and is never lost. Two presses in a row (no line read between
    them) within LEAVE_WINDOW seconds mean leave: from then on every armed section raises at once."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.leaving = False
        self._armed = False
        self._pending = False  # a press that landed outside an armed section
        self._last_press: float | None = None

    def on_signal(self, signum: int, frame: object) -> None:
        now = self.clock()
        if self._last_press is not None and now - self._last_press <= LEAVE_WINDOW:
            self.leaving = True
        self._last_press = now
        if self._armed:
            raise KeyboardInterrupt
        self._pending = True

    def line_read(self) -> None:
        """A line was typed: a press before it and one after it are not a pair."""
        self._last_press = None

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        if self._pending or self.leaving:
            self._pending = False
            raise KeyboardInterrupt
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handle SIGINT while the chat runs (main thread only, as Python's signal handlers are)."""
        previous = signal.signal(signal.SIGINT, self.on_signal)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def stats_line(generation: Generation, hit_rate: float | None = None) -> str:
    """The dim line after each reply; `hit_rate` is the expert cache's (device-resident share of expert uses)."""
    s = generation.stats
    tokens = f"{s.generated_tokens} token{'' if s.generated_tokens == 1 else 's'}"
    cache = f", expert hit rate {hit_rate:.0%}" if hit_rate is not None else ""
    reused = f" ({s.cached_prompt_tokens} of {s.prompt_tokens} prompt tokens reused)" if s.cached_prompt_tokens else ""
    return (f"{tokens}, prefill {s.prefill_tokens_per_s:.1f} tok/s{reused}, "
            f"decode {s.decode_tokens_per_s:.1f} tok/s{cache}, finish: {generation.finish_reason}")


def stats_table(generation: Generation) -> Table:
    s = generation.stats
    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column()
    for key, value in [
        ("prompt tokens", f"{s.prompt_tokens} ({s.cached_prompt_tokens} reused from the cache)"),
        ("prefill", f"{s.prefill_seconds:.3f} s, {s.prefill_tokens_per_s:.1f} tok/s"),
        ("generated tokens", str(s.generated_tokens)),
        ("decode", f"{s.decode_seconds:.3f} s, {s.decode_tokens_per_s:.1f} tok/s"),
        *([("decode threads", ", ".join(f"{n} for {steps} step{'' if steps == 1 else 's'}"
                                        for n, steps in sorted(s.decode_threads.items(), reverse=True)))]
          if s.decode_threads else []),
        ("finish", generation.finish_reason),
    ]:
        table.add_row(key, value)
    return table


def model_summary(model: Model) -> str:
    cfg, r = model.config, model.config.router
    graphs = sum(layer.graphs is not None for layer in model.transformer.layers)
    replayed = f", CUDA graphs for {graphs} of {cfg.num_hidden_layers} layers" if graphs else ""
    return (f"{cfg.model_type}: {cfg.num_hidden_layers} layers ({cfg.num_moe_layers} MoE), {r.num_experts} experts "
            f"top-{r.top_k}, {'MLA' if cfg.mla else 'GQA'} attention, on {model.device}, "
            f"max_context {model.max_context}{replayed}\n{placement_summary(model)}")


def placement_summary(model: Model) -> str:
    """One line: where the weights went."""
    plan = model.plan
    if plan is None:
        where = "on the CPU workers as " + model.load_info.expert_format if model.load_info.expert_format else \
            f"on {model.device} with the rest of the model"
        threads = f"; decode threads {model.decode_threads.describe()}" if model.decode_threads else ""
        return f"all routed experts {where}{threads}"
    pinned = sum(len(l.pinned) for l in plan.layers)
    slots = sum(l.cache_slots for l in plan.layers)
    dense = f", dense weights {plan.dense_format}" if plan.dense_format else ""
    choice = model.prefetch
    prefetch = f"; prefetch {'on' if choice.on else 'off'}: {choice.reason}" if choice else ""
    return (f"device {plan.device_bytes / 2**20:.1f} MiB of {plan.device_budget / 2**20:.1f} MiB "
            f"({pinned} experts pinned, {slots} cache slots{dense}), host {plan.host_bytes / 2**20:.1f} MiB of "
            f"experts as {plan.expert_format}{prefetch}")


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
    """The interactive conversation: reads messages, runs commands, streams replies, and saves the whole
    conversation to `transcript` after every reply.

    I/O comes in through read_line and goes out through two consoles, so tests can drive it without a terminal.
    """

    def __init__(self, model: Model, session: ChatSession, sampling: dict[str, Any], out: Console, err: Console,
                 read_line: Callable[[str], str], show_error: Callable[[OffloadError], None], echo: bool = False,
                 transcript: Path | None = None, ctrl_c: CtrlC | None = None):
        self.model, self.session, self.sampling = model, session, sampling
        self.out, self.err = out, err
        self.read_line, self.show_error = read_line, show_error
        self.echo = echo  # print what was read, for transcripts of piped input
        self.transcript = transcript  # autosaved after every reply; None: not saved
        self.ctrl_c = ctrl_c or CtrlC()

    def run(self) -> None:
        """Until /exit, end of input or two Ctrl-C within a second; one Ctrl-C stops a reply or clears the line."""
        with self.ctrl_c.installed():
            self._converse()
        if self.transcript is not None and self.session.turns:
            self.err.print(f"[dim]the conversation is saved in {self.transcript}; --resume {self.transcript} "
                           "continues it[/dim]", highlight=False)

    def once(self, text: str) -> Generation:
        """Reply to one message (chat --prompt), with Ctrl-C handled as in a session."""
        with self.ctrl_c.installed():
            return self.reply(text)

    def _converse(self) -> None:
        reader = MessageReader()
        while not self.ctrl_c.leaving:
            try:
                with self.ctrl_c.armed():
                    line = self.read_line(CONTINUATION_PROMPT if reader.continuing else USER_PROMPT)
            except EOFError:
                self.out.print()
                return
            except KeyboardInterrupt:
                self.out.print()
                reader = MessageReader()  # a half-typed message is dropped, as a shell drops the line
                if not self.ctrl_c.leaving:
                    self.err.print("[dim]Ctrl-C again within a second, /exit or Ctrl-D to leave[/dim]")
                continue
            self.ctrl_c.line_read()
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
            self.autosave()
            self.err.print("[dim]conversation cleared (the transcript keeps it)[/dim]")
        elif command.name == "/plan":
            self.out.print(self.model.plan.table() if self.model.plan else placement_summary(self.model),
                           markup=False, highlight=False)
        elif command.name == "/stats":
            if self.session.last is None:
                raise OffloadError("no reply yet; /stats shows the last reply's statistics")
            self.out.print(stats_table(self.session.last))
        elif command.name == "/save":
            path = Path(self._file_argument(command))
            save_transcript(path, self.model.path, self.session)
            turns = len(self.session.turns)
            self.err.print(f"[dim]saved {turns} turn{'' if turns == 1 else 's'} to {path}[/dim]", highlight=False)
        elif command.name == "/load":
            path = Path(self._file_argument(command)).expanduser()
            self.session.restore(read_transcript(path))
            self.transcript = path
            turns = len(self.session.turns)
            self.err.print(f"[dim]loaded {turns} turn{'' if turns == 1 else 's'} from {path}; the conversation goes "
                           "on there[/dim]", highlight=False)
        return True

    @staticmethod
    def _file_argument(command: Command) -> str:
        if not command.argument:
            raise OffloadError(f"{command.name} needs a file name: {command.name} FILE")
        return command.argument

    def reply(self, text: str, header: bool = False) -> Generation:
        """Stream the model's reply to text. Ctrl-C stops it; what was produced so far stays in the history."""
        messages, dropped = self.session.prompt(text)
        if dropped:
            self.err.print(f"[yellow]took the {dropped} oldest turn{'s' if dropped > 1 else ''} out of the prompt to "
                           f"fit max_context={self.session.max_context} (the system prompt stays; the saved "
                           "conversation keeps every turn)[/yellow]")
        run = self.model.chat_stream(messages, **self.sampling)
        if header:
            self.out.print("[bold]assistant>[/bold] ", end="")
        shown = 0  # characters of the reply on screen
        try:
            with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C stops the reply; it is kept like any other
                while True:
                    with self.ctrl_c.armed():  # Ctrl-C lands only while the model works, never mid-print
                        piece = next(run, None)
                    if piece is None:
                        break
                    self._write(piece)
                    shown += len(piece)
        finally:
            run.close()  # stops an interrupted run (finish_reason "interrupted"); nothing once it is done
        # Ctrl-C can land between a piece being produced and printed: show all that the history keeps.
        self._write(run.result.text[shown:])
        self.out.print()
        self.session.add_turn(text, run.result)
        self.autosave()
        hit_rate = self.model.stats()["totals"]["hit_rate"]
        self.err.print(f"[dim]{stats_line(run.result, hit_rate)}[/dim]", highlight=False)
        return run.result

    def autosave(self) -> None:
        """Save the conversation to the transcript file; a failure is reported and the conversation goes on."""
        if self.transcript is None:
            return
        try:
            save_transcript(self.transcript, self.model.path, self.session)
        except OffloadError as error:
            self.show_error(error)

    def _write(self, text: str) -> None:
        # Straight to the file, not through rich: one plain write per piece, with no markup to interpret.
        self.out.file.write(text.translate(SCREEN_SAFE))
        self.out.file.flush()

    def print_help(self) -> None:
        table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
        for usage, what in COMMANDS.items():
            table.add_row(usage, what)
        self.out.print(table)
        self.out.print(INPUT_HELP, markup=False, highlight=False)

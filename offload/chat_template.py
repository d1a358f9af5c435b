"""Render a Hugging Face chat template (Jinja) the way transformers' `apply_chat_template` does.

Chat templates come from model repositories, so they are untrusted code: they run in jinja2's immutable sandbox,
with the same globals and filters transformers provides, so a template renders byte-for-byte as it does there.
The sandbox stops attribute tricks but not a template that loops for hours or builds a 10 GB string, so a render
is also bounded in time (MAX_RENDER_SECONDS) and in the size of every string or list it makes (MAX_RENDER_CHARS).
"""
from __future__ import annotations

import functools
import json
import re
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.compiler
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from offload.errors import OffloadError

# Names a message's reasoning may be passed under; templates read the first, gpt-oss templates read `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# A rendered prompt is read by a tokenizer into at most max_context tokens; 16 Mi characters is several times the
# longest context any supported model takes, so a template past it is broken or hostile, not long.
MAX_RENDER_CHARS = 1 << 24
MAX_RENDER_SECONDS = 10.0  # a real chat template renders in milliseconds
_TEMPLATE_FILE = "<template>"  # the file name jinja2 gives code compiled from a string


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    bos_token: str | None,
    eos_token: str | None,
    **extra: Any,
) -> str:
    """Render `messages` with `template`; `extra` (tools, documents, other special tokens, ...) is visible to it.

    As in transformers: message keys whose value is None are dropped, reasoning fields are aliased, and every input
    is rebuilt from plain JSON types before the sandbox sees it.
    """
    compiled = _compile(template)
    if not all(isinstance(m, dict) for m in messages):
        raise OffloadError("chat messages must be objects with 'role' and 'content'; fix the message list")
    chat = [_alias_reasoning_fields({k: v for k, v in m.items() if v is not None}) for m in _plain(messages)]
    context: dict[str, Any] = {"tools": None, "documents": None}
    # A token the tokenizer lacks stays undefined (renders as ""), as in transformers, rather than rendering "None".
    context.update({k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None})
    context.update(_plain(extra))
    try:
        with _RenderBudget(MAX_RENDER_SECONDS):
            return _render_bounded(compiled, messages=chat, add_generation_prompt=add_generation_prompt, **context)
    except _RenderLimit as e:
        raise OffloadError(f"the chat template {e}; fix or replace the template") from None
    except (RecursionError, MemoryError):
        raise OffloadError("the chat template recursed too deeply or ran out of memory; fix or replace the "
                           "template") from None
    except jinja2.TemplateError as e:
        raise OffloadError(
            f"the chat template rejected the conversation: {e} (change the messages to fit the model's chat format)"
        ) from e


class _RenderLimit(Exception):
    """A render went past MAX_RENDER_SECONDS or MAX_RENDER_CHARS; the message says which."""


def _render_bounded(compiled: jinja2.Template, **context: Any) -> str:
    """compiled.render(), but piece by piece so that the output stops growing at MAX_RENDER_CHARS."""
    pieces, size = [], 0
    for piece in compiled.generate(**context):
        size += len(piece)
        if size > MAX_RENDER_CHARS:
            raise _RenderLimit(f"renders more than {MAX_RENDER_CHARS} characters")
        pieces.append(piece)
    return "".join(pieces)


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_RENDER_CHARS:
        raise _RenderLimit(f"builds a value of more than {MAX_RENDER_CHARS} items")
    return value


def _check_int_args(args: tuple, kwargs: dict) -> None:
    """A count or width past MAX_RENDER_CHARS (ljust(10**10), center, indent ...) would build a huge string at once."""
    for value in (*args, *kwargs.values()):
        if type(value) is int and abs(value) > MAX_RENDER_CHARS:
            raise _RenderLimit(f"asks for a size of {value}, more than {MAX_RENDER_CHARS}")


class _RenderBudget:
    """Stops the template's code once `seconds` have passed.

    A loop in a template runs as Python lines of the compiled template; a trace function on those frames alone
    (jinja2's own code and C calls are not traced) counts them and reads the clock every CHECK_EVERY lines. The
    trace is per thread, and whatever tracer was set before (a debugger, coverage) is put back afterwards.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds

    CHECK_EVERY = 256  # lines between two readings of the clock

    def __enter__(self) -> None:
        self.deadline = time.monotonic() + self.seconds
        self.lines = 0
        self.previous = sys.gettrace()
        sys.settrace(self._on_call)

    def __exit__(self, *exc: Any) -> None:
        sys.settrace(self.previous)

    def _on_call(self, frame: Any, event: str, arg: Any) -> Any:
        return self._on_line if frame.f_code.co_filename == _TEMPLATE_FILE else None

    def _on_line(self, frame: Any, event: str, arg: Any) -> Any:
        self.lines += 1
        if self.lines % self.CHECK_EVERY:
            return self._on_line
        if time.monotonic() > self.deadline:
            raise _RenderLimit(f"took more than {self.seconds:g} s to render")
        return self._on_line


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # A server renders the same few templates on every request, so compiling once per template matters.
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise OffloadError(
            f"the chat template is not valid Jinja (line {e.lineno}: {e.message}); fix or replace the template"
        ) from e


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &, '), which would change what the model sees.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict` for templates without exposing the type itself (no attribute access into the class)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _BoundedCodeGenerator(jinja2.compiler.CodeGenerator):
    """Compiles `a ~ b` (string concatenation, which the sandbox does not intercept) with its result checked."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: jinja2.compiler.Frame) -> None:
        self.write("environment.checked_size(")
        super().visit_Concat(node, frame)
        self.write(")")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with operators, calls and filters that refuse to build values past MAX_RENDER_CHARS.
    Every way a template can grow a value goes through one of them, the namespace or the output."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    @staticmethod
    def checked_size(value: Any) -> Any:
        return _check_size(value)

    _WIDTH = re.compile(r"%[-#0 +]*(\d+)")  # the width in a printf-style conversion, e.g. %20s

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            count, sized = (left, right) if type(left) is int else (right, left)
            if type(count) is int and hasattr(sized, "__len__") and count * len(sized) > MAX_RENDER_CHARS:
                raise _RenderLimit(f"repeats a value to more than {MAX_RENDER_CHARS} items")
        elif operator == "**" and type(left) is int and type(right) is int and abs(left) > 1 and right > 4096:
            raise _RenderLimit(f"raises {left} to the power {right}")
        elif operator == "%" and isinstance(left, str):
            _check_int_args(right if isinstance(right, tuple) else (right,), {})
            _check_int_args(tuple(int(width) for width in self._WIDTH.findall(left)), {})
        return _check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - jinja2's names
        if isinstance(getattr(__obj, "__self__", None), str):  # 'x'.ljust(n), .center(n), .zfill(n) ...
            _check_int_args(args, kwargs)
        return _check_size(super().call(__context, __obj, *args, **kwargs))


_SIZING_FILTERS = ("center", "indent", "wordwrap", "format", "join", "replace")  # filters that can grow a string


def _bounded_filter(function: Any) -> Any:
    """A filter whose size arguments (those after the value filtered) and result are checked; functools.wraps
    keeps jinja2's pass_* markers."""

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        _check_int_args(args[1:], kwargs)
        return _check_size(function(*args, **kwargs))

    return run


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja2's namespace, refusing underscore-prefixed attributes so templates cannot reach CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same signature trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, _check_size(value))

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (used by transformers for assistant masks) and render the body.

    Templates written for training mark assistant turns this way; without the tag they would not even compile.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        # A call block, as in transformers, so variables set inside the tag are scoped the same way.
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = _BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.filters.update({name: _bounded_filter(env.filters[name]) for name in _SIZING_FILTERS})
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _alias_reasoning_fields(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _plain(value: Any) -> Any:
    """Rebuild `value` from plain JSON types; anything else becomes an inert "<TypeName>" placeholder.

    Objects handed to the sandbox keep their methods, some of which are dangerous; templates only ever need data.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"

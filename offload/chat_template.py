"""Render a Hugging Face chat template (Jinja) the way transformers' `apply_chat_template` does.

Chat templates come from model repositories, so they are untrusted code: they run in jinja2's immutable sandbox,
with the same globals and filters transformers provides, so a template renders byte-for-byte as it does there.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from offload.errors import OffloadError

# Names a message's reasoning may be passed under; templates read the first, gpt-oss templates read `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


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
        return compiled.render(messages=chat, add_generation_prompt=add_generation_prompt, **context)
    except jinja2.TemplateError as e:
        raise OffloadError(
            f"the chat template rejected the conversation: {e} (change the messages to fit the model's chat format)"
        ) from e


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
        jinja2.utils.Namespace.__setitem__(self, name, value)

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
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
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

"""The OpenAI wire format: request bodies checked into plain requests, and the response, chunk and error objects.

Pure functions over dicts: nothing here touches the model or the network. A field OpenAI defines but offload
cannot honour (n > 1, logprobs, frequency_penalty, images) is refused with a 400 that says what to send instead,
and an unknown field is refused as OpenAI refuses it, so a request is never silently answered differently from
what it asked.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]

MAX_STOP_STRINGS = 4  # as OpenAI


class RequestError(Exception):
    """A request the server refuses: HTTP status and an OpenAI-style error object."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class GenerationParams:
    """What both endpoints share: how many tokens, how to sample, where to stop, how to answer."""
    max_tokens: int | None  # None: the rest of the context
    sampling: dict[str, Any]  # Model.stream keyword arguments: temperature, top_p, top_k, seed, repetition_penalty
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    ignore_eos: bool = False  # an extension (as vLLM's and llama.cpp's servers): generate max_tokens whatever comes


@dataclass(frozen=True)
class ChatRequest:
    messages: list[Message]
    tools: list[dict[str, Any]] | None
    params: GenerationParams


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str | list[int]
    params: GenerationParams


# Fields accepted with any value and not used (they describe the caller, or choose among OpenAI's models).
IGNORED = {"model", "user", "metadata", "store", "service_tier", "parallel_tool_calls", "tool_choice"}
# Fields accepted only at the value that means "off", since offload does not implement them.
ONLY_DEFAULT: dict[str, tuple[Any, str]] = {
    "n": (1, "offload generates one choice per request; send n=1 or leave it out"),
    "best_of": (1, "offload generates one choice per request; send best_of=1 or leave it out"),
    "logprobs": (None, "offload does not return log probabilities; leave logprobs out"),
    "top_logprobs": (None, "offload does not return log probabilities; leave top_logprobs out"),
    "echo": (False, "offload does not echo the prompt; leave echo out"),
    "suffix": (None, "offload does not complete with a suffix; leave suffix out"),
    "logit_bias": (None, "offload does not apply a logit bias; leave logit_bias out"),
    "frequency_penalty": (0, "offload's sampler has a multiplicative repetition_penalty (e.g. 1.1) instead of "
                             "frequency_penalty; send that, or frequency_penalty=0"),
    "presence_penalty": (0, "offload's sampler has a multiplicative repetition_penalty (e.g. 1.1) instead of "
                            "presence_penalty; send that, or presence_penalty=0"),
}
# top_k, repetition_penalty and ignore_eos are extensions, spelled as vLLM's and llama.cpp's servers spell them.
GENERATION_FIELDS = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "repetition_penalty", "stream",
                     "stream_options", "ignore_eos"}
CHAT_FIELDS = GENERATION_FIELDS | {"messages", "max_completion_tokens", "tools", "response_format"}
COMPLETION_FIELDS = GENERATION_FIELDS | {"prompt"}


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(f"the request body is not valid JSON ({error}); send a JSON object") from None
    except RecursionError:
        raise RequestError("the request body nests too deeply; send a flatter JSON object") from None
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_chat_request(body: dict[str, Any]) -> ChatRequest:
    _check_fields(body, CHAT_FIELDS)
    messages = _require(body, "messages", list)
    if not messages:
        raise RequestError("messages is empty; send at least one message", "messages")
    tools = _optional(body, "tools", list, None)
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise RequestError("tools must be a list of objects", "tools")
    response_format = _optional(body, "response_format", dict, None)
    if response_format is not None and response_format.get("type", "text") != "text":
        raise RequestError("offload answers in plain text; leave response_format out or send {\"type\": \"text\"}",
                           "response_format")
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise RequestError("send max_completion_tokens or max_tokens, not both", "max_completion_tokens")
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return ChatRequest([_message(m, i) for i, m in enumerate(messages)], tools or None,
                       _generation_params(body, max_name))


def parse_completion_request(body: dict[str, Any]) -> CompletionRequest:
    _check_fields(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        pass  # token ids
    elif not isinstance(prompt, str) or not prompt:
        raise RequestError("prompt must be a non-empty string or a list of token ids (one prompt per request)",
                           "prompt")
    return CompletionRequest(prompt, _generation_params(body, "max_tokens"))


def _check_fields(body: dict[str, Any], known: set[str]) -> None:
    for name, value in body.items():
        if name in known or name in IGNORED:
            continue
        if name in ONLY_DEFAULT:
            default, advice = ONLY_DEFAULT[name]
            if value is not None and value != default and not (value is False and default is None):
                raise RequestError(f"{name}={json.dumps(value)} is not supported: {advice}", name)
            continue
        raise RequestError(f"unrecognized request argument supplied: {name}", name)


def _generation_params(body: dict[str, Any], max_name: str) -> GenerationParams:
    max_tokens = _optional(body, max_name, int, None)
    if max_tokens is not None and max_tokens < 1:
        raise RequestError(f"{max_name} must be at least 1, got {max_tokens}", max_name)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise RequestError("top_p must be greater than 0; use temperature=0 for greedy decoding", "top_p")
    top_k = _optional(body, "top_k", int, 0)
    if top_k < 0:
        raise RequestError(f"top_k must be 0 (off) or more, got {top_k}", "top_k")
    repetition_penalty = _number(body, "repetition_penalty", 1.0, 0.0, 10.0)
    if repetition_penalty == 0:
        raise RequestError("repetition_penalty must be greater than 0; 1.0 is off", "repetition_penalty")
    seed = _optional(body, "seed", int, None)
    if seed is not None and not -2**63 <= seed < 2**64:
        raise RequestError(f"seed must fit in 64 bits, got {seed}", "seed")
    stream = _optional(body, "stream", bool, False)
    options = _optional(body, "stream_options", dict, None) or {}
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise RequestError("stream_options.include_usage must be true or false", "stream_options")
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                    seed=seed)
    return GenerationParams(max_tokens, sampling, _stop(body.get("stop")), stream, stream and include_usage,
                            _optional(body, "ignore_eos", bool, False))


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return ()
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("stop must be a non-empty string or a list of non-empty strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"stop holds {len(stops)} strings; send at most {MAX_STOP_STRINGS}", "stop")
    return tuple(stops)


def _message(message: Any, index: int) -> Message:
    """A chat message as chat templates expect it: content as one string; tool-call arguments as objects."""
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise RequestError(f"{param} must be an object with a role and content", param)
    role = message.get("role")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise RequestError(f"{param}.role must be system, developer, user, assistant or tool, got {role!r}",
                           f"{param}.role")
    out = {k: v for k, v in message.items() if k in ("name", "tool_call_id", "tool_calls")}
    out["role"] = "system" if role == "developer" else role
    out["content"] = _content(message.get("content"), f"{param}.content", role)
    if "tool_calls" in out:
        out["tool_calls"] = _tool_calls(out["tool_calls"], f"{param}.tool_calls")
    return out


def _content(content: Any, param: str, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""  # an assistant turn that only calls tools
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{param} may only hold text parts ({{\"type\": \"text\", \"text\": ...}}): "
                                   "offload's models read text", param)
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(f"{param} must be a string or a list of text parts", param)


def _tool_calls(calls: Any, param: str) -> list[dict[str, Any]]:
    """OpenAI sends a call's arguments as a JSON string; chat templates expect the object (as transformers)."""
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise RequestError(f"{param} must be a list of objects", param)
    out = []
    for call in calls:
        function = call.get("function")
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                function = {**function, "arguments": json.loads(function["arguments"])}
            except json.JSONDecodeError:
                pass  # a template prints it as given
        out.append({**call, "function": function} if function is not None else call)
    return out


def _optional(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python, but not in JSON: true is not a token count.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestError(f"{name} must be {_KIND_NAMES[kind]}, got {json.dumps(value)[:40]}", name)
    return value


def _require(body: dict[str, Any], name: str, kind: type) -> Any:
    if body.get(name) is None:
        raise RequestError(f"{name} is required", name)
    return _optional(body, name, kind, None)


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise RequestError(f"{name} must be a number from {lo:g} to {hi:g}, got {json.dumps(value)[:40]}", name)
    return float(value)


_KIND_NAMES = {int: "an integer", bool: "true or false", list: "a list", dict: "an object", str: "a string"}


# --- responses ---

@dataclass
class Reply:
    """One request's answer as it builds up: ids and timestamps shared by every chunk of a stream."""
    model: str
    kind: str  # "chat" | "text"
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def complete(self, text: str, finish_reason: str, usage: dict[str, Any],
                 timings: dict[str, Any]) -> dict[str, Any]:
        """The non-streaming response."""
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            body = self._envelope("chat.completion", [choice])
        else:
            body = self._envelope("text_completion", [{"index": 0, "text": text, "logprobs": None,
                                                       "finish_reason": finish_reason}])
        return {**body, "usage": usage, "timings": timings}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, first: bool = False,
              timings: dict[str, Any] | None = None) -> dict[str, Any]:
        """One streamed chunk: the first carries the assistant role, the last the finish reason (and timings)."""
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            body = self._envelope("chat.completion.chunk", [choice])
        else:
            body = self._envelope("text_completion", [{"index": 0, "text": text or "", "logprobs": None,
                                                       "finish_reason": finish_reason}])
        return {**body, "timings": timings} if timings is not None else body

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._envelope(obj, []), "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's usage object; cached_tokens: the prompt's leading tokens reused from the model's caches."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def finish_reason(reason: str) -> str:
    """offload's finish reasons as OpenAI's: "stop" and "length" are the same words."""
    return reason if reason in ("stop", "length") else "stop"


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: a JSON object, or the literal [DONE]."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()

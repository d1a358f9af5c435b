"""The HTTP layer: a Starlette app serving one loaded Model through OpenAI's chat-completions and completions
endpoints, plus /v1/models, /health, /metrics and the chat page at /.

Starlette rather than FastAPI: every request body is checked by hand (protocol.py) so that every refusal is an
OpenAI-style error object, which is the part FastAPI's pydantic validation would add and then have to be
overridden; Starlette is the ASGI toolkit FastAPI itself is built on, well kept, with streaming responses, and
adds one small dependency. uvicorn runs it.
"""
from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, AsyncIterator, Awaitable, TypeVar

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..api import Model
from ..errors import OffloadError
from .engine import Job, ModelWorker, QueueFull
from .protocol import (GenerationParams, Reply, RequestError, error_body, finish_reason, parse_chat_request,
                       parse_completion_request, parse_json, sse, usage)

MAX_BODY_BYTES = 16 * 1024 * 1024
OPEN_PATHS = ("/", "/health")  # answered without the API key: the page asks for it, a probe needs none
T = TypeVar("T")


@dataclass(frozen=True)
class ServerOptions:
    model_name: str  # the id /v1/models lists and every response names
    max_waiting: int = 8  # requests that may wait behind the running one; the next gets a 429
    api_key: str | None = None  # when set, /v1/* and /metrics need "Authorization: Bearer <key>"


def create_app(model: Model, options: ServerOptions) -> Starlette:
    """The ASGI app; its worker thread stops when the app shuts down."""
    server = OpenAIServer(model, ModelWorker(model, options.max_waiting), options)
    routes = [
        Route("/", server.page, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
    ]
    handlers = {HTTPException: http_error, RequestError: request_error, Exception: server_error}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        server.worker.close()

    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.server = server
    if options.api_key:
        app.add_middleware(BearerAuth, key=options.api_key)
    return app


class OpenAIServer:
    def __init__(self, model: Model, worker: ModelWorker, options: ServerOptions):
        self.model, self.worker, self.options = model, worker, options
        self.created = int(time.time())

    async def page(self, request: Request) -> Response:
        return HTMLResponse(resources.files(__package__).joinpath("static/chat.html").read_text(encoding="utf-8"))

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.options.model_name})

    async def metrics(self, request: Request) -> Response:
        return JSONResponse({"model": self.options.model_name, **self.worker.metrics()})

    async def models(self, request: Request) -> Response:
        card = {"id": self.options.model_name, "object": "model", "created": self.created, "owned_by": "offload",
                "max_context": self.model.max_context}
        return JSONResponse({"object": "list", "data": [card]})

    async def chat_completions(self, request: Request) -> Response:
        chat = parse_chat_request(parse_json(await read_body(request)))
        if self.model.tokenizer is None or self.model.tokenizer.chat_template is None:
            raise RequestError(f"{self.options.model_name} has no chat template; use /v1/completions", status=400)
        ids = await run_in_threadpool(self._chat_prompt, chat.messages, chat.tools)
        return await self._generate(request, ids, chat.params, Reply(self.options.model_name, "chat"))

    def _chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        """The prompt's token ids; a template that fails on what the client sent is the request's fault (400)."""
        try:
            return self.model.chat_prompt(messages, tools=tools)
        except OffloadError as error:
            raise RequestError(str(error), "messages") from None
        except Exception as error:  # a template's own TypeError, KeyError, ... on unexpected message fields
            raise RequestError(f"the chat template failed on these messages ({type(error).__name__}: {error}); "
                               "send messages in the model's chat format", "messages") from None

    async def completions(self, request: Request) -> Response:
        completion = parse_completion_request(parse_json(await read_body(request)))
        prompt = completion.prompt
        if isinstance(prompt, str):
            if self.model.tokenizer is None:
                raise RequestError(f"{self.options.model_name} has no tokenizer; send the prompt as token ids",
                                   "prompt")
            ids = await run_in_threadpool(self.model.encode, prompt)
        else:
            ids = prompt  # checked against the vocabulary with the rest of the request
        return await self._generate(request, ids, completion.params, Reply(self.options.model_name, "text"))

    async def _generate(self, request: Request, ids: list[int], params: GenerationParams, reply: Reply) -> Response:
        max_tokens = self._max_tokens(len(ids), params.max_tokens)
        try:  # sampling values out of range, token ids past the vocabulary
            run = self.model.stream(ids, max_new_tokens=max_tokens, stop=params.stop, ignore_eos=params.ignore_eos,
                                    **params.sampling)
        except OffloadError as error:
            raise RequestError(str(error)) from None
        try:
            job = self.worker.admit(run)
        except QueueFull:
            raise RequestError(f"the server is busy: one request is running and {self.worker.max_waiting} are "
                               "waiting; retry shortly", status=429, type="rate_limit_error",
                               code="rate_limit_exceeded") from None
        if params.stream:
            return EventStream(self._events(job, reply, params), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text = await until_disconnected(request.receive, self._collect(job))
        if text is None:  # the client left: nobody to answer
            return Response(status_code=499)
        result = job.run.result
        return JSONResponse(reply.complete(text, finish_reason(result.finish_reason), self._usage(job),
                                           job.timings()))

    def _max_tokens(self, prompt_tokens: int, asked: int | None) -> int:
        room = self.model.max_context - prompt_tokens
        if room < 1 or (asked is not None and asked > room):
            wanted = f" plus max_tokens={asked}" if asked is not None else ""
            raise RequestError(
                f"this model's maximum context length is {self.model.max_context} tokens; the prompt has "
                f"{prompt_tokens} tokens{wanted}. Shorten the messages or lower max_tokens (or load with a larger "
                "--max-context)", "messages", code="context_length_exceeded")
        return asked if asked is not None else room

    async def _collect(self, job: Job) -> str:
        return "".join([piece async for piece in self.worker.pieces(job)])

    async def _events(self, job: Job, reply: Reply, params: GenerationParams) -> AsyncIterator[bytes]:
        yield sse(reply.chunk(first=True))
        try:
            async for piece in self.worker.pieces(job):
                yield sse(reply.chunk(piece))
        except Exception as error:  # the model failed mid-reply: say so in the stream, which is already 200
            yield sse(error_body(f"generation failed: {error}", "server_error"))
            yield sse("[DONE]")
            return
        result = job.run.result
        yield sse(reply.chunk(finish_reason=finish_reason(result.finish_reason), timings=job.timings()))
        if params.include_usage:
            yield sse(reply.usage_chunk(self._usage(job)))
        yield sse("[DONE]")

    @staticmethod
    def _usage(job: Job) -> dict[str, Any]:
        s = job.run.result.stats
        return usage(s.prompt_tokens, s.generated_tokens, s.cached_prompt_tokens)


async def read_body(request: Request) -> bytes:
    """The body, refused with a 413 past MAX_BODY_BYTES instead of read into memory whatever its size."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RequestError(f"the request body exceeds {MAX_BODY_BYTES // 2**20} MiB", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


async def wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(receive: Receive, work: Awaitable[T]) -> T | None:
    """work's result, or None when the client disconnects first (work is then cancelled)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watch):
            pending.cancel()
        await asyncio.wait({task, watch})  # both finished: nothing still runs the work's generators
    if task.cancelled():
        return None
    return task.result()


class EventStream(StreamingResponse):
    """Server-sent events that end as soon as the client leaves, whatever ASGI version the server speaks: the
    event generator is closed at once, which asks the generation to stop after its current token."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await until_disconnected(receive, self._send_all(send))
        finally:
            await self.body_iterator.aclose()

    async def _send_all(self, send: Send) -> None:
        try:
            await self.stream_response(send)
        except OSError:
            pass  # the connection broke mid-send: the same as a disconnect


class BearerAuth:
    """Refuse requests without "Authorization: Bearer <key>" (401, an OpenAI error object), except OPEN_PATHS."""

    def __init__(self, app: ASGIApp, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                body = error_body("a valid API key is required: send the header 'Authorization: Bearer <key>' "
                                  "with the key offload serve was started with (--api-key)",
                                  "invalid_request_error", code="invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def request_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestError)
    return JSONResponse(error.body(), status_code=error.status)


async def http_error(request: Request, error: Exception) -> Response:
    """Starlette's own refusals (no such route, wrong method) in OpenAI's error shape."""
    assert isinstance(error, HTTPException)
    kind = {404: "not_found_error", 405: "invalid_request_error"}.get(error.status_code, "invalid_request_error")
    message = f"{request.method} {request.url.path}: {error.detail}"
    return JSONResponse(error_body(message, kind), status_code=error.status_code, headers=error.headers)


async def server_error(request: Request, error: Exception) -> Response:
    return JSONResponse(error_body(f"internal error: {type(error).__name__}: {error}", "server_error"),
                        status_code=500)

"""The OpenAI-compatible server: a Starlette app over one ChatModel and the
Engine that decodes its requests (continuous per-step batching over the
engine's rows: a request joins at the next step, and its tokens never depend
on the others').

  POST /v1/chat/completions   POST /v1/completions   (streamed as server-sent events or not)
  GET  /v1/models   GET /v1/models/{id}   GET /health   GET / (the web page, static/)

Every refusal is OpenAI's JSON error body with its 4xx status; a client that
goes away mid-request has its rows cancelled, freeing them at the next step.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from jaxgpt.chat.model import ChatModel, PromptTooLong
from jaxgpt.run.decoding import RowOptions
from jaxgpt.serve import protocol
from jaxgpt.serve.protocol import SEED_MOD, ApiError, Defaults, Knobs, Reply

STATIC = Path(__file__).parent / "static"  # The web page: the only files served.
DONE = object()
# Response header of a chat request that a model without a chat template
# answered as plain continuation of the messages' contents.
BASE_HEADER = "x-jaxgpt-prompt"


def stopped() -> ApiError:
    """A reply the engine ended itself (it failed, or the server is stopping)."""
    return ApiError(
        503,
        "The decoding stopped (see the server's log): try again.",
        type_="server_error",
    )


@dataclasses.dataclass(frozen=True)
class Settings:
    """The server's limits and defaults (ChatConfig's and SampleConfig's flags)."""

    slots: int = 16
    max_waiting: int = 256
    api_key: str = ""
    max_request_bytes: int = 1_000_000
    max_messages: int = 512
    defaults: Defaults = dataclasses.field(default_factory=Defaults)
    seed: int = 1337  # Root of the seeds of requests that name none.
    system: str = (
        ""  # --system: the web page's default system message (the API adds none).
    )


# --- reading a request -----------------------------------------------------------


def authorize(request: Request, api_key: str) -> None:
    """With --api_key set, the request must carry `Authorization: Bearer <key>`."""
    if not api_key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), api_key.encode()
    ):
        raise ApiError(
            401,
            "Missing or wrong API key: send the server's --api_key as"
            " 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
        )


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object; over `limit` bytes is refused before it is all
    read (by its Content-Length, else as it arrives)."""
    too_big = ApiError(
        413,
        f"The request body is larger than {limit} bytes (--max_request_bytes):"
        " send fewer or shorter messages.",
        code="request_too_large",
    )
    length = request.headers.get("content-length")
    if length is not None and not length.isdigit():
        raise ApiError(400, f"Content-Length {length!r} is not a number.")
    if length is not None and int(length) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(
            400, f"The body is not valid JSON ({e}): send a JSON object."
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, "The body must be a JSON object.")
    return data


# --- decoding ----------------------------------------------------------------------


async def pieces(reply, limiter: anyio.CapacityLimiter):
    """A request's text pieces, each awaited in a worker thread (the engine's
    iterator blocks); cancelling the caller leaves that thread to end at the
    next step, once the request is cancelled."""
    it = iter(reply)
    while True:
        piece = await anyio.to_thread.run_sync(
            next, it, DONE, abandon_on_cancel=True, limiter=limiter
        )
        if piece is DONE:
            return
        yield piece


async def until_disconnect(receive: Receive) -> None:
    """Returns when the client has gone away."""
    while (await receive())["type"] != "http.disconnect":
        pass


def cancel_unfinished(replies: Sequence) -> None:
    for reply in replies:
        if reply.finish_reason is None:
            reply.cancel()


async def watched(
    work: Callable[[], Awaitable[None]], receive: Receive, replies
) -> bool:
    """Runs `work` while listening for the client; if it goes away first, its
    replies are cancelled and work is stopped. True when work finished."""
    finished = False
    try:
        async with anyio.create_task_group() as group:

            async def run():
                nonlocal finished
                await work()
                finished = True
                group.cancel_scope.cancel()

            group.start_soon(run)
            await until_disconnect(receive)
            cancel_unfinished(replies)
            group.cancel_scope.cancel()
    finally:
        cancel_unfinished(replies)
    return finished


def sse(data: Any) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


class EventStream(Response):
    """A streamed reply as server-sent events (`data: {...}` ... `data: [DONE]`)."""

    media_type = "text/event-stream"

    def __init__(self, produce, replies, headers: dict[str, str]):
        self.status_code, self.background = 200, None
        self.init_headers({**headers, "cache-control": "no-cache"})  # No length.
        self.produce, self.replies = produce, replies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
        )

        async def emit(data: Any) -> None:
            await send(
                {"type": "http.response.body", "body": sse(data), "more_body": True}
            )

        async def work() -> None:
            await self.produce(emit)
            await emit("[DONE]")

        try:
            if await watched(work, receive, self.replies):
                await send(
                    {"type": "http.response.body", "body": b"", "more_body": False}
                )
        except OSError:  # The client went away as we wrote to it.
            cancel_unfinished(self.replies)


# --- the app -----------------------------------------------------------------------


class Server:
    """The routes' state: the model, the engine, the settings, a seed counter."""

    def __init__(self, model: ChatModel, engine, settings: Settings):
        self.model, self.engine, self.settings = model, engine, settings
        self.created = int(time.time())
        self.requests = 0
        # Worker threads that wait for tokens: enough for every row and a queue.
        self.limiter = anyio.CapacityLimiter(8 * settings.slots + 32)

    def card(self) -> dict[str, Any]:
        return {
            "id": self.model.name,
            "object": "model",
            "created": self.created,
            "owned_by": "jaxgpt",
            "context_length": self.model.context,
            "chat_template": self.model.chat,
            "system_prompt": self.settings.system,
        }

    def next_seed(self) -> int:
        """A seed for a request that names none: the server's --seed and a count."""
        self.requests += 1
        entropy = [self.settings.seed % 2**64, self.requests]
        return int(np.random.SeedSequence(entropy).generate_state(1)[0])

    def submit(self, prompt_ids, k: Knobs, max_tokens: int) -> list:
        """k.n rows of the prompt, seeds seed, seed + 1, ... (modulo 2**32); a
        429 if they would make more than --max_waiting replies wait."""
        waiting, most = len(self.engine.waiting), self.settings.max_waiting
        if waiting + k.n > most:
            raise ApiError(
                429,
                f"{waiting} replies wait for one of the {self.settings.slots} slots"
                f" (--max_waiting={most}): try again in a moment.",
                code="rate_limit_exceeded",
                type_="requests",
            )
        seed = self.next_seed() if k.seed is None else k.seed
        try:
            return self.rows(prompt_ids, k, max_tokens, seed)
        except RuntimeError:  # The engine is closed: the server is stopping.
            raise stopped() from None

    def rows(self, prompt_ids, k: Knobs, max_tokens: int, seed: int) -> list:
        return [
            self.engine.submit(
                prompt_ids,
                RowOptions(
                    max_tokens=max_tokens,
                    temperature=k.temperature,
                    top_p=k.top_p,
                    top_k=k.top_k,
                    seed=(seed + i) % SEED_MOD,
                ),
                stop=k.stop,
            )
            for i in range(k.n)
        ]

    async def body_and_knobs(self, request: Request) -> tuple[dict, Knobs]:
        authorize(request, self.settings.api_key)
        body = await read_json(request, self.settings.max_request_bytes)
        protocol.check_model(body, self.model.name)
        k = protocol.knobs(
            body, self.settings.defaults, self.model.context, self.settings.slots
        )
        return body, k

    # --- routes

    async def chat_completions(self, request: Request) -> Response:
        body, k = await self.body_and_knobs(request)
        messages = protocol.messages_of(body, self.settings.max_messages)
        default = min(self.settings.defaults.max_tokens, self.model.context)
        try:  # The oldest turns dropped to fit; the newest kept if it fits alone.
            ids, dropped = await anyio.to_thread.run_sync(
                self.model.chat_prompt, messages, k.max_tokens or default
            )
        except PromptTooLong as e:
            raise ApiError(400, str(e), "messages", "context_length_exceeded") from None
        except ValueError as e:  # Text the tokenizer cannot encode.
            raise ApiError(
                400, f"The messages cannot be encoded: {e}", "messages"
            ) from None
        headers = {"x-jaxgpt-dropped-turns": str(dropped)}
        if not self.model.chat:
            headers[BASE_HEADER] = "continuation"  # No chat template: plain text.
        return await self.answer(
            request, Reply(self.model.name, chat=True), ids, k, headers
        )

    async def completions(self, request: Request) -> Response:
        body, k = await self.body_and_knobs(request)
        prompt = protocol.prompt_of(body)
        try:
            ids = await anyio.to_thread.run_sync(self.model.text_prompt, prompt)
        except ValueError as e:
            raise ApiError(
                400, f"The prompt cannot be encoded: {e}", "prompt"
            ) from None
        room = self.model.context - len(ids)
        if room < (k.max_tokens or 1):
            asked = f" and max_tokens={k.max_tokens}" if k.max_tokens else ""
            raise ApiError(
                400,
                f"The prompt's {len(ids)} tokens{asked} exceed the model's context of"
                f" {self.model.context} tokens: shorten the prompt"
                + (" or lower max_tokens." if k.max_tokens else "."),
                "prompt",
                "context_length_exceeded",
            )
        return await self.answer(
            request, Reply(self.model.name, chat=False), ids, k, {}
        )

    async def answer(
        self, request: Request, reply: Reply, ids, k: Knobs, headers
    ) -> Response:
        max_tokens = k.max_tokens or min(
            self.settings.defaults.max_tokens, self.model.context
        )
        replies = self.submit(ids, k, max_tokens)
        if k.stream:
            return EventStream(self.streamer(reply, replies, k), replies, headers)
        texts = [[] for _ in replies]

        async def collect() -> None:
            async with anyio.create_task_group() as group:
                for i, r in enumerate(replies):
                    group.start_soon(self.collect_one, r, texts[i])

        if not await watched(collect, request.receive, replies):
            return Response(status_code=499)  # Nobody is there to read it.
        if any(r.finish_reason == "cancelled" for r in replies):
            raise stopped()
        return JSONResponse(
            reply.whole(
                ["".join(t) for t in texts],
                [r.finish_reason for r in replies],
                usage_of(replies),
            ),
            headers=headers,
        )

    async def collect_one(self, r, out: list[str]) -> None:
        async for piece in pieces(r, self.limiter):
            out.append(piece)

    def streamer(self, reply: Reply, replies: list, k: Knobs):
        """The coroutine that sends a streamed reply's chunks: the rows' pieces as
        they come (each choice by its index), then each row's finish_reason,
        then (stream_options.include_usage) the usage."""
        with_usage = k.include_usage

        async def produce(emit) -> None:
            async def one(i: int, r) -> None:
                if reply.chat:  # OpenAI's first chunk: the role.
                    await emit(
                        reply.chunk(
                            [reply.choice(i, "", None, first=True)], None, with_usage
                        )
                    )
                async for piece in pieces(r, self.limiter):
                    await emit(
                        reply.chunk([reply.choice(i, piece, None)], None, with_usage)
                    )
                if r.finish_reason == "cancelled":  # Not by this client: the engine.
                    await emit(stopped().body())
                    return
                last = reply.choice(i, None if reply.chat else "", r.finish_reason)
                await emit(reply.chunk([last], None, with_usage))

            async with anyio.create_task_group() as group:
                for i, r in enumerate(replies):
                    group.start_soon(one, i, r)
            if with_usage:
                await emit(reply.chunk([], usage_of(replies), True))

        return produce

    async def models(self, request: Request) -> Response:
        authorize(request, self.settings.api_key)
        return JSONResponse({"object": "list", "data": [self.card()]})

    async def model_card(self, request: Request) -> Response:
        authorize(request, self.settings.api_key)
        protocol.check_model({"model": request.path_params["model"]}, self.model.name)
        return JSONResponse(self.card())

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model.name})

    async def page(self, request: Request) -> Response:
        index = STATIC / "index.html"
        if not index.is_file():
            raise HTTPException(404)
        return FileResponse(index)


def usage_of(replies: Sequence) -> dict[str, int]:
    """OpenAI's usage: the prompt counted once, every choice's tokens."""
    prompt = replies[0].prompt_tokens if replies else 0
    return protocol.usage(prompt, sum(r.completion_tokens for r in replies))


async def api_error(request: Request, e: ApiError) -> Response:
    return JSONResponse(
        e.body(), status_code=e.status, headers=ERROR_HEADERS.get(e.status)
    )


# What a client needs beside a refusal's body: how to authenticate, when to retry.
ERROR_HEADERS = {401: {"www-authenticate": "Bearer"}, 429: {"retry-after": "1"}}


async def http_error(request: Request, e: HTTPException) -> Response:
    """Starlette's own refusals (no such path, a method the path does not take)
    as OpenAI's error body."""
    where = f"{request.method} {request.url.path}"
    if e.status_code == 404:
        message, code = f"No such path: {where}.", "not_found"
    elif e.status_code == 405:
        allowed = (e.headers or {}).get("Allow", "")
        message, code = (
            f"{where}: method not allowed (use {allowed}).",
            "method_not_allowed",
        )
    else:
        message, code = f"{where}: {e.detail}", None
    return JSONResponse(
        ApiError(e.status_code, message, code=code).body(),
        status_code=e.status_code,
        headers=e.headers,
    )


async def server_error(request: Request, e: Exception) -> Response:
    body = ApiError(
        500, f"The server failed: {type(e).__name__}: {e}", type_="server_error"
    ).body()
    return JSONResponse(body, status_code=500)


def make_app(model: ChatModel, engine, settings: Settings = Settings()) -> Starlette:
    """The Starlette app serving `model` through `engine` (an Engine, whose
    rows number settings.slots: its submit() and its queue, `waiting`)."""
    s = Server(model, engine, settings)
    routes = [
        Route("/v1/chat/completions", s.chat_completions, methods=["POST"]),
        Route("/v1/completions", s.completions, methods=["POST"]),
        Route("/v1/models", s.models, methods=["GET"]),
        Route("/v1/models/{model:path}", s.model_card, methods=["GET"]),
        Route("/health", s.health, methods=["GET"]),
        Route("/", s.page, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC, check_dir=False)),
    ]
    handlers = {ApiError: api_error, HTTPException: http_error, Exception: server_error}
    return Starlette(routes=routes, exception_handlers=handlers)

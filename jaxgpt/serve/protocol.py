"""OpenAI's API as plain data: request bodies checked into frozen records (or
one ApiError naming the field and the fix), and the response and chunk
bodies the server sends. No I/O and no model here: app.py does both."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}
MAX_STOPS = 4  # OpenAI's limit on stop strings.
SEED_MOD = 2**32  # A row's key takes 32 bits: seeds are read modulo 2**32.


class ApiError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message = status, message
        self.param, self.code, self.type = param, code, type_

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclasses.dataclass(frozen=True)
class Defaults:
    """The server's flags that a request may override (SampleConfig's)."""

    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 200
    max_tokens: int = 500


@dataclasses.dataclass(frozen=True)
class Knobs:
    """A request's sampling options. max_tokens None: the server's default,
    shortened where the prompt leaves less room; seed None: the server draws one."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    n: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


# --- checking a body -------------------------------------------------------------


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def number(
    body: Mapping, name: str, default: float, low: float, high: float, low_open=False
) -> float:
    """body[name] (else `default`) as a float in [low, high] ((low, high] if low_open)."""
    value = body.get(name)
    if value is None:
        return default
    if not is_number(value):
        raise ApiError(
            400, f"{name} must be a number, not {type(value).__name__}.", name
        )
    if not (low < value if low_open else low <= value) or value > high:
        bracket = "(" if low_open else "["
        raise ApiError(
            400,
            f"{name}={value} is out of range: it must lie in {bracket}{low}, {high}].",
            name,
        )
    return float(value)


def integer(body: Mapping, name: str, low: int, high: int) -> int | None:
    """body[name] as an int in [low, high], or None when absent."""
    value = body.get(name)
    if value is None:
        return None
    if not is_int(value):
        raise ApiError(
            400, f"{name} must be an integer, not {type(value).__name__}.", name
        )
    if not low <= value <= high:
        raise ApiError(
            400,
            f"{name}={value} is out of range: it must lie in [{low}, {high}].",
            name,
        )
    return value


def stop_strings(value: Any) -> tuple[str, ...]:
    """`stop`: none, one string, or a list of at most MAX_STOPS strings."""
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "stop must be a string or a list of strings.", "stop")
    if len(stops) > MAX_STOPS:
        raise ApiError(
            400, f"stop holds {len(stops)} strings: give at most {MAX_STOPS}.", "stop"
        )
    return tuple(s for s in stops if s)


def knobs(body: Mapping, defaults: Defaults, context: int, slots: int) -> Knobs:
    """The sampling options of a chat or completion request's body."""
    max_tokens = integer(body, "max_completion_tokens", 1, context)
    if max_tokens is None:
        max_tokens = integer(body, "max_tokens", 1, context)
    seed = integer(body, "seed", -(2**63), 2**63 - 1)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object.", "stream_options")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false.", "stream")
    top_k = integer(body, "top_k", -1, 2**31 - 1)  # vLLM's extra knob; -1: all.
    return Knobs(
        max_tokens=max_tokens,
        temperature=number(body, "temperature", defaults.temperature, 0.0, 2.0),
        top_p=number(body, "top_p", defaults.top_p, 0.0, 1.0, low_open=True),
        top_k=defaults.top_k if top_k is None else max(top_k, 0),
        seed=seed,
        n=integer(body, "n", 1, slots) or 1,
        stop=stop_strings(body.get("stop")),
        stream=stream,
        include_usage=bool((options or {}).get("include_usage", False)),
    )


def check_model(body: Mapping, name: str) -> None:
    """`model`, when given, must name the server's one model."""
    model = body.get("model")
    if model is not None and model != name:
        raise ApiError(
            404,
            f"The model {model!r} does not exist: this server serves {name!r}"
            " (GET /v1/models).",
            "model",
            "model_not_found",
        )


def content_text(content: Any, i: int) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                raise ApiError(
                    400,
                    f"messages[{i}].content holds a part that is not"
                    ' {"type": "text", "text": "..."}: this model reads text only.',
                    f"messages[{i}].content",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(
        400,
        f"messages[{i}].content must be a string (or a list of text parts), not"
        f" {type(content).__name__}.",
        f"messages[{i}].content",
    )


def messages_of(body: Mapping, max_messages: int) -> list[dict[str, str]]:
    """A chat request's messages as [{"role", "content"}] (developer: system)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise ApiError(
            400, "messages must be a list of {role, content} objects.", "messages"
        )
    if not messages:
        raise ApiError(400, "messages is empty: give at least one message.", "messages")
    if len(messages) > max_messages:
        raise ApiError(
            400,
            f"messages holds {len(messages)} messages: at most {max_messages} are read"
            " (--max_messages).",
            "messages",
        )
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object.", f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(
                400,
                f"messages[{i}].role is {role!r}: use one of system, developer, user,"
                " assistant.",
                f"messages[{i}].role",
            )
        out.append(
            {"role": ROLES[role], "content": content_text(message.get("content"), i)}
        )
    return out


def prompt_of(body: Mapping) -> str:
    """A completion request's prompt: a string (or a list holding one)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string.", "prompt")
    if not prompt:
        raise ApiError(400, "prompt is empty: give the text to continue.", "prompt")
    return prompt


# --- responses ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Reply:
    """What a response is made of: its id, time, model, kind (chat or text)."""

    model: str
    chat: bool
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def head(self, chunk: bool = False) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
            return {
                "id": f"chatcmpl-{self.id}",
                "object": kind,
                "created": self.created,
                "model": self.model,
            }
        return {
            "id": f"cmpl-{self.id}",
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
        }

    def choice(
        self, index: int, text: str | None, finish: str | None, first: bool = False
    ) -> dict:
        """A choice (a delta when finish is None or text None: a chunk's)."""
        if not self.chat:
            return {
                "index": index,
                "text": text or "",
                "logprobs": None,
                "finish_reason": finish,
            }
        return {
            "index": index,
            "delta": delta(text, first),
            "logprobs": None,
            "finish_reason": finish,
        }

    def whole(self, texts: Sequence[str], finishes: Sequence[str], usage: dict) -> dict:
        """The response to a request that is not streamed."""
        if self.chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
                for i, (text, finish) in enumerate(zip(texts, finishes))
            ]
        else:
            choices = [
                {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                for i, (text, finish) in enumerate(zip(texts, finishes))
            ]
        return {**self.head(), "choices": choices, "usage": usage}

    def chunk(
        self, choices: list[dict], usage: dict | None = None, with_usage: bool = False
    ) -> dict:
        body = {**self.head(chunk=True), "choices": choices}
        if with_usage:
            body["usage"] = usage
        return body


def delta(text: str | None, first: bool) -> dict[str, str]:
    out = {"role": "assistant"} if first else {}
    return {**out, "content": text} if text is not None else out


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }

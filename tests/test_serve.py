"""The OpenAI-compatible server (jaxgpt.serve): OpenAI's own client against it
(chat and completions, streamed and not), replies equal to the engine's alone
whatever else is in flight, every refusal's status and error body, a client
that goes away freeing its row, the static folder's bounds, and the command."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import openai
import pytest
from absl.testing import flagsaver
from conftest import REPO, serving
from starlette.testclient import TestClient

from jaxgpt import lecture, tokenizer
from jaxgpt.chat import model as chat_model
from jaxgpt.chat.engine import Engine
from jaxgpt.config import ConfigError, ModelConfig
from jaxgpt.datasets import chat_template
from jaxgpt.hub import hf, load
from jaxgpt.run import cli
from jaxgpt.serve import app as serve_app
from jaxgpt.serve.__main__ import listen
from jaxgpt.serve.protocol import Defaults

CHARS = "abcdefghijklmnopqrstuvwxyz .,?!'\n"
CHAT_CONTEXT, BASE_CONTEXT, SLOTS = 128, 512, 8
HELLO = [{"role": "user", "content": "hello, who are you?"}]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def random_params(cfg: ModelConfig, seed: int):
    """The model's init plus N(0, 0.3) noise: replies of varied characters."""
    params = lecture.init_params(cfg, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    noisy = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, noisy)


def tiny_cfg(vocab_size: int, block_size: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=32,
        dropout=0.0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory) -> str:
    """A tiny chat model (jaxgpt's chat tokens over characters) written as a
    Hugging Face folder."""
    tok, _ = chat_template.add_chat_tokens(tokenizer.CharTokenizer(CHARS))
    cfg = tiny_cfg(tok.vocab_size, CHAT_CONTEXT)
    folder = str(tmp_path_factory.mktemp("tiny_chat"))
    files, _ = hf.tokenizer_files(tok)
    load.write_model("gpt2", random_params(cfg, 0), cfg, folder, files)
    return folder


@pytest.fixture(scope="module")
def chat_model_(chat_folder) -> chat_model.ChatModel:
    """The tiny chat model, loaded as `python -m jaxgpt.serve --init_from` loads it."""
    with flagsaver.flagsaver():
        cli.FLAGS.unparse_flags()
        cli.FLAGS(["serve", f"--init_from={chat_folder}", "--model_name=tiny-chat"])
        model = chat_model.load(cli.command())
    assert model.chat and model.context == CHAT_CONTEXT
    return model


@pytest.fixture(scope="module")
def base_model_() -> chat_model.ChatModel:
    """A tiny base model (no chat template), with room for long replies."""
    tok = tokenizer.CharTokenizer(CHARS)
    cfg = tiny_cfg(tok.vocab_size, BASE_CONTEXT)
    return chat_model.ChatModel(
        name="tiny-base", model_cfg=cfg, params=random_params(cfg, 2),
        apply_fn=lecture.apply_of(cfg), tok=tok, template=None,
        stop_ids=frozenset(chat_model.stop_ids_of(tok, None)),
    )  # fmt: skip


class Recording:
    """An Engine that keeps the requests submitted to it."""

    def __init__(self, engine: Engine):
        self.engine, self.submitted = engine, []

    def submit(self, *args, **kwargs):
        request = self.engine.submit(*args, **kwargs)
        self.submitted.append(request)
        return request

    @property
    def waiting(self):
        return self.engine.waiting


SETTINGS = serve_app.Settings(
    slots=SLOTS,
    max_request_bytes=20_000,
    max_messages=8,
    defaults=Defaults(temperature=1.0, top_p=1.0, top_k=0, max_tokens=24),
    system="You are a tiny model.",
)


@pytest.fixture(scope="module")
def chat_engine(chat_model_):
    engine = Engine(chat_model_, slots=SLOTS)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def chat_url(chat_model_, chat_engine):
    with serving(serve_app.make_app(chat_model_, chat_engine, SETTINGS)) as url:
        yield url


@pytest.fixture(scope="module")
def base_server(base_model_):
    """The base model behind one slot: (URL, the engine's recorded requests)."""
    engine = Engine(base_model_, slots=1)
    recording = Recording(engine)
    settings = serve_app.Settings(slots=1, defaults=SETTINGS.defaults)
    try:
        with serving(serve_app.make_app(base_model_, recording, settings)) as url:
            yield url, recording
    finally:
        engine.close()


@pytest.fixture(scope="module")
def client(chat_url):
    return openai.OpenAI(base_url=chat_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def alone():
    """The reply an engine of one row gives a prompt, nothing else in flight."""
    engines = {}

    def reply(model, prompt_ids, seed, max_tokens, **knobs) -> str:
        if model.name not in engines:
            engines[model.name] = Engine(model, slots=1)
        opts = serve_app.RowOptions(max_tokens=max_tokens, seed=seed, **knobs)
        return engines[model.name].submit(prompt_ids, opts).text()

    yield reply
    for engine in engines.values():
        engine.close()


# --- OpenAI's client ------------------------------------------------------------


def test_chat_streamed_and_not_equal_the_engine_alone(client, chat_model_, alone):
    kw = {"model": "tiny-chat", "messages": HELLO, "max_tokens": 20, "seed": 7}
    whole = client.chat.completions.create(**kw)
    assert whole.object == "chat.completion" and whole.model == "tiny-chat"
    (choice,) = whole.choices
    assert choice.message.role == "assistant" and choice.index == 0
    ids, _ = chat_model_.chat_prompt(HELLO, 20)
    temperature = SETTINGS.defaults.temperature
    assert choice.message.content == alone(
        chat_model_, ids, 7, 20, temperature=temperature
    )
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == len(ids)
    assert whole.usage.total_tokens == len(ids) + whole.usage.completion_tokens
    assert 1 <= whole.usage.completion_tokens <= 20

    chunks = list(
        client.chat.completions.create(
            **kw, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == choice.finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_completions_streamed_and_not(client, chat_model_, alone):
    kw = {
        "model": "tiny-chat",
        "prompt": "once upon a time",
        "max_tokens": 16,
        "seed": 3,
    }
    whole = client.completions.create(**kw, temperature=0.5, top_p=0.9)
    assert whole.object == "text_completion"
    ids = chat_model_.text_prompt("once upon a time")
    want = alone(chat_model_, ids, 3, 16, temperature=0.5, top_p=0.9)
    assert whole.choices[0].text == want
    assert whole.usage.prompt_tokens == len(ids)
    chunks = list(
        client.completions.create(**kw, temperature=0.5, top_p=0.9, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_n_rows_take_seeds_seed_plus_i(client):
    kw = {"model": "tiny-chat", "messages": HELLO, "max_tokens": 12}
    three = client.chat.completions.create(**kw, n=3, seed=40)
    assert [c.index for c in three.choices] == [0, 1, 2]
    for i, choice in enumerate(three.choices):
        one = client.chat.completions.create(**kw, seed=40 + i)
        assert choice.message.content == one.choices[0].message.content
    singles = sum(
        client.chat.completions.create(**kw, seed=40 + i).usage.completion_tokens
        for i in range(3)
    )
    assert three.usage.completion_tokens == singles
    streamed = client.chat.completions.create(**kw, n=3, seed=40, stream=True)
    texts = ["", "", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in three.choices]


def test_stop_string_ends_the_reply_before_it(client):
    kw = {
        "model": "tiny-chat",
        "messages": HELLO,
        "max_tokens": 30,
        "seed": 11,
        "temperature": 1.0,
    }
    full = client.chat.completions.create(**kw).choices[0].message.content
    assert len(full) >= 6, full
    stop = full[3:5]
    cut = client.chat.completions.create(**kw, stop=[stop, "zzzz"]).choices[0]
    assert cut.message.content == full[: full.index(stop)]
    assert cut.finish_reason == "stop"


def test_text_parts_and_defaults(client):
    kw = {"model": "tiny-chat", "max_tokens": 10, "seed": 5}
    plain = client.chat.completions.create(messages=HELLO, **kw)
    parts = [
        {"type": "text", "text": "hello, "},
        {"type": "text", "text": "who are you?"},
    ]
    split = client.chat.completions.create(
        messages=[{"role": "user", "content": parts}], **kw
    )
    assert split.choices[0].message.content == plain.choices[0].message.content
    # No max_tokens: the server's --max_new_tokens (24 here) at most.
    default = client.chat.completions.create(
        model="tiny-chat", messages=HELLO, seed=5, stop=None
    )
    assert default.usage.completion_tokens <= SETTINGS.defaults.max_tokens


def test_eight_clients_at_once_get_their_replies_alone(client):
    prompts = [
        f"tell me about {w}"
        for w in ("cats", "dogs", "kings", "rain", "ships", "bread", "wine", "night")
    ]

    def ask(i: int) -> str:
        messages = [{"role": "user", "content": prompts[i]}]
        reply = client.chat.completions.create(
            model="tiny-chat", messages=messages, max_tokens=24, seed=100 + i
        )
        return reply.choices[0].message.content

    one_by_one = [ask(i) for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert together == one_by_one
    assert len(set(one_by_one)) == 8  # Distinct replies: the test can tell them apart.


def test_models_and_health(client, chat_url):
    (card,) = client.models.list().data
    assert card.id == "tiny-chat" and card.object == "model"
    assert card.owned_by == "jaxgpt" and isinstance(card.created, int)
    assert card.model_extra["context_length"] == CHAT_CONTEXT
    assert card.model_extra["chat_template"] is True
    assert card.model_extra["system_prompt"] == SETTINGS.system
    assert client.models.retrieve("tiny-chat").id == "tiny-chat"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.code == "model_not_found"
    with urllib.request.urlopen(chat_url + "/health") as r:
        assert json.load(r) == {"status": "ok", "model": "tiny-chat"}


# --- the base model, one slot -------------------------------------------------------


def post(url: str, path: str, body: dict, timeout: float = 60):
    request = urllib.request.Request(
        url + path, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return dict(r.headers), json.load(r)


def test_base_model_answers_as_continuation(base_server, base_model_, alone):
    url, _ = base_server
    messages = [{"role": "system", "content": "a play."}, *HELLO]
    headers, body = post(
        url, "/v1/chat/completions", {"messages": messages, "max_tokens": 8, "seed": 1}
    )
    assert headers["x-jaxgpt-prompt"] == "continuation"
    ids = base_model_.text_prompt("a play.\nhello, who are you?\n")
    assert body["usage"]["prompt_tokens"] == len(ids)
    text = body["choices"][0]["message"]["content"]
    assert text == alone(base_model_, ids, 1, 8, temperature=1.0)
    assert body["choices"][0]["finish_reason"] == "length"  # No stop token.
    _, card = post_get(url, "/v1/models")
    assert card["data"][0]["chat_template"] is False


def post_get(url: str, path: str):
    with urllib.request.urlopen(url + path, timeout=30) as r:
        return dict(r.headers), json.load(r)


def raw_request(url: str, text: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(text.encode())
    return sock


def http_post(path: str, body: dict) -> str:
    data = json.dumps(body)
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n{data}"
    )


def wait_finished(request, seconds: float = 20) -> str:
    end = time.time() + seconds
    while request.finish_reason is None and time.time() < end:
        time.sleep(0.01)
    return request.finish_reason


LONG = {"prompt": "the ", "max_tokens": BASE_CONTEXT - 8, "seed": 2}


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_frees_its_slot(base_server, stream):
    url, recording = base_server
    before = len(recording.submitted)
    sock = raw_request(url, http_post(COMPLETIONS, {**LONG, "stream": stream}))
    if stream:
        got = b""
        while b"data:" not in got:
            got += sock.recv(4096)
    else:  # Gone once its reply has begun.
        while len(recording.submitted) == before:
            time.sleep(0.005)
        while not recording.submitted[-1].completion_tokens:
            time.sleep(0.005)
    sock.close()
    (request,) = recording.submitted[before:]
    assert wait_finished(request) == "cancelled"
    assert request.completion_tokens < LONG["max_tokens"]
    # The one slot is free: the next request is answered.
    _, body = post(url, "/v1/completions", {"prompt": "the ", "max_tokens": 4}, 30)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 4


def test_a_queued_client_that_goes_away_never_takes_the_slot(base_server):
    url, recording = base_server
    before = len(recording.submitted)
    first = raw_request(url, http_post(COMPLETIONS, {**LONG, "stream": True}))
    got = b""
    while b"data:" not in got:  # The one slot is taken.
        got += first.recv(4096)
    queued = raw_request(url, http_post(COMPLETIONS, {**LONG, "stream": True}))
    while len(recording.submitted) < before + 2:
        time.sleep(0.005)
    queued.close()
    time.sleep(0.1)  # The server hears of it (the engine drops it when a row frees).
    first.close()
    running, waiting = recording.submitted[before:]
    assert wait_finished(running) == "cancelled"
    assert wait_finished(waiting) == "cancelled" and waiting.completion_tokens == 0
    assert waiting.cancelled.is_set()


def read_reply(sock: socket.socket) -> bytes:
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    sock.close()
    return reply


def test_a_body_too_large_is_refused_before_it_is_sent(base_server):
    url, _ = base_server
    head = (
        f"POST {COMPLETIONS} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        "\r\nContent-Length: 1000000000\r\nConnection: close\r\n\r\n{"
    )
    reply = read_reply(raw_request(url, head))  # Answered with the body unsent.
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'"request_too_large"' in reply


def test_static_files_only_from_the_package(base_server):
    url, _ = base_server
    for path in ("/static/../app.py", "/static/..%2fapp.py", "/static/%2e%2e/app.py",
                 "/static/../../../setup.cfg", "/static//etc/passwd"):  # fmt: skip
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        reply = read_reply(raw_request(url, request))
        assert reply.startswith(b"HTTP/1.1 404"), (path, reply[:200])
        assert b"make_app" not in reply and b"root:" not in reply
    index = serve_app.STATIC / "index.html"
    if index.is_file():  # The web page, where it is installed.
        with urllib.request.urlopen(url + "/", timeout=30) as r:
            assert r.read() == index.read_bytes()


# --- refusals ----------------------------------------------------------------------


def chat(**fields):
    return {"model": "tiny-chat", "messages": HELLO, "max_tokens": 4, **fields}


def too_big_stream():
    for _ in range(30):
        yield b" " * 1000


BAD = {  # name: (method, path, body (dict: JSON; bytes: as is), status, param, code)
    "malformed JSON": ("POST", CHAT, b'{"messages": [', 400, None, None),
    "not an object": ("POST", CHAT, b"[1, 2]", 400, None, None),
    "over the size, by Content-Length": ("POST", CHAT, b" " * 20_001, 413, None, "request_too_large"),
    "over the size, as it arrives": ("POST", CHAT, too_big_stream, 413, None, "request_too_large"),
    "too many messages": ("POST", CHAT, chat(messages=HELLO * 9), 400, "messages", None),
    "no messages": ("POST", CHAT, chat(messages=[]), 400, "messages", None),
    "messages not a list": ("POST", CHAT, chat(messages="hi"), 400, "messages", None),
    "unknown role": ("POST", CHAT, chat(messages=[{"role": "tool", "content": "x"}]), 400, "messages[0].role", None),
    "non-string content": ("POST", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content", None),
    "a part that is not text": ("POST", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400, "messages[0].content", None),
    "max_tokens 0": ("POST", CHAT, chat(max_tokens=0), 400, "max_tokens", None),
    "max_tokens over the context": ("POST", CHAT, chat(max_tokens=CHAT_CONTEXT + 1), 400, "max_tokens", None),
    "max_completion_tokens over the context": ("POST", CHAT, chat(max_completion_tokens=10**6), 400, "max_completion_tokens", None),
    "max_tokens not an integer": ("POST", CHAT, chat(max_tokens=2.5), 400, "max_tokens", None),
    "temperature over 2": ("POST", CHAT, chat(temperature=2.5), 400, "temperature", None),
    "temperature below 0": ("POST", CHAT, chat(temperature=-0.1), 400, "temperature", None),
    "temperature not a number": ("POST", CHAT, chat(temperature="hot"), 400, "temperature", None),
    "top_p 0": ("POST", CHAT, chat(top_p=0), 400, "top_p", None),
    "top_p over 1": ("POST", CHAT, chat(top_p=1.5), 400, "top_p", None),
    "n 0": ("POST", CHAT, chat(n=0), 400, "n", None),
    "n over the slots": ("POST", CHAT, chat(n=SLOTS + 1), 400, "n", None),
    "five stop strings": ("POST", CHAT, chat(stop=list("abcde")), 400, "stop", None),
    "seed not an integer": ("POST", CHAT, chat(seed="x"), 400, "seed", None),
    "unknown model": ("POST", CHAT, chat(model="gpt-4o"), 404, "model", "model_not_found"),
    "last turn over the context": ("POST", CHAT, chat(messages=[{"role": "user", "content": "a" * CHAT_CONTEXT}]), 400, "messages", "context_length_exceeded"),
    "characters the tokenizer lacks": ("POST", CHAT, chat(messages=[{"role": "user", "content": "日本"}]), 400, "messages", None),
    "prompt over the context": ("POST", COMPLETIONS, {"prompt": "a" * CHAT_CONTEXT}, 400, "prompt", "context_length_exceeded"),
    "prompt and max_tokens over the context": ("POST", COMPLETIONS, {"prompt": "a" * 100, "max_tokens": 50}, 400, "prompt", "context_length_exceeded"),
    "no prompt": ("POST", COMPLETIONS, {"max_tokens": 4}, 400, "prompt", None),
    "unknown path": ("GET", "/v1/engines", None, 404, None, "not_found"),
    "wrong method": ("GET", CHAT, None, 405, None, "method_not_allowed"),
    "wrong method on a model": ("DELETE", "/v1/models/tiny-chat", None, 405, None, "method_not_allowed"),
}  # fmt: skip


@pytest.fixture(scope="module")
def test_client(chat_model_, chat_engine):
    with TestClient(serve_app.make_app(chat_model_, chat_engine, SETTINGS)) as c:
        yield c


def send(c: TestClient, method: str, path: str, body, headers=None):
    if isinstance(body, dict):
        return c.request(method, path, json=body, headers=headers)
    content = body() if callable(body) else body
    return c.request(method, path, content=content, headers=headers)


def assert_error(response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)
    assert error["message"] and "\n" not in error["message"]
    return error


@pytest.mark.parametrize("name", list(BAD))
def test_bad_requests_get_openai_errors(test_client, name):
    method, path, body, status, param, code = BAD[name]
    assert_error(send(test_client, method, path, body), status, param, code)


def test_the_server_works_after_refusals(test_client):
    for method, path, body, *_ in BAD.values():
        send(test_client, method, path, body)
    r = test_client.post(CHAT, json=chat(seed=1))
    assert (
        r.status_code == 200
        and r.json()["choices"][0]["message"]["role"] == "assistant"
    )


def test_oldest_turns_are_dropped_to_fit(test_client):
    turns = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 8}
        for i in range(7)
    ]
    messages = [{"role": "system", "content": "be kind."}, *turns]
    r = test_client.post(CHAT, json=chat(messages=messages, max_tokens=40))
    assert r.status_code == 200, r.text
    assert int(r.headers["x-jaxgpt-dropped-turns"]) > 0
    assert r.json()["usage"]["prompt_tokens"] + 40 <= CHAT_CONTEXT


def test_api_key(chat_model_, chat_engine):
    settings = serve_app.Settings(slots=SLOTS, api_key="s3cret key")
    with TestClient(serve_app.make_app(chat_model_, chat_engine, settings)) as c:
        for headers in (
            {},
            {"authorization": "Bearer wrong"},
            {"authorization": "s3cret key"},
        ):
            for method, path, body in (
                ("GET", "/v1/models", None),
                ("POST", CHAT, chat()),
            ):
                r = send(c, method, path, body, headers)
                error = assert_error(r, 401, None, "invalid_api_key")
                assert "api_key" in error["message"]
        good = {"authorization": "Bearer s3cret key"}
        assert c.get("/v1/models", headers=good).status_code == 200
        assert c.post(CHAT, json=chat(), headers=good).status_code == 200
        assert c.get("/health").status_code == 200  # For a load balancer's checks.


def test_a_full_queue_is_a_429_with_retry_after(chat_model_):
    """Past --max_waiting replies waiting, a request is refused at once (n rows
    count as n), and OpenAI's client reads it as a rate limit."""

    class Busy:  # An engine whose slots are taken and 2 replies wait.
        waiting = (object(), object())

        def submit(self, *args, **kwargs):
            raise AssertionError("a refused request reached the engine")

    settings = serve_app.Settings(slots=SLOTS, max_waiting=3)
    with TestClient(serve_app.make_app(chat_model_, Busy(), settings)) as c:
        r = c.post(CHAT, json=chat(n=2))
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        error = r.json()["error"]
        assert (
            error["code"] == "rate_limit_exceeded"
            and "--max_waiting=3" in error["message"]
        )
        openai = pytest.importorskip("openai")
        api = openai.OpenAI(
            base_url=str(c.base_url) + "/v1", api_key="-", http_client=c,
            max_retries=0,
        )  # fmt: skip
        with pytest.raises(openai.RateLimitError):
            api.chat.completions.create(
                model="tiny-chat", messages=[{"role": "user", "content": "hi"}], n=2
            )


def test_a_stopped_engine_is_a_503(chat_model_):
    engine = Engine(chat_model_, slots=1)
    engine.close()
    with TestClient(serve_app.make_app(chat_model_, engine, SETTINGS)) as c:
        r = c.post(CHAT, json=chat())
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"


# --- the command ---------------------------------------------------------------------


def serve_command(*flags: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-m", "jaxgpt.serve", *flags],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        **kwargs,
    )  # fmt: skip


def test_a_port_in_use_is_refused_in_one_line():
    with listen("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="cannot listen on") as e:
            listen("127.0.0.1", port)
    assert f"--port={port}" in str(e.value) and "\n" not in str(e.value)


def test_the_command_serves_and_warns_on_every_interface(chat_folder):
    with listen("127.0.0.1", 0) as free:
        port = free.getsockname()[1]
    process = serve_command(
        f"--init_from={chat_folder}", "--host=0.0.0.0", f"--port={port}", "--slots=2"
    )
    try:
        url, end = f"http://127.0.0.1:{port}", time.time() + 120
        while True:
            try:
                _, health = post_get(url, "/health")
                break
            except OSError:
                if process.poll() is not None or time.time() > end:
                    pytest.fail("the server did not start")
                time.sleep(0.2)
        _, body = post(url, CHAT, {"messages": HELLO, "max_tokens": 3})
        assert health == {"status": "ok", "model": chat_folder}
        _, card = post_get(url, "/v1/models/" + chat_folder)  # A name with slashes.
        assert card["id"] == chat_folder and card["context_length"] == CHAT_CONTEXT
        assert 1 <= body["usage"]["completion_tokens"] <= 3
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert "with no --api_key" in err, err
    assert process.returncode == 128 + signal.SIGINT and "Traceback" not in err

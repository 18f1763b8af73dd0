"""The web chat (jaxgpt/serve/static/) in a real headless Chromium against the
real server: the model's name and context on the page, a reply that streams
in and grows, Stop mid-reply (the server cancels it, and with one slot the
next reply proves the slot free), New chat, the server's errors and the API
key prompt, text kept as text, a narrow window. Debian's chromium and
chromedriver only; the tests skip without them or without selenium.

The last test saves a 900x700 screenshot of a short conversation, at
$JAXGPT_WEB_CHAT_SCREENSHOT if set, with the tiny model or with the run in
$JAXGPT_WEB_CHAT_WORKDIR (docs/images/web_chat.png is made so: docs/serve.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from unittest import mock

import jax
import numpy as np
import pytest
from absl.testing import flagsaver
from conftest import serving

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common import driver_finder
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from jaxgpt import lecture, tokenizer
from jaxgpt.chat import model as chat_model
from jaxgpt.chat.engine import Engine
from jaxgpt.config import ModelConfig
from jaxgpt.datasets import chat_template
from jaxgpt.run import cli
from jaxgpt.serve import app as serve_app
from jaxgpt.serve.protocol import Defaults

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHARS = "".join(chr(i) for i in range(32, 127)) + "\n"  # Printable ASCII.
CONTEXT, KEY, SYSTEM = 512, "s3cret-key", "You are a tiny random model."
MAX_TOKENS, STEP_S = 400, 0.01
SCREENSHOT_TURNS = {  # By whether the model has a chat template.
    True: (
        "How do you spell 'jaxgpt'?",
        "What is 17 + 25?",
        "Write 'hello' backwards.",
    ),
    False: ("ROMEO:\nWhat news, good friar?", "JULIET:\nO, speak again!"),
}

missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
pytestmark = pytest.mark.skipif(
    bool(missing),
    reason=f"{' and '.join(missing)} missing: apt-get install chromium chromium-driver",
)


def random_params(cfg: ModelConfig, end_id: int, seed: int = 0):
    """N(0, 0.3) weights (norm scales about 1) in the model's tree (traced, not
    compiled: no init program to build), with `<|end|>`'s logit pushed to about
    -100 (ln_f's channel 0 made a constant 10 that only <|end|>'s embedding
    reads, at -10), so a reply runs to max_tokens instead of ending at random."""
    idx_BT = jax.ShapeDtypeStruct((1, cfg.block_size), np.int32)
    init = lecture.make_model(cfg).init
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0), idx_BT)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        x = rng.normal(0.0, 0.3, leaf.shape).astype(np.float32)
        return x + 1.0 if path[-1].key == "scale" else x

    params = jax.tree_util.tree_map_with_path(draw, shapes["params"])
    params["ln_f"]["scale"][0], params["ln_f"]["bias"][0] = 0.0, 10.0
    params["wte"]["embedding"][:, 0] = 0.0
    params["wte"]["embedding"][end_id, 0] = -10.0
    return params


def tiny_chat_model() -> chat_model.ChatModel:
    """A tiny random model with jaxgpt's chat tokens over characters."""
    tok, _ = chat_template.add_chat_tokens(tokenizer.CharTokenizer(CHARS))
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, block_size=CONTEXT, n_layer=1, n_head=2,
        n_embd=32, bias=True,
    )  # fmt: skip
    return chat_model.ChatModel(
        name="tiny-chat", model_cfg=cfg, params=random_params(cfg, tok.end_id),
        apply_fn=lecture.apply_of(cfg), tok=tok, template=tok,
        stop_ids=frozenset(chat_model.stop_ids_of(tok, tok)),
    )  # fmt: skip


@pytest.fixture(scope="module")
def model() -> chat_model.ChatModel:
    return tiny_chat_model()


class Paced:
    """The engine's requests, recorded, and its steps slowed to `step_s` each
    (a larger model's pace) while a test sets it."""

    def __init__(self, engine: Engine):
        self.engine, self.submitted, self.step_s = engine, [], 0.0
        step = engine.decoder.step

        def paced_step():
            time.sleep(self.step_s)
            return step()

        engine.decoder.step = paced_step

    def submit(self, *args, **kwargs):
        request = self.engine.submit(*args, **kwargs)
        self.submitted.append(request)
        return request

    @property
    def waiting(self):
        return self.engine.waiting


@pytest.fixture(scope="module")
def server(model):
    """One engine of ONE slot behind two servers: (the open one's URL, the URL
    of one that asks for KEY, the engine's Paced wrapper)."""
    engine = Engine(model, slots=1)
    paced = Paced(engine)
    defaults = Defaults(temperature=1.0, top_p=1.0, top_k=0, max_tokens=40)
    settings = serve_app.Settings(slots=1, defaults=defaults, system=SYSTEM)
    keyed = dataclasses.replace(settings, api_key=KEY)
    try:
        with (
            serving(serve_app.make_app(model, paced, settings)) as url,
            serving(serve_app.make_app(model, paced, keyed)) as keyed_url,
        ):
            yield url, keyed_url, paced
    finally:
        engine.close()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from Debian's packages; Selenium Manager (which would
    download a browser and its driver) must never run."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=900,700")
    manager = driver_finder.SeleniumManager
    ran = AssertionError("Selenium Manager ran: name the driver in Service()")
    with mock.patch.object(manager, "binary_paths", side_effect=ran):
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = 10):
    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(condition)


def find(driver, element_id: str):
    return driver.find_element(By.ID, element_id)


def value(driver, element_id: str) -> str:
    return find(driver, element_id).get_attribute("value")


def messages(driver, role: str = "") -> list[str]:
    """The conversation's texts (a role's only, if given), as inserted."""
    items = driver.find_elements(
        By.CSS_SELECTOR, f".message{'.' + role if role else ''}"
    )
    return [
        i.find_element(By.CLASS_NAME, "content").get_attribute("textContent")
        for i in items
    ]


def open_page(driver, url: str, max_tokens: int = MAX_TOKENS) -> None:
    driver.get(url + "/")
    wait(driver, lambda d: "tiny-chat" in find(d, "model").text)
    set_max_tokens(driver, max_tokens)


def set_max_tokens(driver, n: int) -> None:
    field = find(driver, "max-tokens")
    field.clear()
    field.send_keys(str(n))


def say(driver, text: str) -> None:
    """Types `text` (its newlines as Shift+Enter) and Enter; returns once the
    reply is complete."""
    lines = text.split("\n")
    keys = [lines[0]]
    for line in lines[1:]:
        keys += [Keys.SHIFT, Keys.ENTER, Keys.SHIFT, line]
    find(driver, "prompt").send_keys(*keys, Keys.ENTER)
    wait(driver, lambda d: find(d, "send").is_enabled())


def test_page_shows_the_model_and_its_defaults(browser, server):
    open_page(browser, server[0])
    assert find(browser, "model").text == f"Model: tiny-chat · context {CONTEXT} tokens"
    assert find(browser, "max-tokens").get_attribute("max") == str(CONTEXT)
    assert value(browser, "system") == SYSTEM  # The server's --system.
    assert not find(browser, "error").is_displayed()
    assert not find(browser, "stop").is_enabled()


def test_reply_streams_in_and_stop_ends_it(browser, server, model):
    url, _, paced = server
    paced.step_s = STEP_S  # A reply of MAX_TOKENS takes 4 s: time to Stop it.
    open_page(browser, url)
    box = find(browser, "prompt")
    box.send_keys("hello", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "there")
    assert value(browser, "prompt") == "hello\nthere"  # Shift+Enter: a new line.
    box.send_keys(Keys.ENTER)
    assert value(browser, "prompt") == ""
    assert messages(browser, "user") == ["hello\nthere"]
    lengths = []  # The reply's length as it streams in: it grows.
    t0 = time.monotonic()
    while len(set(lengths) - {0}) < 3 and time.monotonic() - t0 < 10:
        lengths += [len(m) for m in messages(browser, "assistant")]
        time.sleep(0.05)
    assert lengths == sorted(lengths) and len(set(lengths) - {0}) >= 3, lengths
    find(browser, "stop").click()
    wait(browser, lambda d: find(d, "status").text == "Stopped.")
    assert find(browser, "send").is_enabled()
    (stopped,) = messages(browser, "assistant")
    # The server saw the page go away: the request was cancelled mid-reply.
    request = paced.submitted[-1]
    wait(browser, lambda d: request.finish_reason is not None)
    assert request.finish_reason == "cancelled"
    assert 0 < len(model.tok.encode(stopped)) <= request.completion_tokens < MAX_TOKENS
    time.sleep(0.2)
    assert messages(browser, "assistant") == [stopped]  # Nothing more came.
    paced.step_s = 0.0

    find(browser, "new-chat").click()
    assert messages(browser) == [] and find(browser, "status").text == ""
    # The one slot is free again: the next reply comes in whole, its prompt
    # the new chat's (the system message, then the one turn).
    set_max_tokens(browser, 12)
    say(browser, "and again")
    assert len(messages(browser, "assistant")) == 1
    request = paced.submitted[-1]
    assert (request.finish_reason, request.completion_tokens) == ("length", 12)
    assert find(browser, "status").text == "The reply reached the token limit."
    assert model.tok.decode(request.prompt_ids) == (
        f"<|system|>{SYSTEM}<|end|><|user|>and again<|end|><|assistant|>"
    )


def test_server_error_is_shown_and_the_turn_given_back(browser, server):
    open_page(browser, server[0], max_tokens=CONTEXT + 1)
    say(browser, "too long a reply")
    assert find(browser, "error").is_displayed()
    assert f"max_tokens={CONTEXT + 1} is out of range" in find(browser, "error").text
    assert messages(browser) == []
    assert value(browser, "prompt") == "too long a reply"


def test_markup_is_shown_as_text(browser, server):
    open_page(browser, server[0], max_tokens=4)
    attack = "<img src=x onerror=alert(1)><b>hi</b>"
    say(browser, attack)
    assert messages(browser, "user") == [attack]
    assert len(messages(browser, "assistant")) == 1
    assert browser.find_elements(By.CSS_SELECTOR, "#log img, #log b") == []


def test_narrow_window_has_no_sideways_scroll(browser, server):
    open_page(browser, server[0], max_tokens=30)
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 360, "height": 640, "deviceScaleFactor": 1, "mobile": True},
    )
    try:
        say(browser, "a long word: " + "x" * 200)
        assert len(messages(browser, "assistant")) == 1
        width = "return [document.documentElement.scrollWidth, window.innerWidth]"
        scroll_width, window_width = browser.execute_script(width)
        assert window_width == 360 and scroll_width <= window_width
        for element_id in ("prompt", "send", "stop", "new-chat"):
            box = find(browser, element_id).rect
            assert box["x"] >= 0 and box["x"] + box["width"] <= 360, element_id
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_api_key_is_asked_for_and_sent(browser, server):
    browser.get(server[1] + "/")
    wait(browser, lambda d: find(d, "error").is_displayed())
    assert "API key" in find(browser, "error").text
    assert browser.switch_to.active_element.get_attribute("id") == "api-key"
    find(browser, "api-key").send_keys(KEY, Keys.TAB)
    wait(browser, lambda d: "tiny-chat" in find(d, "model").text)
    assert not find(browser, "error").is_displayed()
    set_max_tokens(browser, 8)
    say(browser, "hi")
    assert len(messages(browser, "assistant")) == 1
    assert server[2].submitted[-1].finish_reason == "length"


@contextlib.contextmanager
def screenshot_server(url: str):
    """(`url`, True), or a server of $JAXGPT_WEB_CHAT_WORKDIR's trained model
    and whether it has a chat template."""
    workdir = os.environ.get("JAXGPT_WEB_CHAT_WORKDIR")
    if not workdir:
        yield url, True
        return
    with flagsaver.flagsaver():
        cli.FLAGS.unparse_flags()
        cli.FLAGS(["serve", f"--workdir={workdir}"])
        trained = chat_model.load(cli.command())
    engine = Engine(trained, slots=1)
    try:
        with serving(serve_app.make_app(trained, engine)) as trained_url:
            yield trained_url, trained.chat
    finally:
        engine.close()


def test_screenshot(browser, server, tmp_path):
    """A short conversation at 900x700, saved at tmp_path (printed) or at
    $JAXGPT_WEB_CHAT_SCREENSHOT; with the tiny model, or the one trained in
    $JAXGPT_WEB_CHAT_WORKDIR."""
    path = os.environ.get("JAXGPT_WEB_CHAT_SCREENSHOT") or tmp_path / "web_chat.png"
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 900, "height": 700, "deviceScaleFactor": 1, "mobile": False},
    )
    with screenshot_server(server[0]) as (url, chat):
        turns = SCREENSHOT_TURNS[chat]
        browser.get(url + "/")
        wait(browser, lambda d: find(d, "model").text.startswith("Model: "))
        set_max_tokens(browser, 40 if chat else 60)
        if chat:  # Greedy: the answers the model finds likeliest.
            find(browser, "temperature").send_keys("0")
        for text in turns:
            say(browser, text)
        assert messages(browser, "user") == list(turns)
        assert len(messages(browser, "assistant")) == len(turns)
        assert browser.save_screenshot(str(path))
    print(f"screenshot: {path}")
    png = Path(path).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert tuple(np.frombuffer(png[16:24], ">u4")) == (900, 700)  # IHDR's size.

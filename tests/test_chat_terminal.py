"""The terminal chat, `python -m jaxgpt.chat`, used as a person uses it: in a
pseudo-terminal (pexpect), typing messages, commands and Ctrl-C (and piped,
to the end of its input).

The models are tiny random GPTs saved as a run's checkpoint, with a character
tokenizer (and jaxgpt's chat tokens, for the chat model). Their final norm is
set so that every next token is drawn uniformly from the characters and never
a chat token: a reply always runs to its token limit, one character a token,
so its length is known and a long one is still running when Ctrl-C comes.
A few checks of the Terminal class itself (a fake engine) pin down what a
terminal cannot see: the request cancelled, the options sent.
"""

from __future__ import annotations

import io
import os
import re
import string
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from conftest import REPO, write_run

from jaxgpt import sharding, train
from jaxgpt.chat import terminal
from jaxgpt.config import ConfigError, ModelConfig, TrainConfig
from jaxgpt.datasets.chat_template import add_chat_tokens
from jaxgpt.run import program
from jaxgpt.run.configs import SampleConfig
from jaxgpt.tokenizer import CharTokenizer

pexpect = pytest.importorskip("pexpect")

# No '>', '(' or '/': the prompt and the notes are told apart from any reply.
# A newline is in the vocabulary (a base model's prompt joins its messages
# with newlines) but never drawn, so a reply is one line.
VOCAB = "\n" + string.ascii_letters + string.digits + " .,!?'-:;"
CONTEXT = 4096  # Long enough that a reply of 4000 tokens takes seconds.
PROMPT = "> "
DIM = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")  # Colours (and readline's modes).


def save_run(workdir, tok, context: int) -> None:
    """A checkpoint of a random GPT whose every next token is uniform over the
    characters of `tok` but the newline (its final norm writes a constant;
    the newline's and the chat tokens' logits are -50)."""
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, block_size=context, n_layer=1, n_head=2,
        n_embd=16, bias=True,
    )  # fmt: skip
    train_cfg = TrainConfig(batch_size=1)
    state = program.create_state(
        cfg, train_cfg, train.root_key(0), sharding.make_mesh()
    )
    params = dict(state.params)
    wte_VC = np.array(params["wte"]["embedding"])
    wte_VC[:, 0] = 0.0
    wte_VC[0, 0] = -50.0  # The newline.
    wte_VC[len(VOCAB) :, 0] = -50.0  # The chat tokens (none for the base model).
    params["wte"] = {"embedding": wte_VC}
    params["ln_f"] = {
        "scale": np.zeros(cfg.n_embd, np.float32),
        "bias": np.eye(cfg.n_embd, dtype=np.float32)[0],  # Logits: wte_VC[:, 0].
    }
    write_run(workdir, cfg, tok, state.replace(params=params))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    base = CharTokenizer(VOCAB)
    chat_tok, _ = add_chat_tokens(base)
    folders = {}
    for name, tok, context in (("chat", chat_tok, CONTEXT), ("base", base, 32)):
        folders[name] = str(tmp_path_factory.mktemp(name) / "run")
        save_run(folders[name], tok, context)
    return folders


def spawn(*flags: str):
    """`python -m jaxgpt.chat` in a pseudo-terminal, colours on."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    with warnings.catch_warnings():
        # JAX warns of any fork once it runs threads; pexpect's child only sets
        # up the terminal and execs, touching no lock of theirs.
        warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
        return pexpect.spawn(
            sys.executable, ["-m", "jaxgpt.chat", *flags], cwd=REPO, env=env,
            encoding="utf-8", timeout=60, dimensions=(40, 250),
        )  # fmt: skip


@pytest.fixture(scope="module")
def chat(runs):
    """One conversation for the tests below, in their order; each starts and
    ends at the prompt."""
    child = spawn(f"--workdir={runs['chat']}", "--max_new_tokens=8", "--seed=3")
    child.expect(f"context {CONTEXT} tokens, chat template")
    child.expect("max 8 tokens; system prompt: none")
    child.expect_exact(PROMPT)
    yield child
    child.close(force=True)


def say(child, line: str, until: str = PROMPT) -> str:
    """Types `line`; what the program printed until `until` (the next prompt),
    colours removed."""
    child.sendline(line)
    child.expect_exact(until)
    return DIM.sub("", child.before)


def reply_of(printed: str, line: str, why: str = "(/max tokens reached)") -> str:
    """The reply printed after typing `line`, ended by the note `why`."""
    match = re.search(
        re.escape(line) + r"\r\n([^\r\n(]*)\r\n" + re.escape(why), printed
    )
    assert match, printed
    return match.group(1)


def test_replies_stream_with_the_settings(chat):
    reply = reply_of(say(chat, "hello there"), "hello there")
    assert len(reply) == 8 and set(reply) <= set(VOCAB)
    assert "temperature 0.5" in say(chat, "/temp 0.5")
    assert "max 12 tokens" in say(chat, "/max 12")
    assert len(reply_of(say(chat, "and again"), "and again")) == 12
    assert "top_p 0.9" in say(chat, "/top_p 0.9")
    assert "top_k 3" in say(chat, "/top_k 3")


def test_bad_values_say_the_fix_and_the_conversation_goes_on(chat):
    for line, fix in [
        ("/temp hot", "/temp needs a number >= 0"),
        ("/temp -1", "/temp needs a number >= 0"),
        ("/temp inf", "/temp needs a number >= 0"),
        ("/top_p 2", "/top_p needs a number in (0, 1]"),
        ("/max 0", f"/max needs a whole number of tokens from 1 to {CONTEXT - 1}"),
        ("/max 9999", f"from 1 to {CONTEXT - 1}"),
        ("/top_k 2.5", "/top_k needs a whole number"),
        ("/nonsense", "unknown command /nonsense: /help lists the commands"),
        ("héllo", "(not sent: 1 character(s) not in the vocabulary: 'é'"),
        ("//etc", "(not sent: 1 character(s) not in the vocabulary: '/'"),  # Sent.
    ]:
        printed = say(chat, line)
        assert fix in printed, printed
        assert len(printed.strip().splitlines()) == 2, printed  # The echo, one line.
    assert "max 12 tokens" in say(chat, "/max")  # Settings unchanged.
    assert len(reply_of(say(chat, "still here"), "still here")) == 12


def test_help_system_and_clear(chat):
    printed = say(chat, "/help")
    for command in ("/clear", "/temp X", "/top_p X", "/max N", "/system TEXT", "/quit"):
        assert command in printed
    assert "a second Ctrl-C in a row quits" in printed
    assert "(system prompt: 'Be brief.')" in say(chat, "/system Be brief.")
    assert "system prompt: 'Be brief.'" in say(chat, "/max")
    assert "(no system prompt)" in say(chat, "/system")
    assert "(new conversation)" in say(chat, "/clear")


def test_ctrl_c_stops_a_reply_and_a_long_conversation_drops_its_oldest_turns(chat):
    say(chat, "/clear")
    say(chat, "/max 16")
    say(chat, "first turn")  # 1 + 10 + 1, then 1 + 16 + 1 tokens.
    assert f"max {CONTEXT - 20} tokens" in say(chat, f"/max {CONTEXT - 20}")
    # The first exchange (30 tokens) and this message (1 + 3 + 1 + 1) and the
    # reply's limit do not fit: the exchange goes.
    chat.sendline("two")
    chat.expect(
        r"\(dropped the 2 oldest messages: the conversation outgrew the context"
    )
    chat.expect(r"\r\n[^\r\n(]{20}")  # The reply, running.
    chat.sendintr()
    chat.expect_exact("(stopped)")
    chat.expect_exact(PROMPT)
    # The stopped reply stays in the conversation: this message and the
    # reply's limit fit once that exchange is dropped (were the stopped reply
    # not kept, there would be nothing to drop).
    assert "max 3000 tokens" in say(chat, "/max 3000")
    chat.sendline("x" * 1090)  # 1 + 1090 + 1 + 1 + 3000: 4093 tokens.
    chat.expect(r"\(dropped the 2 oldest messages")
    chat.expect(r"\r\n[^\r\n(]{20}")
    chat.sendintr()
    chat.expect_exact("(stopped)")
    chat.expect_exact(PROMPT)


def test_ctrl_c_at_the_prompt_drops_the_line_and_quit_exits_0(chat):
    say(chat, "/max 4")
    chat.send("half a line")
    # Once readline has echoed it: a signal that comes while readline handles
    # a key is seen only at the next key (CPython's readline checks signals
    # only when its select() is interrupted).
    chat.expect_exact("half a line")
    time.sleep(0.1)
    chat.sendintr()
    chat.expect_exact("(Ctrl-C again, Ctrl-D or /quit to leave)")
    chat.expect_exact(PROMPT)
    assert len(reply_of(say(chat, "whole"), "whole")) == 4  # Still chatting.
    chat.sendline("/quit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_a_base_model_continues_text_and_runs_piped(runs):
    """Piped (no terminal): no colours, each line read is echoed after the
    prompt and gets its continuation, the end of input quits with status 0.
    The context (32 tokens) drops the oldest messages, and refuses a message
    that alone does not fit."""
    lines = ["Hi", "yo", "x" * 40, "y" * 14]
    done = subprocess.run(
        [sys.executable, "-m", "jaxgpt.chat", f"--workdir={runs['base']}",
         "--max_new_tokens=5"],
        cwd=REPO, input="".join(f"{line}\n" for line in lines), capture_output=True,
        text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "\x1b" not in out
    assert "context 32 tokens, no chat template" in out and "plain continuation" in out
    replies = re.findall(r"\n([^\n(]*)\n\(/max tokens reached\)", out)
    assert len(replies) == 3 and all(len(r) == 5 for r in replies), out
    # "Hi\n", 5 + "\n", "yo\n", 5 + "\n", then 15 tokens and 5 to draw: 32
    # holds them once the first exchange (2 messages) goes.
    assert (
        f"> {lines[2]}\n(not sent: that message alone does not fit the context of 32"
        f" tokens: shorten it)\n> {lines[3]}\n(dropped the 2 oldest messages:"
    ) in out


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--temperature=-1"], "--temperature=-1.0 must be >= 0"),
        (
            ["--max_new_tokens=5000"],
            f"context of {CONTEXT} tokens: pass --max_new_tokens",
        ),
    ],
)
def test_bad_flags_are_one_error_line(runs, flags, words):
    done = subprocess.run(
        [sys.executable, "-m", "jaxgpt.chat", f"--workdir={runs['chat']}", *flags],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and words in lines[-1], done.stderr
    assert "Traceback" not in done.stderr


def test_a_models_control_characters_are_shown_not_obeyed():
    text = "a\x1b[31mb\tc\nd\x07\x9b\x7f"
    assert terminal.shown(text) == "a^[[31mb\tc\nd^G\\x9b\\x7f"


def test_max_new_tokens_leaves_room_in_the_context():
    settings = terminal.initial_settings(SampleConfig(), "Be brief.", frozenset(), 64)
    assert (settings.max_tokens, settings.system) == (32, "Be brief.")  # 500 lowered.
    with pytest.raises(ConfigError, match="--max_new_tokens=64 leaves no room"):
        terminal.initial_settings(
            SampleConfig(max_new_tokens=64), "", {"max_new_tokens"}, 64
        )


class FakeModel:
    """chat_prompt's ids for any conversation (what Terminal asks of a model)."""

    name, context, chat = "fake", 64, True

    def chat_prompt(self, messages, max_tokens):
        self.messages = messages
        return np.arange(3, dtype=np.int32), 0


class FakeRequest:
    """A reply of two pieces, then Ctrl-C."""

    finish_reason, completion_tokens, cancelled = None, 2, False

    def __iter__(self):
        yield from ("Hel", "lo")
        raise KeyboardInterrupt

    def cancel(self):
        self.cancelled = True


class FakeEngine:
    def submit(self, prompt_ids, opts):
        self.opts, self.request = opts, FakeRequest()
        return self.request


def fake_terminal(read=input):
    settings = terminal.Settings(0.5, 0.9, 7, 8, "Be brief.")
    out = io.StringIO()
    return terminal.Terminal(FakeModel(), FakeEngine(), settings, 0, read, out), out


def test_ctrl_c_cancels_the_request_and_keeps_what_was_printed():
    chat, out = fake_terminal()
    chat.send("hi")
    assert chat.engine.request.cancelled
    assert out.getvalue() == "Hello\n(stopped)\n"  # Piped: no colours.
    assert chat.history == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert chat.model.messages[0] == {"role": "system", "content": "Be brief."}
    opts = chat.engine.opts
    assert (opts.max_tokens, opts.temperature, opts.top_p, opts.top_k) == (
        8,
        0.5,
        0.9,
        7,
    )


def test_two_ctrl_c_in_a_row_at_the_prompt_quit():
    keys = iter([KeyboardInterrupt, "/max", KeyboardInterrupt, KeyboardInterrupt, "x"])

    def read(prompt):
        key = next(keys)
        if key is KeyboardInterrupt:
            raise key
        return key

    chat, out = fake_terminal(read)
    assert chat.loop() == 0
    assert next(keys) == "x"  # Quit at the second Ctrl-C in a row, not the first.
    assert out.getvalue().count("(Ctrl-C again, Ctrl-D or /quit to leave)") == 2

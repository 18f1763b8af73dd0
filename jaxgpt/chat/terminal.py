"""The terminal chat: a conversation with a loaded model, typed at a prompt.

Each message goes to the Engine (the server's jitted KV-cache sampler, one
slot) as the model's chat template renders the conversation, and the reply is
printed piece by piece as it is sampled. A model without a chat template (a
base model) continues the conversation's text instead. Lines that start with
`/` are commands (COMMANDS). Ctrl-C stops a reply, keeping what was printed
as the assistant's turn; at the prompt it drops the line typed, and a second
Ctrl-C in a row quits, as Ctrl-D and /quit do.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Collection
from typing import TextIO

import numpy as np

from jaxgpt.chat.engine import Engine
from jaxgpt.chat.model import ChatModel, PromptTooLong
from jaxgpt.config import ConfigError
from jaxgpt.run.configs import SampleConfig
from jaxgpt.run.decoding import RowOptions

PROMPT = "> "
COMMANDS = {
    "/clear": "start a new conversation (the system prompt and settings stay)",
    "/temp X": "sampling temperature, 0 for greedy (also /temperature X)",
    "/top_p X": "sample among the likeliest tokens holding this mass, in (0, 1]",
    "/top_k N": "sample among the N likeliest tokens (0: all)",
    "/max N": "the most tokens a reply may have",
    "/system TEXT": "set the system prompt; /system alone removes it",
    "/help": "this list",
    "/quit": "leave (also /exit, Ctrl-D, or Ctrl-C twice at the prompt)",
}
ALIASES = {"/temperature": "/temp", "/exit": "/quit"}
KEYS = (
    "Ctrl-C stops a reply (what was printed stays in the conversation); at the"
    " prompt it drops the line typed, and a second Ctrl-C in a row quits."
    " A line starting with // sends the text after one /."
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the commands change: how replies are sampled, and the system prompt."""

    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    system: str = ""


class CommandError(ValueError):
    """A command's value that cannot be used: the line says the fix."""


def initial_settings(
    sample: SampleConfig, system: str, given: Collection[str], context: int
) -> Settings:
    """The flags' settings. --max_new_tokens must leave room for a message in
    the context: one given that does not is refused (ConfigError), the default
    is lowered to half the context."""
    max_tokens = sample.max_new_tokens
    if max_tokens >= context:
        if "max_new_tokens" in given:
            raise ConfigError(
                f"--max_new_tokens={max_tokens} leaves no room for a message in the"
                f" model's context of {context} tokens: pass --max_new_tokens below"
                f" {context} (e.g. {context // 2})."
            )
        max_tokens = context // 2
    return Settings(sample.temperature, sample.top_p, sample.top_k, max_tokens, system)


def _number(arg: str, kind: type[int | float], usage: str) -> int | float:
    try:
        value = kind(arg)
    except ValueError:
        raise CommandError(usage) from None
    if not math.isfinite(value):
        raise CommandError(usage)
    return value


def apply_command(settings: Settings, name: str, arg: str, context: int) -> Settings:
    """`settings` with command `name` (/temp, /top_p, /top_k, /max, /system) set
    to `arg`; CommandError says the fix of a bad value."""
    if name == "/temp":
        usage = "/temp needs a number >= 0 (0: greedy), e.g. /temp 0.7"
        value = _number(arg, float, usage)
        if value < 0:
            raise CommandError(usage)
        return dataclasses.replace(settings, temperature=value)
    if name == "/top_p":
        usage = "/top_p needs a number in (0, 1] (1: all tokens), e.g. /top_p 0.9"
        value = _number(arg, float, usage)
        if not 0 < value <= 1:
            raise CommandError(usage)
        return dataclasses.replace(settings, top_p=value)
    if name == "/top_k":
        usage = "/top_k needs a whole number >= 0 (0: all tokens), e.g. /top_k 50"
        value = _number(arg, int, usage)
        if value < 0:
            raise CommandError(usage)
        return dataclasses.replace(settings, top_k=value)
    if name == "/max":
        usage = (
            f"/max needs a whole number of tokens from 1 to {context - 1} (the"
            f" context is {context}), e.g. /max {min(200, context // 2)}"
        )
        value = _number(arg, int, usage)
        if not 1 <= value < context:
            raise CommandError(usage)
        return dataclasses.replace(settings, max_tokens=value)
    if name == "/system":
        return dataclasses.replace(settings, system=arg)
    raise CommandError(f"unknown command {name}: /help lists the commands")


def describe(settings: Settings) -> str:
    """The settings, as a line."""
    system = repr(settings.system) if settings.system else "none"
    return (
        f"temperature {settings.temperature:g}, top_p {settings.top_p:g}, top_k"
        f" {settings.top_k}, max {settings.max_tokens} tokens; system prompt: {system}"
    )


# C0 and C1 control characters (and DEL) but newline and tab: a model's text
# cannot move the cursor, recolour or retitle the terminal.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def shown(text: str) -> str:
    """`text` as printed: control characters as ^X or \\xNN."""

    def one(m: re.Match) -> str:
        code = ord(m.group())
        return f"^{chr(code + 64)}" if code < 32 else f"\\x{code:02x}"

    return CONTROL.sub(one, text)


def use_colour(out: TextIO) -> bool:
    """Colours on a terminal only (not piped), unless NO_COLOR or TERM=dumb."""
    tty = hasattr(out, "isatty") and out.isatty()
    return tty and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


class Terminal:
    """One conversation at a prompt. `read` is input() (readline's, where
    there is one); `out` where replies and notes are printed."""

    def __init__(
        self,
        model: ChatModel,
        engine: Engine,
        settings: Settings,
        seed: int,
        read: Callable[[str], str] = input,
        out: TextIO = sys.stdout,
    ):
        self.model, self.engine, self.settings = model, engine, settings
        self.read, self.out = read, out
        self.colour = use_colour(out)
        self.seeds = np.random.default_rng(seed % 2**64)  # One seed per reply.
        self.history: list[dict[str, str]] = []  # User and assistant turns.

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def note(self, line: str) -> None:
        """A line of the program's own (dimmed on a terminal)."""
        self.write(f"\x1b[2m{line}\x1b[0m\n" if self.colour else line + "\n")

    def header(self) -> None:
        model = self.model
        kind = "chat template" if model.chat else "no chat template"
        commands = " ".join(c.split()[0] for c in COMMANDS)
        self.note(
            f"{model.name}: context {model.context} tokens, {kind}. Commands:"
            f" {commands}; Ctrl-D quits."
        )
        if not model.chat:
            self.note(
                f"{model.name} has no chat template: it writes a plain continuation"
                " of the conversation's text (the messages joined by newlines)."
            )
        self.note(describe(self.settings))

    def help(self) -> None:
        width = max(len(c) for c in COMMANDS)
        for command, what in COMMANDS.items():
            self.note(f"  {command:<{width}}  {what}")
        self.note(KEYS)

    def loop(self) -> int:
        """Reads lines until /quit, Ctrl-D or two Ctrl-C in a row; returns 0."""
        interrupted = False
        while True:
            try:
                line = self.read(PROMPT)
            except EOFError:  # Ctrl-D, or the end of piped input.
                self.write("\n")
                return 0
            except KeyboardInterrupt:
                self.write("\n")
                if interrupted:
                    return 0
                interrupted = True
                self.note("(Ctrl-C again, Ctrl-D or /quit to leave)")
                continue
            interrupted = False
            try:
                if self.handle(line) == "quit":
                    return 0
            except KeyboardInterrupt:  # While a note or a command ran.
                self.write("\n")

    def handle(self, line: str) -> str | None:
        """One line typed: a command, or a message to reply to."""
        text = line.strip()
        if not text:
            return None
        if not text.startswith("/") or text.startswith("//"):
            self.send(text[1:] if text.startswith("//") else text)
            return None
        name, _, arg = text.partition(" ")
        name, arg = ALIASES.get(name.lower(), name.lower()), arg.strip()
        if name == "/quit":
            return "quit"
        if name == "/help":
            self.help()
        elif name == "/clear":
            self.history = []
            self.note("(new conversation)")
        elif name == "/system":
            self.settings = apply_command(self.settings, name, arg, self.model.context)
            self.note(f"(system prompt: {arg!r})" if arg else "(no system prompt)")
        elif not arg and name in ("/temp", "/top_p", "/top_k", "/max"):
            self.note(describe(self.settings))
        else:
            try:
                self.settings = apply_command(
                    self.settings, name, arg, self.model.context
                )
            except CommandError as e:
                self.note(str(e))
                return None
            self.note(f"({describe(self.settings)})")
        return None

    def messages(self, user: str) -> list[dict[str, str]]:
        system = self.settings.system
        turns = [*self.history, {"role": "user", "content": user}]
        return ([{"role": "system", "content": system}] if system else []) + turns

    def send(self, user: str) -> None:
        """Prints the model's reply to `user` as it is sampled, and keeps the turn."""
        settings, context = self.settings, self.model.context
        messages = self.messages(user)
        try:
            prompt_ids, dropped = self.model.chat_prompt(messages, settings.max_tokens)
        except PromptTooLong:
            alone = "with the system prompt" if settings.system else "alone"
            self.note(
                f"(not sent: that message {alone} does not fit the context of"
                f" {context} tokens: shorten it)"
            )
            return
        except ValueError as e:  # A character the tokenizer does not know.
            self.note(f"(not sent: {e})")
            return
        if dropped:
            self.history = self.history[dropped:]
            messages = "message" if dropped == 1 else "messages"
            self.note(
                f"(dropped the {dropped} oldest {messages}: the conversation outgrew"
                f" the context of {context} tokens)"
            )
        opts = RowOptions(
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            seed=int(self.seeds.integers(2**31)),
        )
        request = self.engine.submit(prompt_ids, opts)
        pieces: list[str] = []
        try:
            for piece in request:
                self.write(shown(piece))
                pieces.append(piece)
        except KeyboardInterrupt:
            request.cancel()
            self.write("\n")
            self.keep(user, "".join(pieces), "stopped")
            return
        self.write("\n")
        reply, reason = "".join(pieces), request.finish_reason
        if reason == "length":
            at_max = request.completion_tokens >= settings.max_tokens
            self.keep(user, reply, "/max tokens reached" if at_max else "context full")
        else:  # "stop"; "cancelled" if the decoding thread stopped (see the log).
            self.keep(user, reply, "" if reason == "stop" else str(reason))

    def keep(self, user: str, reply: str, why: str) -> None:
        """Adds the exchange to the conversation, unless the reply is empty;
        `why` the reply ended early (a note), or ""."""
        if not reply.strip():
            self.note(f"({why + ': ' if why else ''}no reply, the message is not kept)")
            return
        self.history += [
            {"role": "user", "content": user},
            {"role": "assistant", "content": reply},
        ]
        if why:
            self.note(f"({why})")


def line_reader(out: TextIO = sys.stdout) -> Callable[[str], str]:
    """input(), with line editing and history where readline is available and
    both ends are a terminal. Piped input is echoed after the prompt, so the
    output reads as the conversation."""
    if not sys.stdin.isatty():

        def piped(prompt: str) -> str:
            line = input()
            out.write(prompt + line + "\n")
            return line

        return piped
    if sys.stdout.isatty():
        try:
            import readline  # noqa: F401  (input() uses it once imported)
        except ImportError:
            pass
    return input


def run(model: ChatModel, engine: Engine, settings: Settings, seed: int) -> int:
    """The conversation on this terminal: the header, then lines until quit."""
    terminal = Terminal(model, engine, settings, seed, line_reader())
    terminal.header()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return terminal.loop()
    finally:
        signal.signal(signal.SIGINT, previous)

"""Requests in, text out: one thread decodes every reply in flight together.

Continuous, per-step batching: the Engine's thread owns a Decoder of `slots`
rows. A submitted request waits for a free row, is prefilled into it between
two steps, and then gets one token per step beside the others; it leaves its
row when it ends (a stop token, max_tokens, the context, a stop string or a
cancel), and the next waiting request takes the row at once. Rows never mix:
each has its own cache and key (run/decoding.py), so a reply is the same
whatever else is in flight.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Iterator, Sequence

from absl import logging

from jaxgpt.chat.model import ChatModel
from jaxgpt.run.decoding import Decoder, RowOptions

DONE = object()  # Ends a request's queue of tokens.


class Request:
    """One reply being sampled. Iterating it yields its text as it is sampled:
    whole characters only, the stop token and any stop string left out."""

    def __init__(
        self, engine: Engine, prompt_ids, opts: RowOptions, stop: Sequence[str]
    ):
        self.engine, self.prompt_ids, self.opts = engine, list(prompt_ids), opts
        self.stop = [s for s in stop if s]
        self.prompt_tokens = len(self.prompt_ids)
        self.completion_tokens = 0  # Tokens drawn (a stop token included).
        self.finish_reason: str | None = None
        self.tokens: queue.Queue = queue.Queue()  # Token ids, then DONE.
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """Ends the reply at the next step and frees its row."""
        self.cancelled.set()
        self.engine.wake()

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
        self.tokens.put(DONE)

    def __iter__(self) -> Iterator[str]:
        ids: list[int] = []
        sent = 0  # Characters of the reply yielded so far.
        hold = max((len(s) for s in self.stop), default=1) - 1
        while (token := self.tokens.get()) is not DONE:
            ids.append(token)
            text = self.engine.model.decode(ids)
            if text.endswith("\ufffd"):  # A character's bytes still to come.
                continue
            cut = min([i for s in self.stop if (i := text.find(s)) >= 0], default=-1)
            if cut >= 0:
                self.finish_reason = "stop"
                self.cancel()
                if cut > sent:
                    yield text[sent:cut]
                break
            if len(text) - hold > sent:  # Text that cannot begin a stop string.
                yield text[sent : len(text) - hold]
                sent = len(text) - hold
        else:
            text = self.engine.model.decode(ids).rstrip("\ufffd")
            if len(text) > sent:
                yield text[sent:]

    def text(self) -> str:
        """The whole reply (blocks until it ends)."""
        return "".join(self)


class Engine:
    """A thread runs a Decoder of `slots` rows over the requests in flight."""

    def __init__(self, model: ChatModel, slots: int = 16):
        self.model, self.slots = model, slots
        self.decoder = Decoder(model.apply_fn, model.params, model.model_cfg, slots)
        self.waiting: collections.deque[Request] = collections.deque()
        self.active: dict[int, Request] = {}  # Row -> its request.
        self.lock = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(
            target=self.loop, name="jaxgpt-engine", daemon=True
        )
        self.thread.start()

    def submit(self, prompt_ids, opts: RowOptions, stop: Sequence[str] = ()) -> Request:
        """Queues a reply to `prompt_ids` (1 .. context - 1 tokens)."""
        if not 0 < len(prompt_ids) < self.model.context:
            raise ValueError(
                f"a prompt of {len(prompt_ids)} tokens: give 1 to"
                f" {self.model.context - 1}."
            )
        request = Request(self, prompt_ids, opts, stop)
        with self.lock:
            if self.closed:
                raise RuntimeError("the engine is closed.")
            self.waiting.append(request)
            self.lock.notify()
        return request

    def wake(self) -> None:
        with self.lock:
            self.lock.notify()

    def close(self) -> None:
        """Ends every request and the thread."""
        with self.lock:
            self.closed = True
            self.lock.notify()
        self.thread.join()

    @property
    def in_flight(self) -> int:
        return len(self.active) + len(self.waiting)

    def loop(self) -> None:
        try:
            while self.admit():
                tokens_R = self.decoder.step()
                for row in list(self.active):
                    self.took(row, int(tokens_R[row]))
        except Exception:  # Every waiting client hears of it; then the server's log.
            logging.exception("the decoding thread stopped")
            self.closed = True
            raise
        finally:
            for request in [*self.active.values(), *self.waiting]:
                request.finish("cancelled")
            self.active.clear()
            self.waiting.clear()

    def admit(self) -> bool:
        """Frees cancelled rows and starts waiting requests in free rows;
        waits while nothing is in flight. False once closed."""
        while True:
            with self.lock:
                while not self.closed and not self.active and not self.waiting:
                    self.lock.wait()
                if self.closed:
                    return False
                for row, request in list(self.active.items()):
                    if request.cancelled.is_set():
                        self.release(row, "cancelled")
                for request in [r for r in self.waiting if r.cancelled.is_set()]:
                    self.waiting.remove(request)
                    request.finish("cancelled")
                starting = []
                while self.waiting and len(self.active) + len(starting) < self.slots:
                    request = self.waiting.popleft()
                    if request.cancelled.is_set():
                        request.finish("cancelled")
                    else:
                        starting.append(request)
            for request in starting:  # Outside the lock: a prefill takes a while.
                row = min(set(range(self.slots)) - set(self.active))
                self.active[row] = request
                self.took(
                    row, self.decoder.start(row, request.prompt_ids, request.opts)
                )
            if self.active:
                return True

    def took(self, row: int, token: int) -> None:
        """Hands a row's new token to its request; ends the request if done."""
        request = self.active[row]
        request.completion_tokens += 1
        if token in self.model.stop_ids:
            return self.release(row, "stop")
        request.tokens.put(token)
        if (
            request.completion_tokens >= request.opts.max_tokens
            or not self.decoder.room(row)
        ):
            self.release(row, "length")

    def release(self, row: int, reason: str) -> None:
        request = self.active.pop(row)
        self.decoder.free(row)
        request.finish(reason)

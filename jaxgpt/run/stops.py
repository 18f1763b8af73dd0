"""SIGINT (Ctrl-C) and SIGTERM (preemption): stop without a traceback, a crash or a loss.

Two regimes, one per phase of a run:

- Outside the training loop (imports, start-up, restoring, sampling),
  `quit_at_once` ends the process at the signal with one line and exit status
  128 + signal (130 for SIGINT, 143 for SIGTERM). Nothing of the run is
  unsaved then, and `os._exit` leaves XLA's compiler and orbax's threads
  alone instead of tearing the interpreter down under them (which can crash).
- Inside the loop (train.train), `StopRequest` turns the first signal into a
  request: the loop saves a checkpoint at the next step and returns. A second
  signal ends the process at once (the last saved checkpoint stays).

Standard library only: main.py installs `quit_at_once` before importing JAX.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)

# Run before quitting at once (e.g. releasing the workdir's lock). Signal
# handlers are process-wide, so this list is too.
_before_quit: list[Callable[[], None]] = []


def before_quit(fn: Callable[[], None]) -> Callable[[], None]:
    """Runs `fn` if a signal ends the process at once; returns a function that
    cancels this."""
    _before_quit.append(fn)
    return lambda: _before_quit.remove(fn) if fn in _before_quit else None


def _quit(signum: int, frame) -> None:
    for fn in _before_quit:
        with contextlib.suppress(Exception):  # Quitting regardless.
            fn()
    name = signal.Signals(signum).name
    message = (
        f"stopped by {name} (outside the training loop: no trained step was lost,"
        " the workdir keeps its checkpoints). Run the same command again to go on.\n"
    )
    os.write(2, message.encode())
    os._exit(128 + signum)


def install(handler) -> dict:
    """Makes `handler` handle SIGINT and SIGTERM; returns the handlers it
    replaced (for `restore`)."""
    previous = {}
    for sig in SIGNALS:
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # Not the main thread: signals stay as they are.
            pass
    return previous


def quit_at_once() -> dict:
    """Makes SIGINT and SIGTERM end the process at once with one line; returns
    the handlers it replaced (for `restore`)."""
    return install(_quit)


def restore(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class QuitAtOnce:
    """`quit_at_once` for the duration of a `with` block."""

    def __enter__(self):
        self._previous = quit_at_once()
        return self

    def __exit__(self, *exc) -> None:
        restore(self._previous)


class StopRequest:
    """While training: the first SIGINT/SIGTERM asks the loop to save and stop at
    its next step; a second one ends the process at once."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    @property
    def signum(self) -> int:
        """The requesting signal's number, 0 if none came."""
        return signal.Signals[self.signal_name].value if self.signal_name else 0

    def __enter__(self):
        self._previous = install(self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        for sig in self._previous:  # The next one kills, without a traceback.
            signal.signal(sig, signal.SIG_DFL)

    def __exit__(self, *exc):
        restore(self._previous)

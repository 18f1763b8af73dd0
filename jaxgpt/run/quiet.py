"""Readable, quiet logs: every line `HH:MM:SS message` (warnings and errors
marked: `HH:MM:SS WARNING message`) in place of absl's prefix
(`I1206 10:11:35.637018 140502936947584 main.py:328]`); jaxgpt's own log
lines, other libraries' warnings and errors in one line each, nothing of
orbax's (jaxgpt reports what a save or a restore did, and a failure in one
line). `--verbosity=1` shows everything, with absl's prefix (which names the
thread and the source line)."""

from __future__ import annotations

import functools
import logging as pylogging
import sys
import time
from pathlib import Path

from absl import logging


def install() -> None:
    """Sets absl's log handler's format (Lines) and filters it, the "absl"
    logger (which orbax logs to, and which Python's own handler prints outside
    absl's app.run: plot, ladder) and Python's unraisable-exception hook.
    Installing twice changes nothing. Call after flags are parsed (app.run's
    main), so that --verbosity=1 keeps absl's own format."""
    if logging.get_verbosity() < 1:
        logging.get_absl_handler().setFormatter(LINES)
    logging.get_absl_handler().addFilter(FILTER)
    pylogging.getLogger("absl").addFilter(FILTER)
    sys.unraisablehook = quiet_unraisable


def stamp(text: str, levelno: int = pylogging.INFO, when: float | None = None) -> str:
    """`text` as a log line: `HH:MM:SS text`, `HH:MM:SS WARNING text`."""
    clock = time.strftime("%H:%M:%S", time.localtime(when))
    mark = f" {pylogging.getLevelName(levelno)}" if levelno >= pylogging.WARNING else ""
    return f"{clock}{mark} {text}"


class Lines(pylogging.Formatter):
    """A log record as `stamp` makes it (with its traceback, if any, below)."""

    def format(self, record: pylogging.LogRecord) -> str:
        text = stamp(record.getMessage(), record.levelno, record.created)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        return f"{text}\n{record.exc_text}" if record.exc_text else text


LINES = Lines()


class QuietLibraries(pylogging.Filter):
    """jaxgpt's log lines; other libraries' warnings and errors as one line each
    without their tracebacks; nothing of orbax's (jaxgpt reports what a save or
    a restore did, and a failure in one line). With --verbosity=1, everything."""

    package_dir = str(Path(__file__).resolve().parents[1])  # jaxgpt/

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def resolved(pathname: str) -> str:
        """A record's source file, resolved once (orbax logs hundreds a run)."""
        return str(Path(pathname).resolve())

    def filter(self, record) -> bool:
        path = self.resolved(record.pathname)
        if path.startswith(self.package_dir) or logging.get_verbosity() >= 1:
            return True
        if record.levelno < pylogging.WARNING or "/orbax/" in path:
            return False  # Orbax's: jaxgpt says what a save or restore did.
        if record.levelno >= pylogging.ERROR and "/asyncio/" in path:
            return False  # Orbax's event loop's.
        lines = record.getMessage().splitlines()
        record.msg, record.args = (lines[0] if lines else ""), ()
        record.exc_info = record.exc_text = record.stack_info = None
        return True


FILTER = QuietLibraries()


def quiet_unraisable(args) -> None:
    """Drops two kinds of orbax leftovers, each already reported by jaxgpt in
    one line; passes anything else on (everything with --verbosity=1):
    - tensorstore's late callbacks into orbax's closed event loop after a
      failed write;
    - after one array of a damaged checkpoint fails to read, orbax's abandoned
      reads of the others: closed later by the garbage collector, each turns
      the close into a fresh Exception ("Exception ignored in ...")."""
    message = str(args.exc_value)
    closed_loop = (
        isinstance(args.exc_value, RuntimeError) and "loop is closed" in message
    )
    abandoned_read = message.startswith("Encountered error while reading array")
    if not (closed_loop or abandoned_read) or logging.get_verbosity() >= 1:
        sys.__unraisablehook__(args)

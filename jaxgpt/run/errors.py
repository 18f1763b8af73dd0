"""One line for each error a user can act on. Every entry point (main, prepare,
export, the lm-eval command, the tools) ends a refused or failed run with
`error: <what is wrong and the fix>` and a non-zero status, never a traceback."""

from __future__ import annotations

import errno
import os
import sys
from typing import NoReturn

from absl import logging

from jaxgpt.run import workdir


def one_line(error: BaseException) -> str:
    """`error: <message>` on one line."""
    return "error: " + " ".join(str(error).split("\n"))


def os_error_line(e: OSError, workdir_: str = ".") -> str:
    """One line for an OSError reading or writing files (a full disk names the
    workdir and its free space)."""
    where = e.filename or workdir_
    full = e.errno in workdir.FULL
    space = f"; {workdir.free_space(workdir_)} in {workdir_}" if full else ""
    advice = {
        errno.EISDIR: f" It is a folder where jaxgpt writes a file: move {where} away"
        " (or choose another --workdir) and run again.",
        errno.ENOTDIR: f" A file stands where jaxgpt keeps a folder in {where}: move"
        " it away (or choose another --workdir) and run again.",
        errno.EEXIST: f" A file stands where jaxgpt makes a folder: move {where}"
        " away (or choose another --workdir) and run again.",
        errno.EACCES: " Choose a --workdir (and files) you can write to.",
        errno.EROFS: " Choose a --workdir on a writable disk.",
    }.get(e.errno, " Fix that and run the same command again.")
    if full:
        advice = (
            " Free space (or choose another --workdir) and run the same command"
            " again to resume."
        )
    return f"error: cannot use {where} ({e.strerror or e}{space}).{advice}"


def quit_now(line: str) -> NoReturn:
    """Ends the process with `line` and exit status 1 without waiting for other
    threads: after a failed save, orbax's threads of that save may wait for it
    forever (the checkpoints are closed and cleaned up before this)."""
    logging.flush()
    sys.stdout.flush()
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    os._exit(1)


def exit_with(e: BaseException, workdir_: str = ".") -> NoReturn:
    """Ends the process with `e`'s one line (an OSError's names the file, and a
    full disk the workdir's free space)."""
    if isinstance(e, OSError):
        sys.exit(os_error_line(e, workdir_))
    sys.exit(one_line(e))

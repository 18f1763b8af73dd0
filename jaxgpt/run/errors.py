"""One line for each error a user can act on. Every entry point (main, prepare,
export, the lm-eval command, the tools) ends a refused or failed run with
`error: <what is wrong and the fix>` and a non-zero status, never a traceback."""

from __future__ import annotations

import argparse
import difflib
import errno
import os
import sys
from typing import NoReturn

from absl import flags, logging

from jaxgpt.run import workdir


def one_line(error: BaseException | str) -> str:
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


def file_error_line(e: OSError, doing: str, fix: str) -> str:
    """One line for an OSError on a file the command reads or writes (`doing`:
    "read", "write"), with `fix`."""
    return f"error: cannot {doing} {e.filename or 'a file'} ({e.strerror or e}): {fix}."


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


def unexpected_arguments_line(words: list[str]) -> str:
    """The line for words on the command line that are not flags."""
    return (
        f"error: unexpected arguments: {' '.join(words)} (flags start with --;"
        " see --help)."
    )


def flag_error_line(e: flags.Error, known: list[str]) -> str:
    """One line for absl's flags.Error (an unknown flag, with the nearest of
    `known` flag names; a flagfile that cannot be read; a bad value)."""
    if isinstance(e, flags.UnrecognizedFlagError):
        name = e.flagname
        near = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean --{near[0]}?)" if near else ""
        return f"error: unknown flag --{name}{hint}; see --help."
    if isinstance(e, flags.CantOpenFlagFileError) and isinstance(
        e.__context__, OSError
    ):
        cause = e.__context__
        if cause.errno == errno.ENOENT:
            return f"error: --flagfile={cause.filename}: no such file."
        return (
            f"error: --flagfile={cause.filename}: cannot read it"
            f" ({cause.strerror or cause})."
        )
    text = " ".join(str(e).split())
    text = text.removeprefix("flag ")  # "flag --n_layer=x: ..." names the flag.
    return f"error: {text[:1].lower() + text[1:]}; see --help."


def needs_package_line(what: str, package: str, e: ImportError, extra: str) -> str:
    """The line for a command whose optional package is not installed."""
    return f"error: {what} needs {package} ({e}): pip install -e '.[{extra}]'."


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose refusals are one `error:` line (exit 2), not
    its usage text and message."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message.rstrip('.')}; see --help.\n")
        sys.exit(2)

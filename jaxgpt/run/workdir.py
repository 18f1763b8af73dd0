"""The workdir of a training run: usable, used by one run at a time, its metrics truthful.

- `make` creates --workdir or says in one line why it cannot be used (also
  when a name jaxgpt keeps there, e.g. `best` or `lock`, is of the wrong kind).
- `Lock` is the lock file `<workdir>/lock`, holding the owner's host and pid.
  It is taken with flock(2), atomically, and the kernel drops a flock when its
  process dies, however it dies: a lock left by a killed run is found free and
  taken over (and said so). On a filesystem without flock it falls back to
  creating the file exclusively, and a lock whose owner is a dead process on
  this host is stale. In a multi-process run, process 0 holds it.
- `trim_metrics` drops the metrics.jsonl rows past the step a run resumes
  from (and half-written rows), so every evaluated step has exactly one row.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from absl import logging

from jaxgpt.config import ConfigError
from jaxgpt.run import stops

LOCK_NAME = "lock"
METRICS_NAME = "metrics.jsonl"
# The folders jaxgpt keeps in a workdir (checkpoint.py's), and what each holds.
CHECKPOINTS, BEST, DAMAGED = "checkpoints", "best", "damaged"
FOLDERS = {
    CHECKPOINTS: "the latest checkpoints",
    BEST: "the best checkpoint",
    DAMAGED: "the damaged checkpoints moved aside",
}
FILES = {LOCK_NAME: "the lock of the run using it", METRICS_NAME: "the metrics"}
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def make(workdir: str | Path) -> Path:
    """Creates --workdir (and its parents) if needed; one line if it cannot be."""
    path = Path(workdir)
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"--workdir={workdir} is a file, not a folder: choose another --workdir."
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"--workdir={workdir} cannot be created ({e.strerror}): choose a"
            " --workdir in a folder you can write to."
        ) from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--workdir={workdir} is not writable: choose a --workdir you can write to."
        )
    check_names(path)
    return path


def check_names(path: Path) -> None:
    """Each name jaxgpt keeps in the workdir is absent or of its kind (a folder,
    or a file): ConfigError naming the first that is not, and the fix."""
    kinds = [(FOLDERS, Path.is_dir, "a folder"), (FILES, Path.is_file, "a file")]
    for names, is_kind, kind in kinds:
        for name, holds in names.items():
            there = path / name
            if (there.exists() or there.is_symlink()) and not is_kind(there):
                raise ConfigError(
                    f"{there} is not {kind}: jaxgpt keeps {holds} there. Move it"
                    " away (or delete it) and run again, or choose another --workdir."
                )


def free_space(path: str | Path) -> str:
    """The free space on the disk holding `path`, for messages ("1.5 MB free")."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown space free"
    for unit in ("B", "KB", "MB", "GB"):
        if free < 1000:
            return (
                f"{free:.0f} {unit} free" if unit == "B" else f"{free:.1f} {unit} free"
            )
        free /= 1000
    return f"{free:.1f} TB free"


WRITE_ERRORS = {  # A full disk, in its three forms: errno -> what it means.
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (a file size limit)",
}
FULL = tuple(WRITE_ERRORS)


def is_disk_full(error: BaseException, errnos: tuple[int, ...] = FULL) -> bool:
    """Whether `error` (or what caused it) says the disk (or a quota) is full."""
    words = [os.strerror(n) for n in errnos]
    while error is not None:
        if isinstance(error, OSError) and error.errno in errnos:
            return True
        if any(word in str(error) for word in words):
            return True
        error = error.__cause__ or error.__context__
    return False


class WorkdirBusy(ConfigError):
    """Another live run holds the workdir's lock."""


def _owner_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}


def _describe(owner: dict | None) -> str:
    if not owner:
        return "an unknown run"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
    return f"pid {owner.get('pid')} on {owner.get('host')}, since {since}"


def _read_owner(fd: int) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def _flock_works(folder: Path) -> bool:
    """Whether the filesystem of `folder` supports flock (tried on the folder)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except OSError as e:  # EWOULDBLOCK (held by someone) means it works.
        return e.errno not in _NO_FLOCK
    finally:
        os.close(fd)


def alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Someone else's process: alive.
        return True
    return True


class Lock:
    """`<workdir>/lock`: one run at a time in a workdir (a context manager).

    `hold=False` (the other processes of a multi-process run) takes nothing.
    """

    def __init__(self, workdir: str | Path, hold: bool = True):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_NAME
        self.hold = hold
        self._fd: int | None = None
        self.stale: dict | None = None  # The dead owner whose lock was taken over.

    def __enter__(self):
        if self.hold:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Takes the lock, or raises WorkdirBusy naming its live owner."""
        if self._fd is not None:
            return
        if not _flock_works(self.workdir):
            return self._acquire_by_creating()
        for _ in range(5):  # Retried only if the file was replaced meanwhile.
            fd = self._open(os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise self._busy(owner) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:  # Released (unlinked) while we waited.
                same = False
            if not same:
                os.close(fd)
                continue
            self._take(fd, _read_owner(fd))
            return None
        raise self._busy(None)

    def _acquire_by_creating(self) -> None:
        """Without flock: the lock is the file's exclusive creation."""
        for _ in range(2):
            try:
                fd = self._open(os.O_RDWR | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                try:
                    owner = json.loads(self.path.read_text() or "null")
                except (OSError, ValueError):
                    owner = None
                dead = (
                    owner
                    and owner.get("host") == socket.gethostname()
                    and not alive(int(owner.get("pid", 0)))
                )
                if not dead:
                    raise self._busy(owner) from None
                self.path.unlink(missing_ok=True)
                self.stale = owner
                continue
            self._take(fd, self.stale)
            return
        raise self._busy(None)

    def _open(self, flags: int) -> int:
        try:
            return os.open(self.path, flags, 0o644)
        except FileExistsError:
            raise
        except OSError as e:
            raise ConfigError(
                f"cannot open the lock {self.path} ({e.strerror}): move it away if"
                " it is not a file jaxgpt wrote, or choose a --workdir you can"
                " write to."
            ) from e

    def _take(self, fd: int, previous: dict | None) -> None:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(_owner_record()).encode())
        os.fsync(fd)
        self._fd = fd
        self._cancel = stops.before_quit(self.release)  # Also on a signal.
        if previous:  # A run that died holding the lock (e.g. kill -9).
            self.stale = previous
            logging.info(
                "took over the lock of a run that ended without releasing it (%s)",
                _describe(previous),
            )

    def _busy(self, owner: dict | None) -> WorkdirBusy:
        return WorkdirBusy(
            f"--workdir={self.workdir} is in use by another run ({_describe(owner)}):"
            " wait for it to end (or stop it), or choose another --workdir."
        )

    def release(self) -> None:
        """Removes the lock file and lets it go (idempotent)."""
        if self._fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                self.path.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        self._cancel()


def read_metrics(path: str | Path) -> list[dict]:
    """The parseable rows of a metrics.jsonl (a half-written last row is skipped)."""
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def trim_metrics(path: str | Path, last_step: int) -> int:
    """Keeps the rows of steps <= `last_step`, once each (the first); returns how
    many rows were dropped. The file is replaced atomically."""
    path = Path(path)
    if not path.exists():
        return 0
    total = len(path.read_text().splitlines())
    kept, seen = [], set()
    for row in read_metrics(path):
        if row["step"] <= last_step and row["step"] not in seen:
            kept.append(row)
            seen.add(row["step"])
    if len(kept) == total:
        return 0
    write_atomically(path, "".join(json.dumps(row) + "\n" for row in kept))
    return total - len(kept)


def write_atomically(path: str | Path, content: str | bytes | bytearray) -> None:
    """Writes `content` to a temporary file beside `path`, flushed to disk, then
    renames it over `path`: readers, and a crash, see the old file or the new
    one whole. Makes the folder if need be."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w" if isinstance(content, str) else "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

"""The corpus and batches: find or download tiny shakespeare, split, get_batch.

`get_batch` is pure: the batch of training step s is drawn by the generator
`streams.host_rng(batch_stream, s)`, a function of (seed, s) only, so a
resumed run sees exactly the batches an uninterrupted one would. This module
needs numpy only (micrograd's bigram uses it too).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
    "tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_SHA256 = (
    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
)
RELATIVE_PATH = Path("tinyshakespeare") / "input.txt"


class DataError(RuntimeError):
    """The corpus cannot be found, fetched or used (the message says why)."""


def cache_dir() -> Path:
    """Where a downloaded corpus is kept: $XDG_CACHE_HOME/jaxgpt or ~/.cache/jaxgpt."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxgpt"


def sha256_of(path: Path) -> str:
    """The file's sha256, read in 1 MiB blocks (a corpus need not fit in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, sha256: str, timeout: float = 30.0) -> Path:
    """Downloads `url` to `dest` atomically and checks its sha256."""
    dest = Path(dest)
    offline_hint = (
        f"Fetch {url} by hand and pass --data_path=/path/to/input.txt, or set"
        f" JAXGPT_DATA_DIR to a folder holding {RELATIVE_PATH}."
    )
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            payload = response.read()
    except OSError as e:  # URLError, timeouts, refused connections.
        raise DataError(f"could not download {url} ({e}). {offline_hint}") from e
    digest = hashlib.sha256(payload).hexdigest()
    if digest != sha256:
        raise DataError(
            f"{url} has sha256 {digest}, expected {sha256}: the download is"
            f" corrupt or the file changed. {offline_hint}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
        tmp.write(payload)
    os.replace(tmp.name, dest)
    return dest


def find_corpus(data_path: str | None = None) -> Path:
    """Finds tiny shakespeare: --data_path, $JAXGPT_DATA_DIR, the cache, the web."""
    if data_path:
        path = Path(data_path).expanduser()
        if not path.is_file():
            raise DataError(f"--data_path={data_path} is not a file.")
        return path
    if os.environ.get("JAXGPT_DATA_DIR"):
        path = Path(os.environ["JAXGPT_DATA_DIR"]).expanduser() / RELATIVE_PATH
        if path.is_file():
            return path
    cached = cache_dir() / RELATIVE_PATH
    if cached.is_file() and sha256_of(cached) == TINYSHAKESPEARE_SHA256:
        return cached
    return download(TINYSHAKESPEARE_URL, cached, TINYSHAKESPEARE_SHA256)


def load_text(data_path: str | None = None) -> str:
    """Returns the corpus text (see `find_corpus` for where it comes from)."""
    return find_corpus(data_path).read_text(encoding="utf-8")


def split(tokens: np.ndarray, train_fraction: float = 0.9):
    """First `train_fraction` of the tokens for training, the rest for validation."""
    n = int(train_fraction * len(tokens))
    return tokens[:n], tokens[n:]


def check_long_enough(n_tokens: int, block_size: int, what: str) -> None:
    """A split must hold one window of block_size + 1 tokens (inputs + targets)."""
    if n_tokens < block_size + 1:
        raise DataError(
            f"the {what} has {n_tokens} tokens, fewer than --block_size={block_size} + 1:"
            " use a smaller --block_size or a longer corpus"
            " (--data_path)."
        )


class TokenFile:
    """The token ids of a .bin file (flat, one dtype), read window by window.

    Acts as a 1-D array for what batches need, len() and slices, reading each
    slice with os.pread: nothing of the file stays mapped, so a process's
    memory stays flat however large the file. (A np.memmap keeps every page it
    touches resident: 1.2 GB after 300 batches of 64 windows of a 4 GB file,
    measured in benchmarks/data.py.)
    """

    def __init__(self, path: str | Path, dtype):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self._fd = os.open(self.path, os.O_RDONLY)
        self._n = os.fstat(self._fd).st_size // self.dtype.itemsize

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(self._n)
        if step != 1:
            raise IndexError("a TokenFile reads contiguous slices only.")
        size = self.dtype.itemsize
        data = os.pread(self._fd, max(0, stop - start) * size, start * size)
        return np.frombuffer(data, self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole file (for small files and tests)."""
        return self[:].astype(dtype) if dtype else self[:]

    def __del__(self):
        os.close(self._fd)


def get_batch(
    tokens: np.ndarray,
    rng: np.random.Generator,
    batch_size: int,
    block_size: int,
    rows: slice = slice(None),
) -> tuple[np.ndarray, np.ndarray]:
    """`batch_size` random windows: x_BT = tokens[i:i+T], y_BT = x shifted by 1.

    All the windows' starts are drawn, but only `rows` of them are read (each
    process of a multi-host run reads its own devices' rows of the same batch).
    Reading only the windows, `tokens` may be a TokenFile (or a np.memmap).
    """
    start_B = rng.integers(0, len(tokens) - block_size, size=batch_size)
    xy_BT1 = np.stack([tokens[i : i + block_size + 1] for i in start_B[rows]])
    xy_BT1 = xy_BT1.astype(np.int32)
    return xy_BT1[:, :-1], xy_BT1[:, 1:]

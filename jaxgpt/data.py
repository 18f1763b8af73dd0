"""Token files and batches: the train/val split, and get_batch.

`get_batch` is pure: the batch of training step s is drawn by the generator
`train.host_rng(batch_stream, s)`, a function of (seed, s) only, so a resumed
run sees exactly the batches an uninterrupted one would. A split is a flat
file of token ids (`TokenFile`), read a window at a time, so a corpus never
has to fit in memory. This module needs numpy only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class DataError(RuntimeError):
    """The corpus cannot be found, fetched or used (the message says why)."""


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
    """The token ids of a .bin file (flat, one dtype) as a 1-D array of len() and
    slices, each slice read with os.pread: memory stays flat however large the
    file (a np.memmap keeps the pages it touched resident: 1.2 GB after 300
    batches of 64 windows of a 4 GB file, benchmarks/data.py)."""

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
    host reads its own devices' rows), from a TokenFile or any 1-D array."""
    start_B = rng.integers(0, len(tokens) - block_size, size=batch_size)
    xy_BT1 = np.stack([tokens[i : i + block_size + 1] for i in start_B[rows]])
    xy_BT1 = xy_BT1.astype(np.int32)
    return xy_BT1[:, :-1], xy_BT1[:, 1:]

"""A split's token ids in a flat .bin file, read a window at a time: the
array that data.get_batch draws a run's batches from."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


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

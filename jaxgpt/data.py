"""Tokens and batches: the train/val split, and get_batch.

`get_batch` is pure: the batch of training step s is drawn by the generator
`train.host_rng(batch_stream, s)`, a function of (seed, s) only, so a resumed
run sees exactly the batches an uninterrupted one would. A split is any 1-D
array of token ids; the engine's are flat files read a window at a time
(jaxgpt/datasets/token_file.py), so a corpus never has to fit in memory.
This module needs numpy only.
"""

from __future__ import annotations

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


def get_batch(
    tokens: np.ndarray,
    rng: np.random.Generator,
    batch_size: int,
    block_size: int,
    rows: slice = slice(None),
) -> tuple[np.ndarray, np.ndarray]:
    """`batch_size` random windows: x_BT = tokens[i:i+T], y_BT = x shifted by 1.

    All the windows' starts are drawn, but only `rows` of them are read (each
    host reads its own devices' rows), from any 1-D array or token file."""
    start_B = rng.integers(0, len(tokens) - block_size, size=batch_size)
    xy_BT1 = np.stack([tokens[i : i + block_size + 1] for i in start_B[rows]])
    xy_BT1 = xy_BT1.astype(np.int32)
    return xy_BT1[:, :-1], xy_BT1[:, 1:]

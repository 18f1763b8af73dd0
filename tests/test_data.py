from pathlib import Path

import chex
import numpy as np
import pytest

from jaxgpt import data
from jaxgpt.datasets import token_file

B, T = 8, 16


@pytest.fixture
def tokens():
    return np.arange(1000, dtype=np.int32)  # token i sits at position i.


def test_batch_shapes_and_shift(tokens):
    x, y = data.get_batch(tokens, np.random.default_rng(0), B, T)
    chex.assert_shape([x, y], (B, T))
    assert x.dtype == np.int32
    # With tokens = arange, each row is a run of consecutive ids; y is x + 1.
    np.testing.assert_array_equal(np.diff(x, axis=1), 1)
    np.testing.assert_array_equal(y, x + 1)


def test_windows_stay_in_bounds_and_reach_the_end():
    tokens = np.arange(T + 3, dtype=np.int32)  # Only 3 possible windows.
    starts = set()
    for i in range(50):
        x, y = data.get_batch(tokens, np.random.default_rng(i), B, T)
        assert int(y.max()) <= T + 2 and int(x.min()) >= 0
        starts.update(x[:, 0].tolist())
    assert starts == {0, 1, 2}


def test_same_generator_state_same_batch(tokens):
    a = data.get_batch(tokens, np.random.default_rng(1), B, T)
    b = data.get_batch(tokens, np.random.default_rng(1), B, T)
    c = data.get_batch(tokens, np.random.default_rng(2), B, T)
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(a[0], c[0])


def test_rows_of_a_batch_are_rows_of_the_whole_batch(tokens):
    """Each process reads its own rows; together they are the one-process batch."""
    whole = data.get_batch(tokens, np.random.default_rng(3), B, T)
    parts = [
        data.get_batch(tokens, np.random.default_rng(3), B, T, rows=slice(i, i + 2))
        for i in range(0, B, 2)
    ]
    for got, want in zip(zip(*parts), whole):
        np.testing.assert_array_equal(np.concatenate(got), want)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_windows_read_from_a_token_file_are_its_bytes(tmp_path, dtype):
    high = min(70_000, np.iinfo(dtype).max)  # uint32 ids above 16 bits too.
    tokens = np.random.default_rng(0).integers(0, high, 5000).astype(dtype)
    tokens.tofile(tmp_path / "train.bin")
    file = token_file.TokenFile(tmp_path / "train.bin", dtype)
    assert len(file) == 5000
    x, y = data.get_batch(file, np.random.default_rng(4), B, T)
    starts = np.random.default_rng(4).integers(0, 5000 - T, size=B)
    for row, i in enumerate(starts):
        np.testing.assert_array_equal(x[row], tokens[i : i + T])
        np.testing.assert_array_equal(y[row], tokens[i + 1 : i + T + 1])
    assert x.dtype == np.int32
    maps = Path("/proc/self/maps")
    assert str(tmp_path / "train.bin") not in (
        maps.read_text() if maps.exists() else ""
    )


def test_split_is_90_10():
    train, val = data.split(np.arange(100))
    assert len(train) == 90 and len(val) == 10 and val[0] == 90


def test_too_short_corpus_names_block_size():
    with pytest.raises(data.DataError, match="--block_size"):
        data.check_long_enough(10, 10, "validation split")
    data.check_long_enough(11, 10, "validation split")


def test_the_last_window_of_a_token_file_is_reachable(tmp_path):
    np.arange(T + 3, dtype=np.uint16).tofile(tmp_path / "t.bin")
    file = token_file.TokenFile(tmp_path / "t.bin", np.uint16)
    lasts = set()
    for i in range(50):
        _, y = data.get_batch(file, np.random.default_rng(i), B, T)
        assert y.shape == (B, T) and int(y.max()) <= T + 2
        lasts.update(y[:, -1].tolist())
    assert max(lasts) == T + 2  # The file's last token is a target; none beyond.
    np.testing.assert_array_equal(np.asarray(file), np.arange(T + 3))

import hashlib
import io
import urllib.request

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import data

B, T = 8, 16


@pytest.fixture
def tokens():
    return jnp.arange(1000, dtype=jnp.int32)  # token i sits at position i.


def test_batch_shapes_and_shift(tokens):
    x, y = data.get_batch(jax.random.PRNGKey(0), tokens, B, T)
    chex.assert_shape([x, y], (B, T))
    assert x.dtype == jnp.int32
    # With tokens = arange, each row is a run of consecutive ids; y is x + 1.
    np.testing.assert_array_equal(np.diff(np.asarray(x), axis=1), 1)
    np.testing.assert_array_equal(y, x + 1)


def test_windows_stay_in_bounds_and_reach_the_end():
    tokens = jnp.arange(T + 3, dtype=jnp.int32)  # Only 3 possible windows.
    starts = set()
    for i in range(50):
        x, y = data.get_batch(jax.random.PRNGKey(i), tokens, B, T)
        assert int(y.max()) <= T + 2 and int(x.min()) >= 0
        starts.update(np.asarray(x[:, 0]).tolist())
    assert starts == {0, 1, 2}


def test_same_key_same_batch_different_key_different_batch(tokens):
    a = data.get_batch(jax.random.PRNGKey(1), tokens, B, T)
    b = data.get_batch(jax.random.PRNGKey(1), tokens, B, T)
    c = data.get_batch(jax.random.PRNGKey(2), tokens, B, T)
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(a[0], c[0])


def test_batch_key_is_a_function_of_seed_and_step():
    chex.assert_trees_all_equal(data.batch_key(3, 7), data.batch_key(3, 7))
    assert not np.array_equal(data.batch_key(3, 7), data.batch_key(3, 8))
    assert not np.array_equal(data.batch_key(3, 7), data.batch_key(4, 7))


def test_split_is_90_10():
    train, val = data.split(np.arange(100))
    assert len(train) == 90 and len(val) == 10 and val[0] == 90


def test_too_short_corpus_names_block_size():
    with pytest.raises(data.DataError, match="--block_size"):
        data.check_long_enough(10, 10, "validation split")
    data.check_long_enough(11, 10, "validation split")


def test_data_path_comes_first(tmp_path, monkeypatch):
    path = tmp_path / "mine.txt"
    path.write_text("abc")
    monkeypatch.setenv("JAXGPT_DATA_DIR", str(tmp_path / "nowhere"))
    assert data.find_corpus(str(path)) == path
    with pytest.raises(data.DataError, match="--data_path"):
        data.find_corpus(str(tmp_path / "missing.txt"))


def test_env_dir_then_cache_then_download(tmp_path, monkeypatch):
    payload = b"to be or not to be\n"
    monkeypatch.setattr(
        data, "TINYSHAKESPEARE_SHA256", hashlib.sha256(payload).hexdigest()
    )
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    env_dir = tmp_path / "env"
    (env_dir / "tinyshakespeare").mkdir(parents=True)
    (env_dir / "tinyshakespeare" / "input.txt").write_bytes(payload)
    monkeypatch.setenv("JAXGPT_DATA_DIR", str(env_dir))
    assert data.find_corpus() == env_dir / "tinyshakespeare" / "input.txt"

    monkeypatch.delenv("JAXGPT_DATA_DIR")
    calls = []

    def fake_urlopen(url, timeout):
        calls.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    downloaded = data.find_corpus()
    assert downloaded == tmp_path / "cache" / "jaxgpt" / "tinyshakespeare" / "input.txt"
    assert downloaded.read_bytes() == payload and calls == [data.TINYSHAKESPEARE_URL]
    assert data.find_corpus() == downloaded and len(calls) == 1  # Cached now.


def test_corrupt_download_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXGPT_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(
        urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"x")
    )
    with pytest.raises(data.DataError, match="sha256"):
        data.find_corpus()
    assert not (tmp_path / "jaxgpt" / "tinyshakespeare" / "input.txt").exists()


def test_offline_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXGPT_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(data.DataError, match="--data_path.*JAXGPT_DATA_DIR"):
        data.find_corpus()

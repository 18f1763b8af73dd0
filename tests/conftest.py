"""Shared fixtures: the corpus (shared copy, else generated text) and tiny configs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent

# The tests' runs keep compiled programs and the measured peak in a cache of
# their own, never the user's (a peak measured while tests load the machine
# would stay in it).
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="jaxgpt_test_cache_")
SHARED = REPO.parent / "shared" / "data"


def shared_corpus() -> Path | None:
    """The shared tiny shakespeare copy, if this checkout has one beside it."""
    for base in (os.environ.get("JAXGPT_DATA_DIR"), SHARED):
        if base and (Path(base) / "tinyshakespeare" / "input.txt").is_file():
            return Path(base) / "tinyshakespeare" / "input.txt"
    return None


def generated_text(n_chars: int = 60_000, seed: int = 0) -> str:
    """Deterministic play-like text for when the shared corpus is absent."""
    rng = np.random.default_rng(seed)
    sentence = (
        "the king and queen shall speak of love thy lord my good sir "
        "what say you now o fair night come hither gentle friend"
    )
    words = sentence.split()
    names = ["ROMEO", "JULIET", "KING HENRY", "FIRST CITIZEN"]
    parts = []
    while sum(map(len, parts)) < n_chars:
        line = " ".join(rng.choice(words, size=rng.integers(4, 10)))
        parts.append(f"{rng.choice(names)}:\n{line.capitalize()}.\n\n")
    return "".join(parts)[:n_chars]


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory) -> Path:
    path = shared_corpus()
    if path is None:
        path = tmp_path_factory.mktemp("corpus") / "input.txt"
        path.write_text(generated_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpus_text(corpus_path) -> str:
    return corpus_path.read_text(encoding="utf-8")


@pytest.fixture(autouse=True)
def _compilation_cache_stays_off():
    """A test that runs main.main in this process turns on the persistent
    caches (cache.enable_compilation_cache); later tests get plain jit again."""
    before = jax.config.jax_compilation_cache_dir
    yield
    if jax.config.jax_compilation_cache_dir != before:
        from jax._src import compilation_cache

        jax.config.update("jax_compilation_cache_dir", before)
        compilation_cache.reset_cache()

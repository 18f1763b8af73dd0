"""The persistent compilation cache: a second run loads its programs, a changed
program compiles anew, and cached programs give bit-identical losses."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import cache

TINY = [
    "--n_layer=1",
    "--n_head=2",
    "--n_embd=16",
    "--block_size=16",
    "--batch_size=4",
    "--max_iters=6",
    "--eval_interval=3",
    "--eval_iters=2",
    "--log_interval=3",
    "--warmup_iters=1",
    "--max_new_tokens=8",
]


def run(tmp_path, corpus_path, name, *extra):
    """A tiny training run with its own cache home; returns metrics.jsonl's text."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    workdir = tmp_path / name
    done = subprocess.run(
        [sys.executable, "-m", "jaxgpt.main", *TINY, *extra]
        + [f"--data_path={corpus_path}", f"--workdir={workdir}", "--peak_tflops=1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return (workdir / "metrics.jsonl").read_text()


def entries(tmp_path, kind: str = "xla") -> set[str]:
    return {p.name for p in (tmp_path / "cache" / "jaxgpt" / kind).iterdir()}


def test_cached_runs_match_bit_for_bit_and_changed_programs_compile(
    tmp_path, corpus_path
):
    first = run(tmp_path, corpus_path, "a")
    kept, traced = entries(tmp_path), entries(tmp_path, "programs")
    assert len(kept) >= 3  # At least the train step, evaluation and sampling.
    assert len([p for p in traced if p.endswith(".jaxexport")]) == 4  # And init.
    second = run(tmp_path, corpus_path, "b")
    assert entries(tmp_path) == kept  # Nothing compiled anew: all loaded.
    assert entries(tmp_path, "programs") == traced  # Nor traced anew.
    assert second == first  # The same losses, every float's repr equal.
    run(tmp_path, corpus_path, "c", "--n_embd=32")  # Other shapes: other programs.
    assert len(entries(tmp_path) - kept) >= 3
    assert len(entries(tmp_path, "programs") - traced) == 8


def test_cache_directory_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.compilation_cache_dir() == Path(tmp_path) / "jaxgpt" / "xla"
    assert cache.peak_file() == Path(tmp_path) / "jaxgpt" / "peak.json"


@pytest.fixture
def exports(monkeypatch):
    """The functions jax.export.export is asked to trace, in order."""
    calls, export = [], jax.export.export
    monkeypatch.setattr(
        jax.export, "export", lambda fn, **kw: calls.append(fn) or export(fn, **kw)
    )
    return calls


def test_stored_jit_reads_back_what_it_traced(tmp_path, exports):
    f = lambda x, y: {"sum": x + y, "scaled": 2 * x}
    x, y = jnp.arange(6.0), jnp.ones(6)
    first = cache.StoredJit(f, "f v1", directory=tmp_path)(x, y)
    assert len(exports) == 1 and len(list(tmp_path.glob("*.jaxexport"))) == 1
    again = cache.StoredJit(f, "f v1", directory=tmp_path)(x, y)  # A new run.
    assert len(exports) == 1  # Read back, not traced.
    np.testing.assert_array_equal(again["sum"], np.arange(6.0) + 1)
    np.testing.assert_array_equal(again["scaled"], first["scaled"])


def test_stored_jit_traces_anew_when_anything_changes(tmp_path, monkeypatch, exports):
    f = lambda x: x * 3
    x = jnp.arange(4.0)
    cache.StoredJit(f, "k", directory=tmp_path)(x)
    cache.StoredJit(f, "other key", directory=tmp_path)(x)  # Other closure.
    cache.StoredJit(f, "k", directory=tmp_path)(jnp.arange(5.0))  # Other shape.
    cache.StoredJit(f, "k", directory=tmp_path)(x.astype(jnp.int32))  # Dtype.
    monkeypatch.setattr(cache, "source_hash", lambda: "edited code")
    out = cache.StoredJit(f, "k", directory=tmp_path)(x)  # Changed source.
    assert len(exports) == 5 and len(list(tmp_path.glob("*.jaxexport"))) == 5
    np.testing.assert_array_equal(out, np.arange(4.0) * 3)


def test_stored_jit_donates_like_jit(tmp_path):
    step = lambda state, x: {"w": state["w"] + x}
    state = {"w": jnp.zeros(3)}
    for _ in range(2):  # Traced, then read back.
        new = cache.StoredJit(step, "s", directory=tmp_path, donate_argnums=0)(
            state, jnp.ones(3)
        )
        assert state["w"].is_deleted()
        state = new
    np.testing.assert_array_equal(state["w"], np.full(3, 2.0))


LOAD_STORED = """
import sys
import jax.numpy as jnp
from jaxgpt import cache
x = jnp.arange(9.0).reshape(3, 3) / 9
if sys.argv[2] == "lapack":  # A Cholesky factor: a LAPACK call on the CPU.
    f = lambda x: jnp.linalg.cholesky(x @ x.T + 3 * jnp.eye(3))
else:
    f = lambda x: jnp.tanh(x @ x.T)
y = cache.StoredJit(f, sys.argv[2], directory=sys.argv[1])(x)
print(repr(y.tolist()), "scipy.linalg" in sys.modules)
"""


@pytest.mark.parametrize("kind", ["plain", "lapack"])
def test_stored_programs_load_scipy_only_for_lapack_calls(tmp_path, kind):
    """A stored program is read back in a new process; only one that calls
    LAPACK initialises its bindings there (importing scipy.linalg)."""
    runs = [
        subprocess.run(
            [sys.executable, "-c", LOAD_STORED, str(tmp_path), kind],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout.rsplit(" ", 1)
        for _ in range(2)  # Traced and stored, then read back.
    ]
    assert len(list(tmp_path.glob("*.jaxexport"))) == 1
    assert runs[1][0] == runs[0][0]  # The same values.
    assert runs[1][1].strip() == str(kind == "lapack")

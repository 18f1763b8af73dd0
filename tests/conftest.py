"""Shared fixtures: the corpus ($JAXGPT_DATA_DIR's tiny shakespeare, else
generated text), tiny shakespeare itself for the few tests of its exact
figures, and a guard: the suite writes nothing into the checkout."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

# LLVM's optimisations off for the tests' programs, in this process and the runs
# it starts: XLA makes the same programs (the same numbers: LLVM does not
# reorder float arithmetic), compiled in about half the time and run slower,
# which the tests' tiny models do not feel (the suite: 2x faster).
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]
).strip()

import jax  # (After XLA_FLAGS.)
import numpy as np
import pytest

from jaxgpt.datasets import prepare

REPO = Path(__file__).resolve().parent.parent

# The tests' runs keep compiled programs and the measured peak in a cache of
# their own, never the user's (a peak measured while tests load the machine
# would stay in it).
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="jaxgpt_test_cache_")

try:  # Hypothesis keeps nothing (.hypothesis/: examples, caches) in the checkout.
    import hypothesis
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(tempfile.mkdtemp(prefix="jaxgpt_test_hypothesis_"))
    hypothesis.settings.register_profile("jaxgpt", database=None)
    hypothesis.settings.load_profile("jaxgpt")
except ImportError:
    pass


def shared_corpus() -> Path | None:
    """tinyshakespeare/input.txt under $JAXGPT_DATA_DIR (where jaxgpt itself
    looks), if it is set and holds one; a fresh clone has none."""
    base = os.environ.get("JAXGPT_DATA_DIR")
    path = Path(base) / prepare.RELATIVE_PATH if base else None
    return path if path is not None and path.is_file() else None


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


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """Tiny shakespeare itself (its sha256 checked), for tests of its exact
    figures; they skip without it (`pytest -m shakespeare` runs only them)."""
    path = shared_corpus()
    if path is None or prepare.sha256_of(path) != prepare.TINYSHAKESPEARE_SHA256:
        pytest.skip(
            "needs tiny shakespeare: set JAXGPT_DATA_DIR to a folder holding"
            f" {prepare.RELATIVE_PATH}"
        )
    return path


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "shakespeare: needs tiny shakespeare's exact text (skips without)"
    )


# The files that take longest (their tests start programs of their own), longest
# first: pytest-xdist hands out whole files (--dist loadfile) in collection
# order, so these go first and the short ones even out the workers' ends.
LONGEST_FIRST = [
    "test_faults.py", "test_benchmarks.py", "test_train.py", "test_accelerators.py",
    "test_evals.py", "test_generate.py", "test_llama.py", "test_notebook.py",
    "test_main.py", "test_model.py", "test_model_options.py", "test_lecture.py",
    "test_init_from.py", "test_sharding.py", "test_hf.py", "test_model_variants.py",
    "test_cache.py", "test_multihost.py", "test_micrograd_tensor.py",
]  # fmt: skip


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable.
    for item in items:  # Marked by the fixture they use: one list, not two.
        if "shakespeare_path" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shakespeare)


# --- The checkout stays as it was --------------------------------------------------

# Not the tests' writing: git's, Python's, pytest's and ruff's own caches.
UNWATCHED = {".git", "__pycache__", ".pytest_cache", ".ruff_cache"}


def checkout_state(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every folder (None) and file (size, mtime in ns) under `root`, but for
    UNWATCHED ones and virtualenvs (a pyvenv.cfg)."""
    state = {}
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = [
            d for d in dirs
            if d not in UNWATCHED and not (here / d / "pyvenv.cfg").is_file()
        ]  # fmt: skip
        for d in dirs:
            state[str((here / d).relative_to(root)) + "/"] = None
        for name in files:
            st = (here / name).lstat()
            state[str((here / name).relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return state


def changes(before: dict, after: dict) -> list[str]:
    """What differs between two checkout_state()s, one line each."""
    lines = [f"new: {p}" for p in sorted(after.keys() - before.keys())]
    lines += [f"removed: {p}" for p in sorted(before.keys() - after.keys())]
    lines += [
        f"changed: {p}"
        for p in sorted(before.keys() & after.keys())
        if before[p] != after[p]
    ]
    return lines


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):  # Not in an xdist worker.
        session.config.stash[CHECKOUT] = checkout_state(REPO)


def pytest_sessionfinish(session):
    """The run fails if any test wrote into the checkout (e.g. prepared a
    dataset in its data/, which the user's next run would train on)."""
    before = session.config.stash.get(CHECKOUT, None)
    if before is None:
        return
    changed = changes(before, checkout_state(REPO))
    if changed:
        session.config.stash[CHANGED] = changed
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config):
    changed = config.stash.get(CHANGED, None)
    if changed:
        terminalreporter.section("tests wrote into the checkout", red=True)
        terminalreporter.write_line(
            f"{REPO} changed during the run (a test must write only under its"
            " tmp_path): the run fails."
        )
        for line in changed[:50]:
            terminalreporter.write_line(f"  {line}")


CHECKOUT = pytest.StashKey[dict]()
CHANGED = pytest.StashKey[list]()


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


def subprocess_report(test_file: str, timeout: int) -> dict:
    """Runs a test file as a program (its own JAX, e.g. with 8 fake devices) and
    returns the JSON report on its last line of output."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, test_file],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_run(workdir, cfg, tok, state) -> None:
    """A run's workdir holding `state` at step 0, with the meta a run writes
    (cfg's model, tok's tokenizer): what the chat, the chat evaluation and
    GRPO load (their tests)."""
    from jaxgpt.run import checkpoint as ckpt

    meta = {
        "model": cfg.to_dict(),
        "tokenizer": tok.to_json(),
        "seed": 0,
        "dataset": "test",
        "init_from": None,
    }
    with ckpt.Checkpointer(workdir, meta) as checkpointer:
        checkpointer.save(0, state)


@contextlib.contextmanager
def serving(app):
    """An ASGI `app` served by uvicorn in a thread on a free port: its base URL
    (the server's and the web chat's tests)."""
    import threading
    import time

    import uvicorn

    from jaxgpt.serve.__main__ import listen

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)

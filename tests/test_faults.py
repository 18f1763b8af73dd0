"""Fault injection: `python -m jaxgpt.main` killed, signalled, corrupted, run twice,
out of disk, diverging and misused, on a tiny model.

Each test asserts the outcome a user sees (the exit code; one `error:` line and
no traceback) and that nothing good was lost: a surviving checkpoint restores
bitwise equal to the one an uninterrupted run saved, and metrics.jsonl has
exactly one row per evaluated step. Runs share a persistent compilation cache
so that each costs seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
import test_multihost as multihost  # The two-process helpers (tests/ is on sys.path).
from absl import flags
from absl.testing import flagsaver

from jaxgpt import main, sharding
from jaxgpt.config import ModelConfig, TrainConfig
from jaxgpt.datasets import prepare
from jaxgpt.run import checkpoint as ckpt
from jaxgpt.run import loop, program, workdir
from jaxgpt.run.configs import DataConfig

TINY = [
    "--n_layer=1",
    "--n_head=2",
    "--n_embd=16",
    "--block_size=16",
    "--batch_size=8",
    "--eval_iters=2",
    "--warmup_iters=2",
    "--log_interval=5",
    "--max_new_tokens=2",
    "--peak_tflops=1",  # No peak measurement.
]
RUN = ["--max_iters=20", "--eval_interval=5"]  # Evaluations and saves at 0, 5, ... 20.
EVALUATED = [0, 5, 10, 15, 20]
TMP = ckpt.TMP_MARK  # In the names of unfinished saves.

# Reading a damaged checkpoint in this process leaves tensorstore callbacks to
# orbax's closed event loop (main.py silences them): not a failure.
pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("compilation_cache")
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONUNBUFFERED": "1",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, corpus_text) -> Path:
    """The corpus's first 200,000 characters, prepared once under data/ beside it
    (every run reads that dataset)."""
    path = tmp_path_factory.mktemp("corpus") / "input.txt"
    path.write_text(corpus_text[:200_000], encoding="utf-8")
    prepare.ensure(DataConfig(data_path=str(path), data_dir=str(path.parent / "data")))
    return path


@pytest.fixture(scope="module")
def jaxgpt(env, corpus):
    """jaxgpt(workdir, *flags) runs the tiny model to completion: CompletedProcess."""

    def run(wd, *args, timeout=180, **kw):
        return subprocess.run(
            command(corpus, wd, *args),
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kw,
        )

    return run


@pytest.fixture
def start(env, corpus):
    """start(workdir, *flags): the tiny model's run as a Popen (stderr piped);
    any still running when the test ends is killed."""
    started = []

    def popen(wd, *args):
        started.append(
            subprocess.Popen(
                command(corpus, wd, *args),
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        return started[-1]

    yield popen
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr and not proc.stderr.closed:
            proc.stderr.close()


def command(corpus_path, wd, *args) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jaxgpt.main",
        *TINY,
        f"--data_path={corpus_path}",
        f"--data_dir={corpus_path.parent / 'data'}",
        f"--workdir={wd}",
        *args,
    ]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, jaxgpt):
    """A workdir trained to step 20 without interruption (never changed)."""
    wd = tmp_path_factory.mktemp("pristine") / "wd"
    done = jaxgpt(wd, *RUN)
    assert done.returncode == 0, done.stderr[-3000:]
    return wd


@pytest.fixture
def copy(pristine, tmp_path):
    """A copy of the pristine workdir to damage."""
    wd = tmp_path / "wd"
    shutil.copytree(pristine, wd)
    return wd


# --- What the tests check ----------------------------------------------------------


def assert_error(done, *words, code=1) -> str:
    """Exit code `code`, one `error:` line holding `words`, no traceback."""
    assert done.returncode == code, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def assert_clean(done, code=0) -> None:
    assert done.returncode == code, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "error:" not in done.stderr


def rows(wd: Path) -> list[dict]:
    return [
        json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()
    ]


def saved(wd: Path, which: str = ckpt.LATEST, step: int | None = None):
    """(state, meta) of a checkpoint, restored and verified on this process."""
    with ckpt.Checkpointer(wd, read_only=True) as checkpointer:
        step = checkpointer.latest_step(which) if step is None else step
        meta = checkpointer.read_meta(which, step)
        model_cfg, train_cfg = (
            ModelConfig(**meta["model"]),
            TrainConfig(**meta["train"]),
        )
        target = program.abstract_state(model_cfg, train_cfg, sharding.make_mesh())
        return checkpointer.load(target, which, step)


def assert_same_checkpoint(wd, want_wd, which=ckpt.LATEST, step=20) -> None:
    got, _ = saved(wd, which, step)
    want, _ = saved(want_wd, which, step)
    assert int(got.step) == int(want.step) == step
    chex.assert_trees_all_equal(got.params, want.params)
    chex.assert_trees_all_equal(got.opt_state, want.opt_state)


def steps(wd: Path, which: str = ckpt.LATEST) -> list[int]:
    folder = wd / ckpt.FOLDERS[which]
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def unfinished(wd: Path) -> list[Path]:
    return [
        p
        for folder in ckpt.FOLDERS.values()
        if (wd / folder).is_dir()
        for p in (wd / folder).iterdir()
        if ckpt.TMP_MARK in p.name
    ]


# --- Damage --------------------------------------------------------------------------


def data_file(folder: Path, item: str) -> Path:
    """The largest array data file of an item of a checkpoint."""
    files = (folder / item).rglob("*")
    return max((p for p in files if p.is_file() and p.parent.name == "d"), key=_size)


def _size(p: Path) -> int:
    return p.stat().st_size


def random_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 3
    data[at : at + 4096] = random.Random(0).randbytes(min(4096, len(data) - at))
    path.write_bytes(bytes(data))


def edit_meta(folder: Path, change, sign: bool = True) -> None:
    """Rewrites a checkpoint's meta as `change(meta)`, with a checksum of its
    own that agrees (sign) or the old one."""
    path = folder / "meta" / "metadata"
    meta = change(json.loads(path.read_text()))
    path.write_text(json.dumps(ckpt.signed(meta) if sign else meta))


def rot(folder: Path, pattern: str, new) -> None:
    """Bit rot in the meta's text: the first match of `pattern` becomes `new`
    (a string, or a function of the match)."""
    path = folder / "meta" / "metadata"
    text, n = re.subn(pattern, new, path.read_text(), count=1)
    assert n == 1, pattern
    path.write_text(text)


def wrong_checksum(folder: Path) -> None:
    """Data that no longer matches its checksum (what bit rot does); the meta
    itself is intact."""

    def change(meta):
        sums = meta["checksums"]["opt_state"]
        key = next(k for k in sums if "mu" in k)
        sums[key] = f"{int(sums[key], 16) ^ 1:016x}"
        return meta

    edit_meta(folder, change)


def without(*keys):
    return lambda meta: {k: v for k, v in meta.items() if k not in keys}


def next_digit(m: re.Match) -> str:
    return m.group(1) + str((int(m.group(2)) + 1) % 10)


DAMAGE = {
    "random bytes in params": lambda f: random_bytes(data_file(f, "params")),
    "random bytes in opt_state": lambda f: random_bytes(data_file(f, "opt_state")),
    "truncated data": lambda f: os.truncate(data_file(f, "params"), 100),
    "deleted data": lambda f: data_file(f, "opt_state").unlink(),
    "garbage meta": lambda f: (f / "meta" / "metadata").write_text("garbage"),
    "deleted meta": lambda f: (f / "meta" / "metadata").unlink(),
    "garbage _METADATA": lambda f: (f / "params" / "_METADATA").write_text("{"),
    "wrong checksum": wrong_checksum,
    # The meta, which nothing is believed from before its checksum agrees:
    "flipped best_val_loss digit": lambda f: rot(
        f, r'("best_val_loss": )(\d)', next_digit
    ),
    "flipped n_layer": lambda f: rot(f, '"n_layer": 1', '"n_layer": 3'),
    "flipped tokenizer character": lambda f: rot(
        f, r'("vocab": "[^a-y"]*)([a-y])', lambda m: m[1] + chr(ord(m[2]) + 1)
    ),
    "meta {}": lambda f: (f / "meta" / "metadata").write_text("{}"),
    "meta [1]": lambda f: (f / "meta" / "metadata").write_text("[1]"),
    "meta null": lambda f: (f / "meta" / "metadata").write_text("null"),
    "text best_val_loss": lambda f: edit_meta(
        f, lambda m: {**m, "best_val_loss": "low"}, sign=False
    ),
    "text best_val_loss, signed": lambda f: edit_meta(
        f, lambda m: {**m, "best_val_loss": "low"}
    ),
    "no meta checksum, other params": lambda f: (
        edit_meta(f, without(ckpt.META_CHECKSUM), sign=False),
        shutil.rmtree(f / "params"),
        shutil.copytree(
            f.parent.parent / "checkpoints" / "15" / "params", f / "params"
        ),
    ),
    "no checksums, signed, other params": lambda f: (
        edit_meta(f, without("checksums")),  # And readable params, not its own:
        shutil.rmtree(f / "params"),
        shutil.copytree(
            f.parent.parent / "checkpoints" / "15" / "params", f / "params"
        ),
    ),
    "no model, signed": lambda f: edit_meta(f, without("model")),
    "tokenizer {}, signed": lambda f: edit_meta(f, lambda m: {**m, "tokenizer": {}}),
}


def resume(wd: Path):
    """Checkpointer.resume of `wd` in this process: (state, meta, lines it said)."""
    said = []
    check = ckpt.check_run_meta  # As jaxgpt.main reads a run's checkpoints.
    with ckpt.Checkpointer(wd, {"jaxgpt": "test"}, check=check) as checkpointer:
        meta = checkpointer.newest_meta() or saved_meta(wd)
        model_cfg, train_cfg = (
            ModelConfig(**meta["model"]),
            TrainConfig(**meta["train"]),
        )
        target = program.abstract_state(model_cfg, train_cfg, sharding.make_mesh())
        state, meta = checkpointer.resume(target, say=said.append)
    return state, meta, "\n".join(said)


def saved_meta(wd: Path) -> dict:
    """Some readable meta of the workdir's checkpoints (for their configs)."""
    for path in sorted(wd.rglob("meta/metadata")):
        with contextlib.suppress(ValueError):
            return json.loads(path.read_text())
    raise AssertionError(f"no readable meta in {wd}")


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_named_and_the_next_older_one_used(
    damage, copy, pristine
):
    """Both copies of step 20 (latest and best) damaged: step 15 is restored, the
    same as it was saved; the damaged folders are moved aside."""
    for folder in ("checkpoints/20", "best/20"):
        DAMAGE[damage](copy / folder)
    state, meta, said = resume(copy)
    want, _ = saved(pristine, ckpt.LATEST, 15)
    assert int(state.step) == 15 and meta["best_step"] == 15
    chex.assert_trees_all_equal(state.params, want.params)
    chex.assert_trees_all_equal(state.opt_state, want.opt_state)
    for folder in ("checkpoints/20", "best/20"):
        assert f"step 20 ({copy / folder}) is damaged" in said
        assert f"moved {copy / folder}" in said
    assert "overwrite" not in said
    assert sorted(p.name for p in (copy / "damaged").iterdir()) == [
        "best-20",
        "checkpoints-20",
    ]
    assert steps(copy) == [10, 15] and steps(copy, ckpt.BEST) == [15]  # Best agrees.


def test_a_checkpoint_saved_before_meta_checksums_resumes(copy, pristine):
    """Metas without a checksum of their own (older jaxgpt) are read unsigned:
    the newest checkpoint resumes, its arrays verified, nothing is damaged."""
    for meta in copy.rglob("meta/metadata"):
        edit_meta(meta.parent.parent, without(ckpt.META_CHECKSUM), sign=False)
    state, meta, said = resume(copy)
    want, _ = saved(pristine, ckpt.LATEST, 20)
    assert int(state.step) == 20 and "damaged" not in said
    chex.assert_trees_all_equal(state.params, want.params)


def test_after_damage_the_run_trains_again_to_the_same_state(copy, pristine, jaxgpt):
    """The newest meta says another model (a flipped digit): a damaged
    checkpoint, not advice to --overwrite the intact ones."""
    DAMAGE["flipped n_layer"](copy / "checkpoints" / "20")
    DAMAGE["wrong checksum"](copy / "checkpoints" / "15")
    DAMAGE["random bytes in params"](copy / "best" / "20")
    done = jaxgpt(copy, *RUN)
    assert_clean(done)
    for folder in ("checkpoints/20", "checkpoints/15", "best/20"):
        assert f"({copy / folder}) is damaged" in done.stderr
    assert "--overwrite" not in done.stderr and "resuming from step 10" in done.stderr
    assert_same_checkpoint(copy, pristine, ckpt.LATEST)
    assert_same_checkpoint(copy, pristine, ckpt.BEST)
    assert rows(copy) == rows(pristine)  # Rows 15 and 20 dropped, then written again.


def test_no_intact_checkpoint_is_one_line_and_changes_nothing(copy, main_error):
    for folder in [*(copy / "checkpoints").iterdir(), *(copy / "best").iterdir()]:
        DAMAGE["garbage _METADATA"](folder)
    before = sorted(str(p) for p in copy.rglob("*"))
    line = main_error(copy)
    assert (
        "no checkpoint" in line and "can be read" in line and "checkpoints/20" in line
    )
    assert "--overwrite" not in line
    assert sorted(str(p) for p in copy.rglob("*")) == before


def test_checksums_catch_any_changed_element():
    import jax.numpy as jnp

    tree = {"w": jnp.arange(24, dtype=jnp.float32).reshape(4, 6), "n": jnp.int32(3)}
    sums = ckpt.checksums(tree)
    ckpt.verify(sums, tree, "params")
    for i in range(24):  # Any one element, by the smallest step a float can take.
        w = np.array(tree["w"]).ravel()
        w[i] = np.nextafter(w[i], np.float32(np.inf))
        changed = {**tree, "w": jnp.asarray(w.reshape(4, 6))}
        with pytest.raises(ckpt.Damaged, match="params/w differ"):
            ckpt.verify(sums, changed, "params")
    swapped = {**tree, "w": tree["w"][::-1]}  # Same values, other places.
    assert ckpt.checksums(swapped)["w"] != sums["w"]


def test_checksums_on_the_host_equal_those_on_the_devices():
    """numpy (CPU, one process) and jit (sharded over processes) must agree: a
    checkpoint saved by one is verified by the other."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    tree = {
        "f32": jnp.asarray(rng.normal(size=(7, 5, 3)), jnp.float32),
        "bf16": jnp.asarray(rng.normal(size=(9,)), jnp.bfloat16),
        "i32": jnp.asarray(rng.integers(-9, 9, size=(4, 4)), jnp.int32),
        "bool": jnp.asarray(rng.integers(0, 2, size=(6,)), jnp.bool_),
        "scalar": jnp.float32(-0.0),
    }
    on_devices = jax.device_get(ckpt._checksum_fn(None)(tree))
    on_host = jax.tree.map(lambda x: ckpt._leaf_checksum_np(np.asarray(x)), tree)
    for name in tree:
        np.testing.assert_array_equal(on_devices[name], on_host[name], err_msg=name)


# --- Kills ---------------------------------------------------------------------------


def test_best_agrees_after_a_kill_between_the_saves_of_a_step(copy, pristine, tmp_path):
    """Killed after latest/20 was committed while best/20 was being written;
    and the other way round."""
    (copy / "best" / "20").rename(copy / "best" / f"20{TMP}")
    shutil.copytree(copy / "checkpoints" / "15", copy / "best" / "15")  # The old best.
    state, _, _ = resume(copy)
    assert int(state.step) == 20 and unfinished(copy) == []
    assert steps(copy, ckpt.BEST) == [20]
    assert_same_checkpoint(copy, pristine, ckpt.BEST)

    other = tmp_path / "other"
    shutil.copytree(pristine, other)
    (other / "checkpoints" / "20").rename(other / "checkpoints" / f"20{TMP}")
    state, _, said = resume(other)
    assert int(state.step) == 20 and unfinished(other) == []
    assert f"resuming from {other / 'best' / '20'}" in said
    want, _ = saved(pristine, ckpt.LATEST, 20)
    chex.assert_trees_all_equal(state.params, want.params)


def wait_for(proc, pattern: str, timeout: float = 120) -> str:
    """Reads the process's stderr until a line holding `pattern`; returns all read."""
    deadline, seen = time.time() + timeout, []
    for line in proc.stderr:
        seen.append(line)
        if pattern in line or time.time() > deadline:
            break
    return "".join(seen)


def saves_in_flight(folder: Path) -> set[tuple[str, int]]:
    """(name, inode) of the temporary folders of unfinished saves in `folder`."""
    if not folder.is_dir():
        return set()
    found = set()
    for p in folder.iterdir():
        if TMP in p.name:
            with contextlib.suppress(FileNotFoundError):  # Renamed meanwhile.
                found.add((p.name, p.stat().st_ino))
    return found


def kill_during_a_save(proc, folder: Path, timeout: float = 60) -> bool:
    """kill -9 as soon as a new save appears in `folder`; whether one did."""
    old, deadline = saves_in_flight(folder), time.time() + timeout
    caught = False
    while time.time() < deadline and proc.poll() is None:
        if saves_in_flight(folder) - old:
            caught = True
            break
        time.sleep(0.0005)
    proc.kill()
    proc.communicate()
    return caught


def test_kill_9_at_random_moments_loses_nothing(tmp_path, pristine, start, jaxgpt):
    """kill -9 during saves of latest and of best, and at random moments; then
    the final state, metrics.jsonl and best equal the uninterrupted run's."""
    wd, rng, caught = tmp_path / "wd", random.Random(13), []
    for target in ["checkpoints", "best", "random", "random"]:
        proc = start(wd, *RUN)
        if target == "random":
            wait_for(proc, "peak")
            time.sleep(rng.uniform(0.0, 0.5))
            proc.kill()
            proc.communicate()
        elif kill_during_a_save(proc, wd / target):
            caught.append(target)
    assert {"checkpoints", "best"} <= set(caught), caught
    done = jaxgpt(wd, *RUN)
    assert_clean(done)
    assert_same_checkpoint(wd, pristine, ckpt.LATEST)
    assert_same_checkpoint(wd, pristine, ckpt.BEST)
    assert rows(wd) == rows(pristine)
    assert unfinished(wd) == [] and not (wd / workdir.LOCK_NAME).exists()


# --- Signals -------------------------------------------------------------------------


def test_signals_at_any_moment_of_start_up(tmp_path, start, jaxgpt, pristine):
    """SIGINT/SIGTERM while importing, setting up, compiling, evaluating: exit
    130/143 with one line, no traceback, no crash; then the run goes on."""
    wd = tmp_path / "wd"
    moments = [
        (signal.SIGINT, None, 0.6),  # Importing JAX.
        (signal.SIGTERM, "parameters", 0.0),  # Set up; compiling next.
        (signal.SIGTERM, "step 0:", 0.0),  # After the first evaluation, compiling.
    ]
    for sig, line, delay in moments:
        proc = start(wd, *RUN)
        seen = wait_for(proc, line) if line else ""
        time.sleep(delay)
        proc.send_signal(sig)
        err = seen + proc.communicate(timeout=120)[1]
        assert proc.returncode == 128 + sig, (sig, line, err[-3000:])
        assert "Traceback" not in err and "error:" not in err, err[-3000:]
        assert "took over the lock" not in err  # Released on the way out.
    done = jaxgpt(wd, *RUN)
    assert_clean(done)
    assert "took over the lock" not in done.stderr
    assert_same_checkpoint(wd, pristine, ckpt.LATEST)
    assert rows(wd) == rows(pristine)


def test_a_second_run_on_a_busy_workdir_is_refused(tmp_path, start, jaxgpt):
    """The same command twice on one workdir: the second is refused in one line,
    the first goes on (and stops cleanly on SIGTERM, keeping a checkpoint of
    the step it stopped at, which the same command then resumes)."""
    wd = tmp_path / "wd"
    long = ["--max_iters=100000", "--eval_interval=100000", "--warmup_iters=2"]
    first = start(wd, *long)
    wait_for(first, "step 10:")
    second = jaxgpt(wd, *long)
    assert_error(second, f"--workdir={wd} is in use", f"pid {first.pid} on ")
    first.send_signal(signal.SIGTERM)
    err = first.communicate(timeout=120)[1]
    assert first.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    stopped_at = steps(wd)[-1]
    assert stopped_at >= 10 and f"stopped at step {stopped_at} (SIGTERM)" in err
    assert [r["step"] for r in rows(wd)] == [0]  # The second run wrote nothing.
    assert not (wd / workdir.LOCK_NAME).exists()
    resumed = jaxgpt(wd, *long, f"--stop_at={stopped_at + 3}")
    assert_clean(resumed)
    assert f"resuming from step {stopped_at}" in resumed.stderr
    assert steps(wd)[-1] == stopped_at + 3


def test_a_stop_reaching_one_process_stops_all_at_the_same_step(tmp_path, corpus):
    """Two processes (tests/test_multihost.py's setup); SIGTERM to process 1 only:
    both save the same step and exit 143. Process 0 holds the lock meanwhile."""
    port, wd = multihost.free_port(), tmp_path / "multi"
    args = [
        *multihost.flags(corpus, wd),
        "--max_iters=100000",
        "--eval_interval=100000",
        "--peak_tflops=1",
        "--mesh_fsdp=2",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
    ]
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    procs = [
        multihost.start([*args, f"--process_id={i}"], devices=1, log=logs[i])
        for i in range(2)
    ]
    try:
        deadline = time.time() + multihost.TIMEOUT_S
        while "step 3:" not in logs[0].read_text() and time.time() < deadline:
            time.sleep(0.2)
        owner = json.loads((wd / workdir.LOCK_NAME).read_text())
        assert owner["pid"] == procs[0].pid
        procs[1].send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=multihost.TIMEOUT_S)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    err0 = logs[0].read_text()
    assert [p.returncode for p in procs] == [143, 143], err0[-3000:]
    assert "Traceback" not in err0 + logs[1].read_text()
    (stopped_at,) = {int(p.name) for p in (wd / "checkpoints").iterdir()} - {0}
    assert stopped_at % 3 == 0  # Agreed at a log step (--log_interval=3).
    assert f"stopped at step {stopped_at} (SIGTERM)" in err0
    assert not (wd / workdir.LOCK_NAME).exists()


# --- Divergence ----------------------------------------------------------------------


def test_only_finite_undiverged_states_are_saved(tmp_path, jaxgpt):
    """Stopped after diverging (a huge but finite loss) twice: nothing is saved,
    the good checkpoint of step 0 survives both stops."""
    wd = tmp_path / "wd"
    diverging = ["--stop_at=4", "--log_interval=100", "--learning_rate=10", *RUN]
    step0 = None
    for _ in range(2):
        done = jaxgpt(wd, *diverging)
        assert_error(done, "diverged by step 4", "> 3 x the best val loss", "step 0")
        assert steps(wd) == [0] and steps(wd, ckpt.BEST) == [0]
        state, _ = saved(wd)
        if step0 is not None:
            chex.assert_trees_all_equal(state.params, step0.params)
        step0 = state
    assert [r["step"] for r in rows(wd)] == [0]


def test_a_state_that_is_not_finite_is_never_saved(copy):
    """What a stop with NaN parameters does (--learning_rate=1e4): no save."""
    import jax.numpy as jnp

    state, _ = saved(copy, ckpt.LATEST, 15)
    nan = state.replace(
        step=state.step + 1,
        params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), state.params),
    )
    refused = pytest.raises(loop.Diverged, match="parameters not finite.*step 20")
    with ckpt.Checkpointer(copy, {}) as checkpointer, refused:
        loop.save_checked(16, nan, checkpointer)
    assert steps(copy) == [10, 15, 20]


# --- The disk --------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(mount: Path, options: str):
    """A tmpfs mounted at `mount` (made first) with `options`, if root can mount
    one here: yields whether it is mounted."""
    mount.mkdir()
    mounted = os.geteuid() == 0 and (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mount)], check=False)


@contextlib.contextmanager
def small_disk(tmp_path: Path):
    """A 2 MB tmpfs when root can mount one; else None (an injected write error)."""
    if os.environ.get("JAXGPT_TEST_NO_TMPFS"):
        yield None
        return
    with tmpfs(tmp_path / "small", "size=2m") as mounted:
        yield tmp_path / "small" if mounted else None


def limit_file_size():
    """In the child: files beyond 4 KB cannot be written (EFBIG)."""
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_a_full_disk_is_one_line_at_the_failed_save(tmp_path, jaxgpt, pristine):
    with small_disk(tmp_path) as mount:
        wd = (mount or tmp_path) / "wd"
        first = jaxgpt(wd, *RUN, "--stop_at=10")
        assert_clean(first)
        if mount:  # Leave 30 KB: the next save cannot fit.
            free = shutil.disk_usage(mount).free
            with open(mount / "filler", "wb") as f:
                os.posix_fallocate(f.fileno(), 0, free - 30_000)
            full = jaxgpt(wd, *RUN)
            reason = "no space left on the device"
        else:
            full = jaxgpt(wd, *RUN, preexec_fn=limit_file_size)
            reason = "file too large"
        assert_error(full, "save the checkpoint of step 15", reason, f"in {wd}", "free")
        assert unfinished(wd) == []
        assert steps(wd) == [0, 5, 10]
        assert_same_checkpoint(wd, pristine, ckpt.LATEST, 10)
        if mount:
            (mount / "filler").unlink()
        done = jaxgpt(wd, *RUN)
        assert_clean(done)
        assert_same_checkpoint(wd, pristine, ckpt.LATEST, 20)
        assert rows(wd) == rows(pristine)


# --- Bad inputs: one line each, before any training ------------------------------------

FLAGS = dict(arg[2:].split("=") for arg in TINY + RUN)


@pytest.fixture
def main_error(corpus):
    """main_error(workdir, flag=value, ...): main() in this process exits with one
    `error:` line, which it returns."""
    flags.FLAGS.mark_as_parsed()

    def run(wd, **overrides):
        given = {k: flags.FLAGS[k].parser.parse(v) for k, v in FLAGS.items()}
        given |= {"data_path": str(corpus), "workdir": str(wd)}
        given |= {"data_dir": str(corpus.parent / "data"), **overrides}
        with flagsaver.flagsaver(**given), pytest.raises(SystemExit) as exit_:
            main.main(["jaxgpt.main"])
        message = str(exit_.value.code)
        assert message.startswith("error: ") and "\n" not in message, message
        return message

    with flagsaver.flagsaver():
        yield run


def test_bad_inputs_are_one_line_before_training(tmp_path, main_error):
    empty, binary = tmp_path / "empty.txt", tmp_path / "binary.bin"
    empty.write_text("")
    binary.write_bytes(bytes(range(256)) * 64)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    wd = tmp_path / "wd"
    cases = [
        ({"data_path": str(empty)}, ["--data_path", "is empty"]),
        ({"data_path": str(binary)}, ["--data_path", "not UTF-8 text", "offset"]),
        ({"workdir": str(a_file)}, [f"--workdir={a_file} is a file"]),
        ({"workdir": f"{a_file}/sub"}, [f"--workdir={a_file}/sub cannot be created"]),
        ({"prompt": "日本"}, ["--prompt", "'日'", "'本'"]),
        ({"warmup_iters": 50, "lr_decay_iters": 100}, ["--warmup_iters=50"]),
        ({"max_loss_ratio": 0.5}, ["--max_loss_ratio=0.5"]),
    ]
    for overrides, words in cases:
        message = main_error(wd, **overrides)
        assert all(word in message for word in words), message
    assert not wd.exists()  # Nothing was trained or written.


def test_unwritable_workdir_is_one_line(tmp_path, main_error):
    ro = tmp_path / "ro"
    with tmpfs(ro, "ro,size=1m") as mounted:
        if not mounted:
            if os.geteuid() == 0:
                pytest.skip("root, and no read-only filesystem can be mounted here")
            ro.chmod(0o500)
        assert f"--workdir={ro / 'wd'} cannot be created" in main_error(ro / "wd")
        assert f"--workdir={ro} is not writable" in main_error(ro)


def test_changed_settings_are_refused_or_recorded(copy, jaxgpt, main_error):
    for flag, value in (("learning_rate", 0.002), ("batch_size", 4), ("seed", 7)):
        message = main_error(copy, **{flag: value})
        assert f"--{flag}=" in message and f"(now {value})" in message, message
        assert "step 20" in message and "--allow_changes" in message
    for folder in ("checkpoints/20", "best/20"):  # Step 15 is the newest now.
        shutil.rmtree(copy / folder)
    done = jaxgpt(copy, *RUN, "--seed=7", "--allow_changes")
    assert_clean(done)
    assert "resuming from step 15 with changed settings: --seed=1337 (now 7)" in (
        done.stderr
    )
    _, meta = saved(copy)
    assert [(r["from_step"], r["seed"]) for r in meta["settings"]] == [
        (0, 1337),
        (15, 7),
    ]
    assert [r["step"] for r in rows(copy)] == EVALUATED


def test_time_based_saves_between_evaluations(tmp_path, jaxgpt):
    wd = tmp_path / "wd"
    every_step = ["--eval_interval=100", "--save_every_minutes=1e-9"]
    done = jaxgpt(wd, *every_step, *RUN[:1], "--stop_at=7")
    assert_clean(done)
    assert done.stderr.count("minutes since the last save") == 7  # Steps 1 to 7.
    assert steps(wd) == [5, 6, 7]  # The last three of the saves kept.
    assert [r["step"] for r in rows(wd)] == [0]


# --- Nothing written before a refusal, nothing damaged believed -------------------------


def tree(root: Path) -> list[tuple[str, int]]:
    """Every path under `root`, with its size (a file's) or 0 (a folder)."""
    return sorted(
        (str(p), p.stat().st_size if p.is_file() else 0) for p in root.rglob("*")
    )


def prepared_copy(tmp_path: Path, corpus: Path, change=None) -> dict:
    """The corpus's prepared dataset copied under tmp_path/data, its meta.json
    turned into `change(meta)` (a dict or text); the flags that read it as
    prepared."""
    folder = tmp_path / "data" / "shakespeare_char"
    shutil.copytree(corpus.parent / "data" / "shakespeare_char", folder)
    if change is not None:
        meta = change(json.loads((folder / "meta.json").read_text()))
        text = meta if isinstance(meta, str) else json.dumps(meta)
        (folder / "meta.json").write_text(text)
    # The corpus it was prepared from, as --data_path: whatever text stands in
    # for tiny shakespeare, the meta's fingerprint names it, so it is taken.
    return {"data_dir": str(tmp_path / "data"), "data_path": str(corpus)}


def text_data(tmp_path: Path, files: dict[str, bytes | str], **flags_) -> dict:
    """A --data_path folder holding `files`, prepared (if at all) under
    tmp_path/data as --dataset=notes."""
    source = tmp_path / "notes"
    source.mkdir()
    for name, content in files.items():
        path = source / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(
            content
        )
    data_dir = str(tmp_path / "data")
    return {
        "data_path": str(source),
        "data_dir": data_dir,
        "dataset": "notes",
        **flags_,
    }


def gpt2_folder(tmp_path: Path, config=None, weights: bytes | None = None, **more):
    """A Hugging Face folder: config.json (text, or a small GPT2Config) and
    `weights` as model.safetensors (or `more`: name -> bytes)."""
    folder = tmp_path / "gpt2"
    folder.mkdir()
    small = {"vocab_size": 62, "n_positions": 16, "n_embd": 16, "n_layer": 1}
    if config is not False:
        config = json.dumps({**small, "n_head": 2}) if config is None else config
        (folder / "config.json").write_text(config)
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    for name, content in more.items():
        (folder / name).write_bytes(content)
    return str(folder)


NOISE = random.Random(7).randbytes(5000)
EMPTY = b"\x02\x00\x00\x00\x00\x00\x00\x00{}"  # A safetensors file of no tensors.

# case -> (setup(tmp_path, corpus) -> flags, words the one line holds). Each
# refused run leaves tmp_path (its workdir, data dir and inputs) as it was.
REFUSALS = {
    # A dataset's meta.json:
    "meta.json garbage": (
        lambda t, c: prepared_copy(t, c, lambda m: "garbage"),
        ["meta.json is not JSON", "damaged", "python -m jaxgpt.datasets.prepare"],
    ),
    "meta.json empty": (
        lambda t, c: prepared_copy(t, c, lambda m: ""),
        ["meta.json is not JSON"],
    ),
    "meta.json [1, 2]": (
        lambda t, c: prepared_copy(t, c, lambda m: [1, 2]),
        ["meta.json is a JSON list, not an object"],
    ),
    "meta.json without train_tokens": (
        lambda t, c: prepared_copy(t, c, lambda m: {**m, "train_tokens": None}),
        ["meta.json has no token count train_tokens"],
    ),
    "meta.json dtype float99": (
        lambda t, c: prepared_copy(t, c, lambda m: {**m, "dtype": "float99"}),
        ["meta.json names dtype 'float99'"],
    ),
    "meta.json tokenizer {}": (
        lambda t, c: prepared_copy(t, c, lambda m: {**m, "tokenizer": {}}),
        ["meta.json names no tokenizer"],
    ),
    "meta.json tokenizer of 3 bytes": (
        lambda t, c: prepared_copy(
            t, c, lambda m: {**m, "tokenizer": {"name": "bpe", "merges": 3}}
        ),
        ["meta.json holds a tokenizer jaxgpt cannot build"],
    ),
    "meta.json tokenizer shortened": (
        lambda t, c: prepared_copy(
            t, c, lambda m: {**m, "tokenizer": {"name": "char", "vocab": "abc"}}
        ),
        ["train.bin holds token id", "beyond the vocabulary of 3"],
    ),
    "meta.json dtype uint32": (
        lambda t, c: prepared_copy(
            t,
            c,
            lambda m: {
                **m,
                "dtype": "uint32",
                "train_tokens": m["train_tokens"] // 2,
                "val_tokens": m["val_tokens"] // 2,
            },
        ),
        ["holds token id", "files and meta.json disagree"],
    ),
    # --data_path text and --tokenizer:
    ".jsonl line not JSON": (
        lambda t, c: text_data(t, {"a.jsonl": '{"text": "hello"}\nnot json\n'}),
        ["a.jsonl, line 2, is not JSON", 'a "text" string'],
    ),
    ".jsonl line without text": (
        lambda t, c: text_data(t, {"a.jsonl": '{"body": "hello"}\n'}),
        ['a.jsonl, line 1, has no "text"'],
    ),
    ".jsonl line a list": (
        lambda t, c: text_data(t, {"a.jsonl": "[1]\n"}),
        ['line 1, has no "text"'],
    ),
    ".jsonl not UTF-8": (
        lambda t, c: text_data(t, {"a.jsonl": b'{"text": "\xff\xfe"}\n'}),
        ["a.jsonl, line 1, is not UTF-8"],
    ),
    "--tokenizer=bpe:10": (
        lambda t, c: text_data(t, {"a.txt": "hello"}, tokenizer="bpe:10"),
        ["--tokenizer=bpe:10 is too small", "bpe:257"],
    ),
    "--tokenizer=missing.json": (
        lambda t, c: text_data(t, {"a.txt": "hello"}, tokenizer=str(t / "no.json")),
        ["no.json cannot be read (No such file"],
    ),
    "--tokenizer=.json holding {}": (
        lambda t, c: text_data(
            t, {"a.txt": "hello", "tok.json": "{}"}, tokenizer=str(t / "notes/tok.json")
        ),
        ["tok.json cannot be read", "unknown tokenizer None"],
    ),
    # The model's flags:
    "--n_embd=33": (lambda t, c: {"n_embd": 33}, ["--n_embd=33 is not divisible"]),
    "--block_size=0": (lambda t, c: {"block_size": 0}, ["--block_size=0 must be"]),
    "--block_size above the val split": (
        lambda t, c: {"block_size": 30_000},
        ["val split", "fewer than --block_size=30000"],
    ),
    "--dropout=1.0": (lambda t, c: {"dropout": 1.0}, ["--dropout=1.0 must be in"]),
    "--attention=cudnn on a CPU": (
        lambda t, c: {"attention": "cudnn"},
        ["--attention=cudnn needs an NVIDIA GPU", "cpu"],
    ),
    "--learning_rate=nan": (
        lambda t, c: {"learning_rate": float("nan")},
        ["--learning_rate=nan must be"],
    ),
    "--min_lr=nan": (lambda t, c: {"min_lr": float("nan")}, ["--min_lr=nan must"]),
    "--weight_decay=inf": (
        lambda t, c: {"weight_decay": float("inf")},
        ["--weight_decay=inf must be a finite number"],
    ),
    # --init_from:
    "--init_from a missing folder": (
        lambda t, c: {"init_from": str(t / "missing")},
        ["--init_from=", "neither a folder"],
    ),
    "--init_from without config.json": (
        lambda t, c: {"init_from": gpt2_folder(t, config=False)},
        ["has no config.json"],
    ),
    "--init_from garbage config.json": (
        lambda t, c: {"init_from": gpt2_folder(t, config="garbage")},
        ["gpt2/config.json is not JSON"],
    ),
    "--init_from config.json [1]": (
        lambda t, c: {"init_from": gpt2_folder(t, config="[1]")},
        ["gpt2/config.json is a JSON list"],
    ),
    "--init_from config.json n_embd text": (
        lambda t, c: {
            "init_from": gpt2_folder(t, config='{"n_embd": "x"}', weights=EMPTY)
        },
        ["gpt2/config.json has n_embd='x'", "positive integer"],
    ),
    "--init_from random model.safetensors": (
        lambda t, c: {"init_from": gpt2_folder(t, weights=NOISE)},
        ["model.safetensors cannot be read", "damaged"],
    ),
    "--init_from random model.safetensors, sampling": (
        lambda t, c: {"init_from": gpt2_folder(t, weights=NOISE), "mode": "sample"},
        ["model.safetensors cannot be read"],
    ),
    "--init_from random pytorch_model.bin": (
        lambda t, c: {"init_from": gpt2_folder(t, **{"pytorch_model.bin": NOISE})},
        ["pytorch_model.bin is in torch's legacy"],
    ),
    "--init_from pytorch_model.bin, a zip of nothing": (
        lambda t, c: {
            "init_from": gpt2_folder(t, **{"pytorch_model.bin": empty_zip()})
        },
        ["pytorch_model.bin has no data.pkl", "torch.save"],
    ),
}


def empty_zip() -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("other.txt", "x")
    return buffer.getvalue()


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_runs_are_one_line_and_write_nothing(
    case, tmp_path, main_error, corpus
):
    """Each bad input ends in one line naming it, before anything is written:
    no workdir, no dataset folder, no temporary file."""
    setup, words = REFUSALS[case]
    overrides = setup(tmp_path, corpus)
    before = tree(tmp_path)
    message = main_error(tmp_path / "wd", **overrides)
    for word in words:
        assert word in message, message
    assert "bfloat16" not in message  # (cudnn: not advice that fails next.)
    assert tree(tmp_path) == before


def test_a_dataset_prepared_from_other_text_is_named_not_overwritten(
    copy, tmp_path, main_error
):
    """The run's dataset prepared again from other text (another vocabulary):
    one line that says so before --overwrite, and the workdir is untouched."""
    other = tmp_path / "other.txt"
    other.write_text("to be or not to be\n" * 2000)
    before = tree(copy)
    line = main_error(copy, data_path=str(other), data_dir=str(tmp_path / "data"))
    vocab = saved(copy)[1]["model"]["vocab_size"]
    assert f"another tokenizer (vocabulary {vocab}, now 8)" in line
    assert "prepared again from other text" in line
    assert line.index("prepared again") < line.index("--overwrite")
    assert tree(copy) == before


def test_sampling_and_export_read_around_damaged_metas(copy, pristine, monkeypatch):
    """A flipped digit in the newest latest meta and a garbage best meta:
    sampling and export use the next intact checkpoint of each kind, read
    with its own meta's model; no intact one is called damaged."""
    from jaxgpt.hub import export, load
    from jaxgpt.run.configs import RunConfig

    DAMAGE["flipped n_layer"](copy / "checkpoints" / "20")
    DAMAGE["meta {}"](copy / "best" / "20")
    said = []
    monkeypatch.setattr(load, "say", said.append)
    run, mesh = RunConfig(mode="sample", workdir=str(copy)), sharding.make_mesh()
    for which, step in ((ckpt.LATEST, 15), (ckpt.BEST, None)):
        if step is None:  # best/20 was the only best: none is intact.
            with pytest.raises(ckpt.CheckpointError, match="--checkpoint=latest"):
                load.load_model(run, which, mesh)
            continue
        _, params, _ = load.load_model(run, which, mesh)
        chex.assert_trees_all_equal(params, saved(pristine, which, step)[0].params)
    damaged = [line for line in said if "damaged" in line]
    latest, best = (copy / "checkpoints" / "20", copy / "best" / "20")
    assert len(damaged) == 2, said
    assert damaged[0] == (
        f"the checkpoint of step 20 ({latest}) is damaged: its meta differs from"
        " its checksum"
    )
    assert damaged[1].startswith(
        f"the checkpoint of step 20 ({best}) is damaged: its meta has no checksum"
    )
    out = copy.parent / "hf"
    export.export(RunConfig(workdir=str(copy)), ckpt.LATEST, str(out))
    _, params = load.read_model(str(out))
    want = saved(pristine, ckpt.LATEST, 15)[0].params
    chex.assert_trees_all_equal(params["wte"], want["wte"])
    assert (copy / "checkpoints" / "20").is_dir()  # Reading moves nothing.


def test_no_intact_meta_is_one_line_in_sample_and_export(copy, main_error, tmp_path):
    from jaxgpt.hub import export

    for folder in [*(copy / "checkpoints").iterdir(), *(copy / "best").iterdir()]:
        DAMAGE["meta [1]"](folder)
    before = tree(copy)
    line = main_error(copy, mode="sample")
    assert f"no checkpoint in --workdir={copy} can be read" in line
    assert "its meta is a JSON list" in line and "--checkpoint=best" in line
    out = tmp_path / "hf"
    with (
        flagsaver.flagsaver(workdir=str(copy), out=str(out)),
        pytest.raises(SystemExit) as exit_,
    ):
        export.main(["export"])
    message = str(exit_.value.code)
    assert message.startswith("error: no checkpoint in") and "\n" not in message
    assert tree(copy) == before and not out.exists()


def test_a_reader_racing_a_writer_takes_the_newer_checkpoint(copy, monkeypatch):
    """Sampling --checkpoint=best while training replaces best/20 by best/25:
    the read that fails as the folder goes is retried on best/25, and nothing
    is called damaged."""
    from jaxgpt.hub import load
    from jaxgpt.run.configs import RunConfig

    load_params, raced = ckpt.Checkpointer.load_params, []

    def racing(self, target, which, step):
        if not raced:  # The writer commits 25, then deletes 20, mid-read.
            raced.append(step)
            state, meta = saved(copy, which, 20)
            with ckpt.Checkpointer(copy, meta) as writer:  # Keeps one best.
                writer.save(25, state.replace(step=state.step + 5), val_loss=-1.0)
        return load_params(self, target, which, step)

    said = []
    monkeypatch.setattr(ckpt.Checkpointer, "load_params", racing)
    monkeypatch.setattr(load, "say", said.append)
    run = RunConfig(mode="sample", workdir=str(copy))
    _, params, _ = load.load_model(run, ckpt.BEST, sharding.make_mesh())
    assert raced == [20] and said == []
    want = saved(copy, ckpt.BEST, 25)[0].params
    chex.assert_trees_all_equal(params, want)


def test_export_is_quiet_and_refuses_a_read_only_folder(pristine, env, tmp_path):
    """`python -m jaxgpt.hub.export`: no orbax log lines; a read-only --out is one
    line, before anything is read."""
    out = tmp_path / "hf"
    done = subprocess.run(
        [sys.executable, "-m", "jaxgpt.hub.export", f"--workdir={pristine}", f"--out={out}"],
        env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert_clean(done)
    assert "orbax" not in done.stderr.lower() and "read_only" not in done.stderr
    assert (out / "model.safetensors").is_file()
    from jaxgpt.hub import export

    ro = tmp_path / "ro"
    with tmpfs(ro, "ro,size=1m") as mounted:
        if not mounted:
            pytest.skip("no read-only filesystem can be mounted here")
        with (
            flagsaver.flagsaver(workdir=str(pristine), out=str(ro / "hf")),
            pytest.raises(SystemExit) as exit_,
        ):
            export.main(["export"])
    message = str(exit_.value.code)
    assert message.startswith(f"error: --out={ro / 'hf'} cannot be written"), message
    assert "\n" not in message


# --- Preparing a dataset: whole or not at all ----------------------------------------


class Killed(BaseException):
    """What a kill -9 does to the code after it: it never runs."""


def kill_at(monkeypatch, where: str) -> None:
    """Makes the next preparation stop dead at `where` in `prepare.install`."""
    replace, write = os.replace, workdir.write_atomically
    calls = []

    def replace_(a, b):
        calls.append(b)
        if where == f"renaming {Path(b).name}":
            raise Killed
        replace(a, b)

    def write_(path, content):
        if where == "writing meta.json":
            raise Killed
        write(path, content)
        if where == "after meta.json":
            raise Killed

    monkeypatch.setattr(os, "replace", replace_)
    monkeypatch.setattr(workdir, "write_atomically", write_)


KILLS = [
    "renaming train.bin",
    "renaming val.bin",
    "writing meta.json",
    "after meta.json",
]


@pytest.mark.parametrize("again", [False, True], ids=["first", "again"])
@pytest.mark.parametrize("where", KILLS)
def test_a_killed_preparation_is_prepared_again(where, again, tmp_path, monkeypatch):
    """tiny shakespeare (found through JAXGPT_DATA_DIR) prepared as
    shakespeare_char, killed at each moment of putting its files in place,
    first or over an older preparation of other text: the folder never looks
    prepared, the next run prepares it whole, and the dead process's
    temporary files go."""
    env = tmp_path / "env" / "tinyshakespeare"
    env.mkdir(parents=True)
    monkeypatch.setenv("JAXGPT_DATA_DIR", str(tmp_path / "env"))
    cfg = DataConfig(data_dir=str(tmp_path / "data"))
    folder = tmp_path / "data" / "shakespeare_char"
    if again:  # An older preparation, of other text.
        (env / "input.txt").write_text("zzz yyy xxx\n" * 500)
        prepare.prepare(cfg)
    (env / "input.txt").write_text("to be or not to be\n" * 500)
    with monkeypatch.context() as m:
        kill_at(m, where)
        with pytest.raises(Killed):
            prepare.prepare(cfg)
    dead = dead_pid()
    leftovers = [folder / f".{s}.bin.tmp-{dead}" for s in ("train", "val")]
    for path in leftovers:  # What the kill -9 left (31 MB seen once).
        path.write_bytes(b"\0" * 1000)
    assert prepare.interrupted(folder) or not (folder / "meta.json").exists()
    assert not prepare.looks_like_nanogpt(folder, cfg)
    dataset = prepare.ensure(cfg)  # The new text, whole.
    assert dataset.tokenizer.vocab == "\n benort"
    assert dataset.meta["train_tokens"] + dataset.meta["val_tokens"] == 19 * 500
    text = dataset.tokenizer.decode(np.asarray(dataset.splits["train"])[:19])
    assert text == "to be or not to be\n"
    assert not prepare.interrupted(folder)
    assert not any(p.exists() for p in leftovers)
    assert sorted(p.name for p in folder.iterdir()) == [
        "meta.json",
        "train.bin",
        "val.bin",
    ]


def test_a_folder_of_token_files_without_meta_is_not_taken_for_gpt2(
    tmp_path, monkeypatch
):
    """What an older jaxgpt killed before meta.json left: character ids in
    train.bin and val.bin, no meta. shakespeare_char is prepared again (not
    read as nanoGPT's GPT-2 folder: a vocabulary of 50,257 over character ids)."""
    env = tmp_path / "env" / "tinyshakespeare"
    env.mkdir(parents=True)
    (env / "input.txt").write_text("to be or not to be\n" * 500)
    monkeypatch.setenv("JAXGPT_DATA_DIR", str(tmp_path / "env"))
    cfg = DataConfig(data_dir=str(tmp_path / "data"))
    folder = prepare.prepare(cfg)
    (folder / "meta.json").unlink()
    assert not prepare.looks_like_nanogpt(folder, cfg)
    assert prepare.ensure(cfg).tokenizer.vocab == "\n benort"


def full_data_dir(tmp_path: Path, monkeypatch):
    """A data dir on a 64 KB disk (a tmpfs, as root), else one whose every
    written file is /dev/full: (its path, the reason a write fails)."""
    stack = contextlib.ExitStack()
    mount = tmp_path / "small"
    if os.geteuid() == 0 and stack.enter_context(tmpfs(mount, "size=64k")):
        return stack, mount, "no space left on the device"
    real_open = open

    def full_open(path, mode="r", *args, **kw):
        target = "/dev/full" if "w" in mode and str(mount) in str(path) else path
        return real_open(target, mode, *args, **kw)

    mount.mkdir(exist_ok=True)
    monkeypatch.setattr(prepare, "open", full_open, raising=False)
    return stack, mount, "no space left on the device"


def test_a_full_data_dir_is_one_line_naming_it(
    tmp_path, monkeypatch, main_error, corpus
):
    """The automatic preparation (and python -m jaxgpt.datasets.prepare) on a full disk:
    one line naming the data dir and saying it is full; no token file, no
    temporary file, no workdir is left."""
    stack, mount, reason = full_data_dir(tmp_path, monkeypatch)
    with stack:
        data_dir = mount / "data"
        wd = tmp_path / "wd"
        line = main_error(wd, data_dir=str(data_dir))
        assert f"could not write the dataset {data_dir / 'shakespeare_char'}" in line
        assert reason in line and f"free in --data_dir={data_dir}" in line
        assert "Free space (or choose another --data_dir)" in line
        assert not wd.exists() and not data_dir.exists()
        with (
            flagsaver.flagsaver(data_path=str(corpus), data_dir=str(data_dir)),
            pytest.raises(SystemExit) as exit_,
        ):
            prepare.main(["prepare"])
        assert str(exit_.value.code).startswith("error: could not write the dataset")
        assert not data_dir.exists()


# --- Several processes that never all join -----------------------------------------------


def test_processes_that_never_all_join_give_up_in_one_line(tmp_path, corpus):
    """Process 1 without a process 0, and two processes 0: each says what it
    waits for and gives up after --distributed_timeout in one line (JAX alone
    waits 300 s, then aborts with a C++ stack); the second process 0 is
    refused at once (it would abort the first). Nothing is written."""
    wd = tmp_path / "wd"
    ports = [multihost.free_port(), multihost.free_port()]
    args = [*multihost.flags(corpus, wd), "--num_processes=2"]
    at = [
        f"--coordinator_address=127.0.0.1:{port} --distributed_timeout={timeout}"
        for port, timeout in zip(ports, (3, 10))  # The second one sees the first.
    ]
    logs = [tmp_path / f"{name}.log" for name in ("alone1", "first0", "second0")]
    alone, first = (
        multihost.start([*args, *at[i].split(), f"--process_id={1 - i}"], 1, logs[i])
        for i in range(2)
    )
    deadline = time.time() + 60
    while "waiting up to 10 s" not in logs[1].read_text() and time.time() < deadline:
        time.sleep(0.1)
    second = multihost.start([*args, *at[1].split(), "--process_id=0"], 1, logs[2])
    procs = [alone, first, second]
    try:
        for proc in procs:
            proc.wait(timeout=120)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    errs = [log.read_text() for log in logs]
    for proc, err in zip(procs, errs):
        assert_error(
            subprocess.CompletedProcess([], proc.returncode, "", err),
            "--coordinator_address=127.0.0.1:",
        )
    assert "waiting up to 3 s for all 2 processes to join" in errs[0]
    assert "process 1 of 2 gave up after 3 s waiting for process 0" in errs[0]
    assert "raise --distributed_timeout" in errs[0]
    assert "process 0 of 2 gave up after 10 s waiting for the other" in errs[1]
    assert f"port {ports[1]} of --coordinator_address" in errs[2]
    assert "in use on this host" in errs[2]
    assert not wd.exists()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- The lock and metrics.jsonl, in this process ------------------------------------------


def test_lock_is_exclusive_and_released(tmp_path):
    with workdir.Lock(tmp_path) as lock:
        owner = json.loads(lock.path.read_text())
        assert owner["pid"] == os.getpid()
        with pytest.raises(workdir.WorkdirBusy, match=f"pid {os.getpid()} on "):
            workdir.Lock(tmp_path).acquire()
    assert not (tmp_path / workdir.LOCK_NAME).exists()
    with workdir.Lock(tmp_path):  # Free again.
        pass


def test_a_dead_runs_lock_is_taken_over(tmp_path):
    stale = {"host": os.uname().nodename, "pid": dead_pid(), "since": 0}
    (tmp_path / workdir.LOCK_NAME).write_text(json.dumps(stale))
    with workdir.Lock(tmp_path) as lock:
        assert lock.stale == stale
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


def test_without_flock_the_lock_is_exclusive_creation(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    busy = pytest.raises(workdir.WorkdirBusy, match=f"pid {os.getpid()} on ")
    with workdir.Lock(tmp_path), busy:
        workdir.Lock(tmp_path).acquire()
    stale = {"host": os.uname().nodename, "pid": dead_pid(), "since": 0}
    (tmp_path / workdir.LOCK_NAME).write_text(json.dumps(stale))
    with workdir.Lock(tmp_path) as lock:
        assert lock.stale == stale


def test_trim_metrics_keeps_one_row_per_step_up_to_the_restored_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "val_loss": 4.0 - s / 10} for s in (0, 0, 5, 10, 5, 15)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 2')
    assert workdir.trim_metrics(path, 10) == 4
    assert rows(tmp_path) == [lines[0], lines[2], lines[3]]
    assert workdir.trim_metrics(path, 10) == 0
    assert workdir.trim_metrics(path, -1) == 3 and path.read_text() == ""

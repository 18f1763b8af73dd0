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

from jaxgpt import checkpoint as ckpt
from jaxgpt import loop, main, prepare, sharding, train, workdir
from jaxgpt.config import DataConfig, ModelConfig, TrainConfig

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
        target = train.abstract_state(model_cfg, train_cfg, sharding.make_mesh())
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


def wrong_checksum(folder: Path) -> None:
    """Data that no longer matches its checksum (what bit rot does)."""
    meta_file = folder / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    sums = meta["checksums"]["opt_state"]
    key = next(k for k in sums if "mu" in k)
    sums[key] = f"{int(sums[key], 16) ^ 1:016x}"
    meta_file.write_text(json.dumps(meta))


DAMAGE = {
    "random bytes in params": lambda f: random_bytes(data_file(f, "params")),
    "random bytes in opt_state": lambda f: random_bytes(data_file(f, "opt_state")),
    "truncated data": lambda f: os.truncate(data_file(f, "params"), 100),
    "deleted data": lambda f: data_file(f, "opt_state").unlink(),
    "garbage meta": lambda f: (f / "meta" / "metadata").write_text("garbage"),
    "deleted meta": lambda f: (f / "meta" / "metadata").unlink(),
    "garbage _METADATA": lambda f: (f / "params" / "_METADATA").write_text("{"),
    "wrong checksum": wrong_checksum,
}


def resume(wd: Path):
    """Checkpointer.resume of `wd` in this process: (state, meta, lines it said)."""
    said = []
    with ckpt.Checkpointer(wd, {"jaxgpt": "test"}) as checkpointer:
        meta = checkpointer.newest_meta() or saved_meta(wd)
        model_cfg, train_cfg = (
            ModelConfig(**meta["model"]),
            TrainConfig(**meta["train"]),
        )
        target = train.abstract_state(model_cfg, train_cfg, sharding.make_mesh())
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


def test_after_damage_the_run_trains_again_to_the_same_state(copy, pristine, jaxgpt):
    DAMAGE["random bytes in params"](copy / "checkpoints" / "20")
    DAMAGE["wrong checksum"](copy / "checkpoints" / "15")
    DAMAGE["garbage meta"](copy / "best" / "20")
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
    the first goes on (and stops cleanly on SIGTERM)."""
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


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


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

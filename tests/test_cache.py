"""The persistent compilation cache: a second run loads its programs, a changed
program compiles anew, and cached programs give bit-identical losses."""

import os
import subprocess
import sys
from pathlib import Path

from jaxgpt.run import cache

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
        + [f"--data_path={corpus_path}", f"--data_dir={tmp_path / 'data'}"]
        + [f"--workdir={workdir}", "--peak_tflops=1"],
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
    kept = entries(tmp_path)
    assert len(kept) >= 3  # At least the train step, evaluation and sampling.
    second = run(tmp_path, corpus_path, "b")
    assert entries(tmp_path) == kept  # Nothing compiled anew: all loaded.
    assert second == first  # The same losses, every float's repr equal.
    run(tmp_path, corpus_path, "c", "--n_embd=32")  # Other shapes: other programs.
    assert len(entries(tmp_path) - kept) >= 3


def test_cache_directory_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.compilation_cache_dir() == Path(tmp_path) / "jaxgpt" / "xla"
    assert cache.peak_file() == Path(tmp_path) / "jaxgpt" / "peak.json"

"""experiments/minimal.py, the smallest complete program, run as a learner runs
it (a subprocess) on generated text."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

from conftest import REPO, generated_text

SCRIPT = REPO / "experiments" / "minimal.py"


def run(*args: str, cwd=REPO, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "JAXGPT_DATA_DIR"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        env={**base, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_minimal_trains_and_samples(tmp_path):
    """12 steps lower the val loss from about ln(vocabulary); the sample is 300
    characters of the text's own alphabet after the prompt's newline."""
    text = generated_text(20_000)
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text(text, encoding="utf-8")
    done = run("--steps", "12", JAXGPT_DATA_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    evals = [
        re.fullmatch(r"step (\d+): train ([\d.]+), val ([\d.]+)", x) for x in lines
    ]
    steps = [int(m[1]) for m in evals if m]
    assert steps == [0, 3, 6, 9, 12] and all(evals[:5])  # Then the sample.
    first, last = float(evals[0][3]), float(evals[4][3])
    alphabet = set(text)
    assert abs(first - math.log(len(alphabet))) < 0.3  # About uniform at first.
    assert last < first - 0.3
    sample = done.stdout.split(lines[4] + "\n", 1)[1]
    assert sample[0] == "\n" and len(sample) == 1 + 300 + 1  # Prompt, 300, print's.
    assert set(sample) <= alphabet


def test_minimal_without_text_is_one_line(tmp_path):
    """No path and no $JAXGPT_DATA_DIR: ../shared/data's copy, which tmp_path
    lacks; one line names where it looked."""
    done = run(cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    where = "../shared/data/tinyshakespeare/input.txt"
    assert done.stderr.strip().splitlines() == [
        f"error: no text at {where}: pass a text file's path."
    ]

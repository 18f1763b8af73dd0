"""Two processes on 127.0.0.1 train as one: `python -m jaxgpt.main` with
--coordinator_address, each process with 2 fake CPU devices (gloo collectives),
against the same run in one process on one device.

The two-process run shards the parameters over all 4 devices (--mesh_fsdp=4),
so every step and every checkpoint needs both processes; it also accumulates
2 micro-batches and uses dropout, whose masks must not depend on the layout.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import chex

from jaxgpt import sharding
from jaxgpt.config import ModelConfig, TrainConfig
from jaxgpt.run import checkpoint as ckpt
from jaxgpt.run import program

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300  # Per run; a stuck collective fails the test instead of hanging.
SEPARATOR = "\n" + "-" * 40 + "\n"


def flags(corpus_path, workdir) -> list[str]:
    return [
        f"--data_path={corpus_path}",
        f"--data_dir={workdir}_data",
        f"--workdir={workdir}",
        "--n_layer=1",
        "--n_head=2",
        "--n_embd=16",
        "--block_size=8",
        "--batch_size=8",
        "--grad_accum_steps=2",
        "--dropout=0.1",
        "--max_iters=6",
        "--eval_interval=3",
        "--eval_iters=2",
        "--log_interval=3",
        "--warmup_iters=2",
        "--max_new_tokens=12",
        "--temperature=0",
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], devices: int, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_NUM_CPU_DEVICES": str(devices),
        "PYTHONUNBUFFERED": "1",
    }
    with open(log.with_suffix(".out"), "w") as out, open(log, "w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "jaxgpt.main", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=err,
        )


def wait_all(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    """Waits for every process; kills them all if one fails or the time runs out."""
    try:
        for proc in procs:
            proc.wait(timeout=TIMEOUT_S)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, f"{log}:\n{log.read_text()[-4000:]}"


# Gloo's connection notice, printed in pieces ("[Gloo] Rank ", the rank, the
# rest, a newline): another thread's notice may come between any two of them.
GLOO_HEAD = "[Gloo] Rank "
GLOO_REST = re.compile(
    r"\d* is connected to (\d+) peer ranks\. "
    r"Expected number of connected peer ranks is : \1"
)


def printed(log: Path) -> str:
    """A process's stdout without gloo's connection notices. Gloo's threads
    print them at start-up piece by piece, so two may interleave ("[Gloo] Rank
    [Gloo] Rank 3 is ...\n2 is ...\n", or "A B\n\n"): each notice's pieces
    go, and with them one of the first newlines."""
    text = log.with_suffix(".out").read_text()
    n = text.count(GLOO_HEAD)
    text = GLOO_REST.sub("", text.replace(GLOO_HEAD, ""))
    for _ in range(n):
        text = text.replace("\n", "", 1)
    return text


def evals(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").open()]


def final_state(workdir: Path):
    """The last checkpoint, restored onto this process's single device."""
    checkpointer = ckpt.Checkpointer(workdir)
    meta = checkpointer.read_meta()
    model_cfg, train_cfg = ModelConfig(**meta["model"]), TrainConfig(**meta["train"])
    target = program.abstract_state(model_cfg, train_cfg, sharding.make_mesh())
    state = checkpointer.restore(target)
    checkpointer.close()
    return state


def test_two_processes_train_like_one(tmp_path, corpus_path):
    port = free_port()
    multi, single = tmp_path / "multi", tmp_path / "single"
    logs = [tmp_path / f"process{i}.log" for i in range(2)] + [tmp_path / "one.log"]
    procs = [
        start(
            [
                *flags(corpus_path, multi),
                "--mesh_fsdp=4",
                "--overwrite",  # Nothing to delete, but all processes wait for 0.
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            devices=2,
            log=logs[i],
        )
        for i in range(2)
    ]
    procs.append(start(flags(corpus_path, single), devices=1, log=logs[2]))
    wait_all(procs, logs)

    # The same evaluations (written once, by process 0) and the same final state.
    got, want = evals(multi), evals(single)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 3, 6]
    for g, w in zip(got, want):
        assert abs(g["train_loss"] - w["train_loss"]) < 1e-5, (g, w)
        assert abs(g["val_loss"] - w["val_loss"]) < 1e-5, (g, w)
    multi_state, single_state = final_state(multi), final_state(single)
    assert int(multi_state.step) == int(single_state.step) == 6
    chex.assert_trees_all_close(multi_state.params, single_state.params, atol=1e-5)
    chex.assert_trees_all_close(
        multi_state.opt_state, single_state.opt_state, atol=1e-5
    )

    # Process 0 alone logs and samples (the same greedy text as one process).
    out0, out1, out_single = (printed(log) for log in logs)
    err0, err1 = (log.read_text() for log in logs[:2])
    assert "step 3: loss" in err0 and "step 6: train loss" in err0
    assert "step 3" not in err1 and "parameters" not in err1
    assert out1 == ""
    sample = out0.split(SEPARATOR)[0]
    assert len(sample) == 1 + 12  # The prompt "\n" and 12 new tokens.
    assert sample == out_single.split(SEPARATOR)[0]
    assert "mesh {'data': 1, 'fsdp': 4} over 4 devices, 2 process(es)" in err0

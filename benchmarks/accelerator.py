"""One command for a lent GPU: the tests on the device, the baby GPT's recipe,
GPT-2's step and sampling, measured and written to one JSON file and a table.

  python benchmarks/accelerator.py --out=out/accelerator --data_path=input.txt  # 8 min
  python benchmarks/accelerator.py --smoke --out=/tmp/accelerator   # tiny sizes

Each stage runs in a child process with its own time limit, cut to what is
left of --budget_s; this process never touches the device, so every child has
all of its memory. A stage that fails, is refused or runs out of time is
recorded with the end of its output, and the next one runs. The stages:

  env        the device, its driver, JAX, jaxlib and the CUDA plugin
  tests      the model, train, generate and sharding tests, on the device
  recipe     experiments/shakespeare_gpu.cfg (the baby GPT in bfloat16) through
             `python -m jaxgpt.main` until its val loss reaches --target_loss
             (nanoGPT's README: 1.47, about 3 minutes on an A100): ms/step, MFU
             against the data sheet's peak, and the wall time from the
             command's start to that val loss
  attention  the recipe's step with dropout 0 and einsum, dot_product or cudnn
             attention: ms/step, tokens/s, MFU (benchmarks/train.py)
  gpt2       GPT-2 124M's step in bfloat16 at T=1024 with the largest batch that
             fits, without and with remat: ms/step, MFU (benchmarks/gpt2_step.py)
  sample     KV-cache sampling of the baby GPT at batch 1 and 8, 500 new tokens
             (benchmarks/generate.py)

It writes <out>/accelerator.json (every figure, and each stage's command and
status), <out>/accelerator.md (the table, also printed) and
<out>/accelerator.log (every child's output). --smoke runs every stage at
tiny sizes (a few tests, a one-layer model, a few steps) so that the suite
can check the script on a CPU; its figures measure nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ("env", "tests", "recipe", "attention", "gpt2", "sample")
ATTENTIONS = ("einsum", "dot_product", "cudnn")
TEST_FILES = [
    "tests/test_model.py",
    "tests/test_model_variants.py",
    "tests/test_train.py",
    "tests/test_generate.py",
    "tests/test_sharding.py",
]
BABY_GPT = ["--flagfile=experiments/shakespeare_gpu.cfg"]
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32"]


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each stage runs, and the seconds it may take at most."""

    tests: list[str]
    workers: int  # pytest-xdist's, where it is installed.
    recipe: list[str]
    attention: list[str]
    gpt2: list[str]
    sample: list[str]
    limits: dict[str, float]


FULL = Sizes(
    tests=TEST_FILES,
    workers=4,
    recipe=[*BABY_GPT, "--max_new_tokens=100"],
    attention=[*BABY_GPT, "--dropout=0", "--bench_steps=50", "--bench_warmup=5"],
    gpt2=["--dtype=bfloat16", "--batch_size=auto", "--scan_layers", "--steps=10"],
    # generate.py's model flags default to the baby GPT's shape (shakespeare.cfg,
    # whose --workdir would make it read a checkpoint there).
    sample=["--dtype=bfloat16", "--bench_batch_sizes=1,8", "--bench_new_tokens=500"],
    # Seconds per run of a stage (the attention and gpt2 stages run 3 and 2):
    # 475 in all, within the default --budget_s.
    limits={
        "env": 20,
        "tests": 80,
        "recipe": 150,
        "attention": 25,
        "gpt2": 55,
        "sample": 40,
    },
)
SMOKE = Sizes(
    tests=["tests/test_model.py::test_cross_entropy_matches_formula"],
    workers=0,
    recipe=[
        *BABY_GPT,
        *TINY,
        *[
            "--batch_size=8",
            "--max_iters=20",
            "--warmup_iters=2",
            "--lr_decay_iters=20",
        ],
        *["--eval_interval=10", "--eval_iters=2", "--log_interval=5"],
        *["--max_new_tokens=8", "--peak_tflops=1"],
    ],
    attention=[
        *BABY_GPT,
        *TINY,
        *["--batch_size=8", "--dropout=0", "--bench_steps=3", "--bench_warmup=1"],
        "--peak_matmul_n=128",
    ],
    gpt2=[
        *["--dtype=bfloat16", "--batch_size=auto", "--max_batch=4", "--steps=2"],
        *TINY,
        *["--vocab_size=65", "--peak_matmul_n=128"],
    ],
    sample=[
        "--dtype=bfloat16",
        *TINY,
        "--bench_batch_sizes=1,8",
        "--bench_new_tokens=8",
    ],
    # Generous: the smoke run checks the script, and a loaded CPU is slow.
    limits={
        "env": 60,
        "tests": 120,
        "recipe": 120,
        "attention": 90,
        "gpt2": 120,
        "sample": 120,
    },
)


# --- Child processes -----------------------------------------------------------


@dataclasses.dataclass
class Child:
    """How a child process ended: its exit code (None if stopped), output, time."""

    rc: int | None
    out: str
    wall_s: float
    timed_out: bool = False
    stopped: bool = False

    def tail(self, n: int = 1500) -> str:
        return self.out[-n:]

    def error_line(self) -> str | None:
        """The one-line refusal (`error: ...`) of a jaxgpt command, if any."""
        lines = [x for x in self.out.splitlines() if x.startswith("error: ")]
        return lines[-1] if lines else None


class Runner:
    """Runs children from the repository root within the run's deadline,
    copying their output to the log."""

    def __init__(self, deadline: float, log, env: dict[str, str]):
        self.deadline, self.log, self.env = deadline, log, env

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(
        self,
        name: str,
        command: list[str],
        limit: float,
        env: dict[str, str] | None = None,
        on_line: Callable[[str, float], bool] | None = None,
    ) -> Child:
        """Runs `command` for at most `limit` seconds (and no later than the
        deadline). on_line(line, seconds since start) returning True stops it."""
        limit = min(limit, self.left())
        self.log.write(f"\n=== {name}: {' '.join(command)}\n")
        self.log.flush()
        t0 = time.monotonic()
        child = subprocess.Popen(
            command,
            cwd=REPO,
            env={**self.env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # Its own process group, to stop it whole.
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def read():
            for line in child.stdout:
                lines.put(line)
            lines.put(None)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        out, timed_out, stopped = [], False, False
        while True:
            remaining = t0 + limit - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            try:
                line = lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if line is None:
                break
            out.append(line)
            self.log.write(line)
            if on_line is not None and on_line(line, time.monotonic() - t0):
                stopped = True
                break
        wall_s = time.monotonic() - t0
        if timed_out or stopped:
            stop(child)
        rc = child.wait()
        reader.join(timeout=5)
        if timed_out:
            self.log.write(f"=== {name}: stopped after its {limit:.0f} s\n")
        return Child(
            None if timed_out or stopped else rc,
            "".join(out),
            wall_s,
            timed_out,
            stopped,
        )


def stop(child: subprocess.Popen) -> None:
    """SIGTERM to the child's process group, then SIGKILL if it is still there
    3 s later (a run stopped at its target loss need not save)."""
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def status_of(child: Child) -> dict:
    """A stage's status from how its child ended: ok, refused (a one-line
    error), failed or timeout, with the end of its output when not ok."""
    wall_s = round(child.wall_s, 1)
    if child.timed_out:
        return {"status": "timeout", "wall_s": wall_s, "tail": child.tail()}
    if child.rc == 0 or child.stopped:
        return {"status": "ok", "wall_s": wall_s}
    error = child.error_line()
    if error and "Traceback" not in child.out:
        return {"status": "refused", "wall_s": wall_s, "message": error}
    return {"status": "failed", "wall_s": wall_s, "rc": child.rc, "tail": child.tail()}


def number(pattern: str, text: str) -> float | None:
    """The first group of `pattern`'s last match in `text`, as a number."""
    found = re.findall(pattern, text)
    return float(found[-1].replace(",", "")) if found else None


# --- The stages --------------------------------------------------------------

PROBE = """
import importlib.metadata as md, json, sys, jax
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
d = jax.devices()
names = ("jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "libtpu", "flax", "optax")
print(json.dumps({
    "backend": jax.default_backend(), "device_kind": d[0].device_kind,
    "device_count": len(d), "jax": jax.__version__, "python": sys.version.split()[0],
    "packages": {n: v for n in names if (v := version(n))},
    "environment": getattr(jax, "print_environment_info", lambda **_: None)(
        return_string=True),
}))
"""


def stage_env(runner: Runner, sizes: Sizes, args) -> dict:
    child = runner.run("env", [sys.executable, "-c", PROBE], sizes.limits["env"])
    result = status_of(child)
    lines = [x for x in child.out.splitlines() if x.startswith("{")]
    if result["status"] == "ok" and lines:
        result.update(json.loads(lines[-1]))
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,driver_version,memory.total"
        smi = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        full = subprocess.run(
            ["nvidia-smi"], capture_output=True, text=True, timeout=30, check=False
        )
        cuda = re.search(r"CUDA Version: ([\d.]+)", full.stdout)
        result["gpus"] = [x.strip() for x in smi.stdout.strip().splitlines()]
        result["driver"] = smi.stdout.split(",")[1].strip() if smi.stdout else None
        result["cuda"] = cuda[1] if cuda else None
    return result


def stage_tests(runner: Runner, sizes: Sizes, args) -> dict:
    junit = Path(args.scratch) / "tests.xml"
    xdist = sizes.workers and importlib.util.find_spec("xdist")
    workers = ["-n", str(sizes.workers)] if xdist else []
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-v",  # A line per test as it ends: what ran, should the stage time out.
        "-o",
        "addopts=",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:benchmark",  # (pytest-benchmark's .benchmarks/, where installed.)
        *workers,
        f"--junitxml={junit}",
        *sizes.tests,
    ]
    # Several test processes share the device: none takes most of its memory.
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    child = runner.run("tests", command, sizes.limits["tests"], env)
    result = {**status_of(child), "command": " ".join(command[1:])}
    result["selection"] = ", ".join(  # e.g. "model, generate".
        dict.fromkeys(Path(t.split("::")[0]).stem[5:] for t in sizes.tests)
    )
    if junit.is_file():
        suites = ET.parse(junit).getroot()
        suites = [suites] if suites.tag == "testsuite" else list(suites)
        count = lambda key: sum(int(s.get(key, 0)) for s in suites)
        failures = [
            f"{case.get('classname')}::{case.get('name')}"
            for case in ET.parse(junit).getroot().iter("testcase")
            if case.find("failure") is not None or case.find("error") is not None
        ]
        result.update(
            tests=count("tests"),
            failed=count("failures") + count("errors"),
            skipped=count("skipped"),
            failures=failures,
        )
        result["passed"] = result["tests"] - result["failed"] - result["skipped"]
    else:  # Stopped before pytest wrote its report: the tests that had ended.
        ended = dict(
            re.findall(r"(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", child.out)
        )
        ended |= {t: o for o, t in TEST_ENDED.findall(child.out)}
        outcomes = list(ended.values())
        result.update(
            tests=len(ended),
            passed=outcomes.count("PASSED"),
            failed=outcomes.count("FAILED") + outcomes.count("ERROR"),
            skipped=outcomes.count("SKIPPED"),
            failures=[t for t, o in ended.items() if o in ("FAILED", "ERROR")],
            partial=True,
        )
    return result


# pytest -v's line for a test that ended, under xdist: "[gw0] [ 5%] PASSED tests/...".
TEST_ENDED = re.compile(r"\] (PASSED|FAILED|SKIPPED|ERROR) (tests/\S+::\S+)")
STEP_LINE = re.compile(
    r"step (\d+): loss [\d.]+, lr \S+, ([\d.]+) ms/step, [\d,]+ tok/s"
    r"(?:, [\d.]+ GFLOP/s)?(?:, MFU ([\d.]+)%)?"
)
VAL_LINE = re.compile(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)")


def recipe_run(runner: Runner, sizes: Sizes, args, attention: str, limit) -> dict:
    """One training run of the recipe until its val loss reaches the target."""
    workdir = Path(args.scratch) / f"recipe_{attention}"
    flags = [*sizes.recipe, f"--attention={attention}", f"--workdir={workdir}"]
    if attention != "einsum":  # jax.nn.dot_product_attention has no dropout.
        flags.append("--dropout=0")
    flags += ["--overwrite", "--notensorboard", f"--data_dir={args.scratch}/data"]
    if args.data_path:
        flags.append(f"--data_path={args.data_path}")
    vals, steps = [], []

    def on_line(line: str, elapsed: float) -> bool:
        if m := STEP_LINE.search(line):
            steps.append((int(m[1]), float(m[2]), m[3] and float(m[3])))
        if m := VAL_LINE.search(line):
            vals.append((int(m[1]), round(elapsed, 1), float(m[2])))
            # Reached after training (not by the initial model): stop the run.
            return int(m[1]) > 0 and float(m[2]) <= args.target_loss
        return False

    command = [sys.executable, "-m", "jaxgpt.main", *flags]
    child = runner.run(f"recipe {attention}", command, limit, on_line=on_line)
    result = {**status_of(child), "attention": attention}
    result["dropout"] = 0.0 if attention != "einsum" else None  # None: the cfg's.
    reached = [v for v in vals if v[0] > 0 and v[2] <= args.target_loss]
    timed = steps[1:] or steps  # The first interval holds the compilation.
    peak = re.search(r"^\d\d:\d\d:\d\d peak (.*)", child.out, re.MULTILINE)
    result.update(
        target_loss=args.target_loss,
        time_to_target_s=reached[0][1] if reached else None,
        step_at_target=reached[0][0] if reached else None,
        ms_per_step=statistics.median(s[1] for s in timed) if timed else None,
        mfu_percent=statistics.median(s[2] for s in timed if s[2])
        if any(s[2] for s in timed)
        else None,
        best_val_loss=min(v[2] for v in vals) if vals else None,
        val_losses=vals,
        peak=peak[1].strip() if peak else None,
    )
    if result["status"] == "ok" and not reached:
        result["status"] = "not reached"
    return result


def stage_recipe(runner: Runner, sizes: Sizes, args) -> dict:
    attentions = args.recipe_attention.split(",")
    limit = sizes.limits["recipe"] / len(attentions)
    runs = [recipe_run(runner, sizes, args, a, limit) for a in attentions]
    return {"flags": sizes.recipe, "runs": runs, **summary(runs)}


def stage_attention(runner: Runner, sizes: Sizes, args) -> dict:
    rows = []
    for attention in ATTENTIONS:
        command = [
            sys.executable,
            "benchmarks/train.py",
            *sizes.attention,
            f"--attention={attention}",
        ]
        child = runner.run(f"attention {attention}", command, sizes.limits["attention"])
        peak = re.search(r"peak: (.*)", child.out)
        rows.append(
            {
                **status_of(child),
                "attention": attention,
                "ms_per_step": number(r"ms/step \(median\): ([\d.]+)", child.out),
                "tokens_per_s": number(r"tokens/s: ([\d,]+)", child.out),
                "mfu_percent": number(r"MFU: ([\d.]+)%", child.out),
                "compile_s": number(r"compile \(cold\): ([\d.]+) s", child.out),
                "peak": peak[1].strip() if peak else None,
            }
        )
    return {"flags": sizes.attention, "rows": rows, **summary(rows)}


def stage_gpt2(runner: Runner, sizes: Sizes, args, backend: str) -> dict:
    # cuDNN's flash attention where there is one; XLA's elsewhere.
    attention = "cudnn" if backend == "gpu" else "dot_product"
    rows = []
    for remat in (False, True):
        command = [
            sys.executable,
            "benchmarks/gpt2_step.py",
            *sizes.gpt2,
            f"--attention={attention}",
            *(["--remat"] if remat else []),
        ]
        env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}  # The largest batch.
        child = runner.run(f"gpt2 remat={remat}", command, sizes.limits["gpt2"], env)
        auto = re.search(r"\(auto: ([^)]*)\)", child.out)
        model = re.search(r"^(GPT[^(]*) \(", child.out, re.MULTILINE)
        rows.append(
            {
                **status_of(child),
                "model": model[1] if model else None,
                "remat": remat,
                "attention": attention,
                "batch_size": number(r" B=(\d+) T=", child.out),
                "block_size": number(r" T=(\d+) ", child.out),
                "ms_per_step": number(r"([\d,.]+) ms/step", child.out),
                "tokens_per_s": number(r"([\d,]+) tokens/s", child.out),
                "mfu_percent": number(r"MFU ([\d.]+)%", child.out),
                "compile_s": number(r"compile ([\d.]+) s", child.out),
                "auto_batch": auto[1] if auto else None,
            }
        )
    return {"flags": sizes.gpt2, "rows": rows, **summary(rows)}


SAMPLE_ROW = re.compile(
    r"^\| (\d+) \| (yes|no) \| ([\d.]+) \| ([\d.]+) \| ([\d,]+) \| ([\d.]+)x \|$",
    re.MULTILINE,
)


def stage_sample(runner: Runner, sizes: Sizes, args) -> dict:
    command = [sys.executable, "benchmarks/generate.py", *sizes.sample]
    child = runner.run("sample", command, sizes.limits["sample"])
    rows = [
        {
            "batch": int(b),
            "kv_cache": kv == "yes",
            "compile_s": float(c),
            "run_s": float(r),
            "tokens_per_s": float(t.replace(",", "")),
            "speedup": float(x),
        }
        for b, kv, c, r, t, x in SAMPLE_ROW.findall(child.out)
    ]
    new = re.search(r"(\d+) new tokens", child.out)
    return {
        **status_of(child),
        "flags": sizes.sample,
        "new_tokens": int(new[1]) if new else None,
        "rows": rows,
    }


def summary(rows: list[dict]) -> dict:
    """A stage of several runs is ok when each is ok or refused (cudnn off a GPU)."""
    fine = all(r["status"] in ("ok", "refused", "not reached") for r in rows)
    return {"status": "ok" if fine else "failed"}


# --- The table ----------------------------------------------------------------


def fmt(value, spec: str = ".1f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def note(row: dict) -> str:
    """A row's status for the table: ok, or what went wrong, in one line."""
    if row["status"] in ("ok", "not reached"):
        return row["status"]
    if row["status"] == "timeout":
        return f"timeout after {row['wall_s']:.0f} s"
    detail = row.get("message") or " ".join(
        (row.get("tail") or "").strip().splitlines()[-1:]
    )
    return f"{row['status']}: {detail[:120]}".replace("|", "/")


TEXT_COLUMNS = ("tests", "attention", "remat", "KV cache", "status")


def markdown(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """A titled markdown table: words align left, numbers right."""
    rule = ["---" if name in TEXT_COLUMNS else "--:" for name in header]
    lines = ["", title, ""] if title else [""]
    for cells in [header, rule, *rows]:
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def table(report: dict) -> str:
    """The report as markdown: the machine, then one table per stage."""
    env, stages = report["machine"], report["stages"]
    packages = env.get("packages", {})
    versions = [f"JAX {env.get('jax', '?')}", f"jaxlib {packages.get('jaxlib', '?')}"]
    versions += [f"{n} {v}" for n, v in packages.items() if "plugin" in n]
    if env.get("driver"):
        versions.append(f"driver {env['driver']}, CUDA {env.get('cuda')}")
    device = f"{env.get('device_count', '?')} x {env.get('device_kind', '?')}"
    lines = [
        f"# jaxgpt on {device} ({env.get('backend', '?')})",
        "",
        (
            f"{', '.join(versions)}; {report['started'][:10]};"
            f" `{report['command']}` in {report['wall_s']:.0f} s."
        ),
    ]
    if report["smoke"]:
        lines += [
            "",
            "--smoke: tiny sizes that check the script; they measure nothing.",
        ]
    if t := stages.get("tests"):
        header = ["tests", "passed", "failed", "skipped", "wall (s)", "status"]
        rows = [[t.get("selection"), t.get("passed", "-"), t.get("failed", "-")]]
        rows[0] += [t.get("skipped", "-"), fmt(t.get("stage_s"), ".0f"), note(t)]
        rows += [
            [f"failed: {name}", "", "", "", "", ""] for name in t.get("failures", [])
        ]
        lines += markdown("", header, rows)
    if (r := stages.get("recipe")) and "runs" in r:
        target, rows = report["target_loss"], []
        for run in r["runs"]:
            at = run.get("time_to_target_s")
            drop = "" if run.get("dropout") is None else f", dropout {run['dropout']}"
            rows.append(
                [
                    f"{run['attention']}{drop}",
                    fmt(run.get("ms_per_step")),
                    fmt(run.get("mfu_percent"), ".1f", "%"),
                    f"{at:.0f} s (step {run['step_at_target']})" if at else "-",
                    fmt(run.get("best_val_loss"), ".4f"),
                    note(run),
                ]
            )
        title = (
            f"The baby GPT's recipe ({' '.join(r['flags'])}), trained until val loss"
            f" <= {target}; the time counts from the command's start:"
        )
        header = ["attention", "ms/step", "MFU", f"val loss <= {target} at"]
        lines += markdown(title, header + ["best val loss", "status"], rows)
    if (a := stages.get("attention")) and "rows" in a:
        rows = [
            [
                row["attention"],
                fmt(row["ms_per_step"], ".2f"),
                fmt(row["tokens_per_s"], ",.0f"),
                fmt(row["mfu_percent"], ".1f", "%"),
                fmt(row["compile_s"]),
                note(row),
            ]
            for row in a["rows"]
        ]
        title = f"One step of the recipe by attention ({' '.join(a['flags'])}):"
        header = ["attention", "ms/step", "tokens/s", "MFU", "compile (s)", "status"]
        lines += markdown(title, header, rows)
    if (g := stages.get("gpt2")) and "rows" in g:
        rows = []
        for row in g["rows"]:
            B, T = row["batch_size"], row["block_size"]
            rows.append(
                [
                    "yes" if row["remat"] else "no",
                    row["attention"],
                    f"{B:.0f} x {T:.0f}" if B and T else "-",
                    fmt(row["ms_per_step"]),
                    fmt(row["tokens_per_s"], ",.0f"),
                    fmt(row["mfu_percent"], ".1f", "%"),
                    fmt(row["compile_s"]),
                    note(row),
                ]
            )
        model = next((r["model"] for r in g["rows"] if r.get("model")), "GPT-2 124M")
        title = f"{model}'s step ({' '.join(g['flags'])}):"
        header = ["remat", "attention", "batch x T", "ms/step", "tokens/s", "MFU"]
        lines += markdown(title, header + ["compile (s)", "status"], rows)
    if (s := stages.get("sample")) and "rows" in s:
        rows = [
            [
                row["batch"],
                "yes" if row["kv_cache"] else "no",
                f"{row['tokens_per_s']:,.0f}",
                f"{row['run_s']:.2f}",
                f"{row['compile_s']:.2f}",
            ]
            for row in s["rows"]
        ]
        if s["status"] != "ok":
            rows.append([note(s), "", "", "", ""])
        title = (
            f"Sampling {s.get('new_tokens')} new tokens after a 1-token prompt"
            f" ({' '.join(s['flags'])}):"
        )
        header = ["batch", "KV cache", "tokens/s", "run (s)", "compile (s)"]
        lines += markdown(title, header, rows)
    return "\n".join(lines) + "\n"


# --- The command --------------------------------------------------------------


def corpus(given: str | None) -> str | None:
    """--data_path, else tiny shakespeare from $JAXGPT_DATA_DIR or ../shared/data."""
    if given:
        return str(Path(given).resolve())
    for base in (os.environ.get("JAXGPT_DATA_DIR"), REPO.parent / "shared" / "data"):
        path = Path(base or "/nonexistent") / "tinyshakespeare" / "input.txt"
        if path.is_file():
            return str(path)
    return None  # jaxgpt.main's own default: its cache, or a download.


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default="out/accelerator", help="Where the results go."
    )
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes.")
    parser.add_argument(
        "--budget_s",
        type=float,
        default=None,
        help="Seconds for all stages (default 480; --smoke 900).",
    )
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--target_loss", type=float, default=1.47)
    parser.add_argument(
        "--recipe_attention",
        default="einsum",
        help="Attentions to train the recipe with, e.g. einsum,cudnn.",
    )
    parser.add_argument("--data_path", default=None, help="tiny shakespeare's text.")
    parser.add_argument(
        "--scratch", default=None, help="Workdirs (default: a temp dir)."
    )
    args = parser.parse_args(argv)
    unknown = set(args.stages.split(",")) - set(STAGES)
    if unknown:
        parser.error(f"--stages: unknown {sorted(unknown)}; choose from {STAGES}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    budget = args.budget_s or (900.0 if args.smoke else 480.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    own_scratch = args.scratch is None
    args.scratch = args.scratch or tempfile.mkdtemp(prefix="jaxgpt_accelerator_")
    args.data_path = corpus(args.data_path)
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        # This checkout's jaxgpt, and a cache of its own: every compile is cold.
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
        ),
        "XDG_CACHE_HOME": str(Path(args.scratch) / "cache"),
    }
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.monotonic()
    report = {
        "command": " ".join(
            ["python benchmarks/accelerator.py", *(argv or sys.argv[1:])]
        ),
        "started": started.isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "budget_s": budget,
        "target_loss": args.target_loss,
        "data_path": args.data_path,
        "machine": {},
        "stages": {},
    }
    wanted = args.stages.split(",")

    def write() -> str:
        """The report so far (after each stage: a run cut short keeps its figures)."""
        report["wall_s"] = round(time.monotonic() - t0, 1)
        (out / "accelerator.json").write_text(json.dumps(report, indent=1) + "\n")
        text = table(report)
        (out / "accelerator.md").write_text(text)
        return text

    try:
        with open(out / "accelerator.log", "w") as log:
            runner = Runner(t0 + budget, log, env)
            report["machine"] = stage_env(runner, sizes, args)
            backend = report["machine"].get("backend", "unknown")
            stages = {
                "tests": lambda: stage_tests(runner, sizes, args),
                "recipe": lambda: stage_recipe(runner, sizes, args),
                "attention": lambda: stage_attention(runner, sizes, args),
                "gpt2": lambda: stage_gpt2(runner, sizes, args, backend),
                "sample": lambda: stage_sample(runner, sizes, args),
            }
            for name, stage in stages.items():
                if name not in wanted:
                    continue
                if runner.left() < 3:
                    report["stages"][name] = {"status": "skipped: out of time"}
                    continue
                print(f"[accelerator] {name} ({runner.left():.0f} s left)", flush=True)
                t = time.monotonic()
                result = stage()
                report["stages"][name] = {
                    **result,
                    "stage_s": round(time.monotonic() - t, 1),
                }
                write()
        print(write())
    finally:
        if own_scratch:
            shutil.rmtree(args.scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

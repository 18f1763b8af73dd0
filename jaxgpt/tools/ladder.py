"""The lecture's ladder: each step's flagfile trained in turn, then a table and a plot.

  python -m jaxgpt.tools.ladder                        # every step, into out/lecture
  python -m jaxgpt.tools.ladder --steps=1_bigram,2_head -- --max_iters=100

Each step is `python -m jaxgpt.main --flagfile=experiments/lecture/<step>.cfg`
(in its own process, in the current folder as that command would be, so the
dataset is prepared under ./data; its log in <out>/<step>.log), with
--workdir=<out>/<step> and the flags after `--` appended; a step already
trained resumes or is skipped, as main does. On a CPU, step 7 runs its reduced
version (7_scaled_cpu.cfg). Then <out>/ladder.md holds the table (parameters,
the val loss reached, the lecture's figure, wall time) and <out>/ladder.png the
curves. The flagfiles are the checkout's experiments/lecture/, or the copy
installed with the package (pip install without -e).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax

from jaxgpt import lecture, model
from jaxgpt.config import ModelConfig
from jaxgpt.run import checkpoint, errors, perf, quiet
from jaxgpt.tools import plot

PACKAGE = Path(__file__).resolve().parents[1]  # jaxgpt/
# Where experiments/lecture/ lies: the checkout (an editable install), else the
# package (setup.cfg installs the flagfiles with it). Flagfiles name their
# includes from here.
ROOT = next(
    (r for r in (PACKAGE.parent, PACKAGE) if (r / "experiments" / "lecture").is_dir()),
    PACKAGE.parent,
)
FLAGFILES = ROOT / "experiments" / "lecture"


@dataclasses.dataclass(frozen=True)
class Step:
    name: str  # Its flagfile: experiments/lecture/<name>.cfg
    what: str
    lecture: float  # The lecture's val loss.
    cpu_name: str | None = None  # A reduced flagfile for a CPU.


STEPS = (
    Step("1_bigram", "bigram", 2.49),
    Step("2_head", "one self-attention head", 2.37),
    Step("3_heads", "4 heads of 8", 2.28),
    Step("4_ffwd", "+ feed-forward", 2.24),
    Step("5_residual", "3 blocks, residual + projection", 2.08),
    Step("6_layernorm", "+ LayerNorm", 2.06),
    Step("7_scaled", "scaled up, dropout 0.2", 1.48, cpu_name="7_scaled_cpu"),
)


@dataclasses.dataclass(frozen=True)
class Result:
    step: Step
    run: Path
    flagfile: str
    parameters: int
    steps: int
    val_loss: float
    wall_s: float


def backend() -> str:
    """The JAX backend the steps will train on, asked in a child process (this
    one keeps off the accelerator: a TPU serves one process at a time)."""
    probe = "import jax; print(jax.default_backend())"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    return out.stdout.strip().splitlines()[-1]


def flags_of(name: str) -> list[str]:
    """The flags of experiments/lecture/<name>.cfg, with its --flagfile includes
    made absolute: the steps run in the caller's folder, not ROOT."""
    lines = (FLAGFILES / f"{name}.cfg").read_text().splitlines()
    flags = [line.strip() for line in lines if line.strip().startswith("--")]
    include = "--flagfile="
    return [
        f"{include}{ROOT / f[len(include) :]}" if f.startswith(include) else f
        for f in flags
    ]


def train_step(name: str, run: Path, extra: Sequence[str]) -> float:
    """Trains step `name` in a child process; its output goes to <run>.log, its
    val losses are echoed. Returns the wall time in seconds."""
    command = [
        sys.executable,
        "-m",
        "jaxgpt.main",
        *flags_of(name),
        f"--workdir={run}",
        *extra,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_path = run.parent / f"{run.name}.log"
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        child = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in child.stdout:
            log.write(line)
            if "val loss" in line or line.startswith("error:"):
                print(f"  {run.name}: {line.strip()}", flush=True)
        code = child.wait()
    if code:
        sys.exit(
            errors.one_line(f"step {name} failed (exit code {code}); see {log_path}.")
        )
    return time.perf_counter() - t0


def count_parameters(run: Path) -> int:
    """The parameter count of the model saved in `run`, from its shapes alone."""
    model_cfg = ModelConfig(**checkpoint.read_meta(run)["model"])
    shapes = jax.eval_shape(lambda: lecture.init_params(model_cfg, jax.random.key(0)))
    return model.count_params(shapes)


def run_ladder(
    steps: Sequence[Step], out: Path, extra: Sequence[str], on_cpu: bool
) -> list[Result]:
    results = []
    for step in steps:
        name = step.cpu_name if on_cpu and step.cpu_name else step.name
        flagfile = f"experiments/lecture/{name}.cfg"
        run = out / name
        print(f"{name}: python -m jaxgpt.main --flagfile={flagfile}", flush=True)
        wall_s = train_step(name, run, extra)
        last = plot.read_metrics(run)[-1]
        results.append(
            Result(
                step,
                run,
                flagfile,
                count_parameters(run),
                last["step"],
                last["val_loss"],
                wall_s,
            )
        )
    return results


def table(results: Sequence[Result], device: str) -> str:
    """The ladder as a markdown table, headed by where and when it ran."""
    date = datetime.date.today().isoformat()
    lines = [
        f"Measured on {device}, {date}, JAX {jax.__version__}.",
        "",
        "| step | flagfile | parameters | steps | val loss | lecture | difference |"
        + " wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        reduced = r.run.name == r.step.cpu_name  # Not the lecture's model: no match.
        difference = "reduced" if reduced else f"{r.val_loss - r.step.lecture:+.3f}"
        lines.append(
            f"| {r.step.what} | `{Path(r.flagfile).name}` | {r.parameters:,}"
            f" | {r.steps:,} | {r.val_loss:.3f} | {r.step.lecture:.2f}"
            f" | {difference} | {r.wall_s:.0f} s |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    steps_help = "\n".join(
        f"  {s.name:<12} {s.what} (the lecture: {s.lecture:.2f})"
        + (f"; on a CPU {s.cpu_name}" if s.cpu_name else "")
        for s in STEPS
    )
    parser = errors.ArgumentParser(
        prog="python -m jaxgpt.tools.ladder",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"steps (experiments/lecture/<step>.cfg, in {FLAGFILES}):\n"
        f"{steps_help}\n\nFlags after -- go to every step's python -m jaxgpt.main,"
        " e.g. -- --max_iters=100 --data_path=notes.txt",
    )
    parser.add_argument("--out", default="out/lecture", help="Where the runs go.")
    parser.add_argument(
        "--steps",
        default=",".join(s.name for s in STEPS),
        help="Comma-separated steps to run (default: all, listed below).",
    )
    args, extra = parser.parse_known_args(argv)
    quiet.install()  # Reading the runs' checkpoints: no orbax lines.
    extra = [a for a in extra if a != "--"]
    by_name = {s.name: s for s in STEPS}
    unknown = [n for n in args.steps.split(",") if n not in by_name]
    if unknown:
        sys.exit(
            errors.one_line(f"--steps: unknown {unknown}; choose from {list(by_name)}.")
        )
    jax.config.update("jax_platforms", "cpu")  # This process only counts shapes.
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    kind = backend()
    on_cpu = kind == "cpu"
    steps = [by_name[n] for n in args.steps.split(",")]
    results = run_ladder(steps, out, extra, on_cpu)
    device = (
        f"a CPU ({perf.cpu_name()})" if on_cpu else f"{kind} ({perf.cpu_name()} host)"
    )
    text = table(results, device)
    (out / "ladder.md").write_text(text)
    labels = [f"{r.run.name} ({r.val_loss:.2f})" for r in results]
    runs = [r.run for r in results]
    plot.plot(runs, out / "ladder.png", labels, "The lecture's ladder", logx=True)
    print(text)
    print(f"wrote {out / 'ladder.md'} and {out / 'ladder.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Two checkouts of jaxgpt, one command, interleaved: which is faster?

  python benchmarks/ab.py --a=/tmp/before --b=. --rounds=3 -- \\
      python -m jaxgpt.main --flagfile=experiments/shakespeare_cpu.cfg

Runs the command once in each checkout untimed (so both find their compiled
programs and the prepared dataset cached: a second run), then `rounds` times
in each, alternating which goes first, each run with a fresh --workdir.
Reports the whole command's wall time and the time from launch to the first
log line holding --mark (default "step 0:", the first evaluation: start-up).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(checkout: Path, command: list[str], workdir: Path, mark: str):
    """(wall seconds, seconds to the first line holding `mark` or None)."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*command, f"--workdir={workdir}"],
        cwd=checkout,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    marked = None
    for line in proc.stderr:
        if marked is None and mark in line:
            marked = time.perf_counter() - t0
    if proc.wait() != 0:
        sys.exit(f"error: the command failed in {checkout} (exit {proc.returncode}).")
    return time.perf_counter() - t0, marked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="first checkout")
    parser.add_argument("--b", type=Path, required=True, help="second checkout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mark", default="step 0:")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    checkouts = {"a": args.a.resolve(), "b": args.b.resolve()}
    times = {name: [] for name in checkouts}
    with tempfile.TemporaryDirectory() as tmp:
        for name, checkout in checkouts.items():  # Warm the caches, untimed.
            run(checkout, command, Path(tmp) / f"warm_{name}", args.mark)
        for r in range(args.rounds):
            order = list(checkouts) if r % 2 == 0 else list(checkouts)[::-1]
            for name in order:
                wd = Path(tmp) / f"{name}_{r}"
                times[name].append(run(checkouts[name], command, wd, args.mark))
                wall, marked = times[name][-1]
                print(f"round {r} {name}: {wall:.2f} s, {args.mark!r} at {marked} s")
    print(f"| checkout | whole command (s) | to {args.mark!r} (s) |\n|---|---|---|")
    for name, checkout in checkouts.items():
        walls = [w for w, _ in times[name]]
        marks = [m for _, m in times[name] if m is not None]
        shown = f"{statistics.median(marks):.2f}" if marks else "-"
        print(
            f"| {name}: {checkout} | {statistics.median(walls):.2f}"
            f" ({min(walls):.2f}-{max(walls):.2f}) | {shown} |"
        )


if __name__ == "__main__":
    main()

"""The architecture options one at a time, and all together, on the CPU recipe.

  python benchmarks/ablation.py                       # 2000 steps each, 2 seeds
  python benchmarks/ablation.py --mode=time --results=benchmarks/ablation.json

--mode=steps (default): `python -m jaxgpt.main --flagfile=experiments/
shakespeare_cpu.cfg` (4 layers, 128 wide, 2000 steps) with GPT-2's choices,
then with each option alone, then with all of nanochat's
(experiments/shakespeare_cpu_modern.cfg), for each --seeds, one run at a time.
Each run records its val loss at every evaluation (deterministic for a
seed: the same on any machine), its in-loop ms/step (the median of the log
lines), its wall time and the load average around it.
--mode=speed: each variant's train step alone (benchmarks/train.py on the
recipe's model, --bench_steps timed steps), the variants taking turns for
--rounds rounds so that a load that comes and goes falls on all of them: the
median ms/step of each. Minutes, where the steps runs take an hour.
--mode=time: the same variants at equal wall time: each trains
round(steps x baseline ms/step / its ms/step) steps (the schedule scaled to
them), its ms/step taken from --results (a speed run's, else a steps run's)
on this machine. A variant whose count is the baseline's is the steps run
itself (a seed's run is deterministic), so it is not run again. Run it on a
quiet machine. Any other flag goes to every run (a shorter schedule, a tiny
model for a test).

Results go to --results (JSON, merged with what is there), and a markdown
table to stdout (--table prints the table of --results without running).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = "experiments/shakespeare_cpu.cfg"
MODERN_CFG = "experiments/shakespeare_cpu_modern.cfg"  # nanochat's set.


def modern_flags() -> list[str]:
    """experiments/shakespeare_cpu_modern.cfg's own flags (not the recipe's)."""
    lines = (REPO / MODERN_CFG).read_text().splitlines()
    skip = ("--flagfile", "--workdir")
    return [x for x in lines if x.startswith("--") and not x.startswith(skip)]


VARIANTS = {  # name: flags on top of the recipe.
    "gpt2": [],
    "rope": ["--position=rope"],
    "rmsnorm": ["--norm=rmsnorm"],
    "rmsnorm_noscale": ["--norm=rmsnorm", "--nonorm_scale"],
    "qk_norm": ["--qk_norm"],
    "relu2": ["--mlp=relu2"],
    "swiglu": ["--mlp=swiglu"],
    "gqa": ["--n_kv_head=2"],
    "untied": ["--notie_embeddings"],
    "logit_cap": ["--logit_cap=15"],
    "modern": modern_flags(),
}
EVAL = re.compile(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)")
STEP = re.compile(r"step (\d+): loss [\d.]+, .* ([\d.]+) ms/step")


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def run(flags: list[str], seed: int, data_dir: str, extra: list[str]) -> dict:
    """One whole command: the recipe, `extra`, then `flags`; its evaluations,
    ms/step, wall time and load."""
    with tempfile.TemporaryDirectory(prefix="ablation_") as workdir:
        cmd = [
            sys.executable, "-m", "jaxgpt.main", f"--flagfile={RECIPE}", *extra,
            *flags, f"--seed={seed}", f"--workdir={workdir}",
            f"--data_dir={data_dir}", "--notensorboard", "--overwrite",
        ]  # fmt: skip
        load_before, t0 = os.getloadavg()[0], time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        evals, ms, tail = [], [], []
        for line in proc.stdout:
            tail = [*tail[-30:], line]
            if m := EVAL.search(line):
                evals.append(
                    [int(m[1]), float(m[2]), round(time.perf_counter() - t0, 1)]
                )
            elif m := STEP.search(line):
                ms.append(float(m[2]))
        if proc.wait():
            sys.exit(f"error: {' '.join(cmd)} failed:\n{''.join(tail)}")
    return {
        "seed": seed,
        "evals": evals,  # [step, val loss, seconds since launch]
        "val_loss": evals[-1][1],
        "ms_per_step": statistics.median(ms[1:] or ms),  # The first holds compiling.
        "wall_s": round(time.perf_counter() - t0, 1),
        "load": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


BENCH_MS = re.compile(r"ms/step \(median\): ([\d.]+)")


def speed(flags: list[str], extra: list[str], steps: int) -> float:
    """The variant's ms/step: benchmarks/train.py on the recipe's model."""
    cmd = [
        sys.executable, "benchmarks/train.py", f"--flagfile={RECIPE}", *extra,
        *flags, f"--bench_steps={steps}", "--peak_tflops=1",  # (No peak to measure.)
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode or not (m := BENCH_MS.search(done.stdout)):
        sys.exit(
            f"error: {' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return float(m[1])


def ms_per_step(name: str, results: dict) -> float:
    """`name`'s ms/step: its speed run's median, else its steps runs'."""
    res = results[name]
    if "speed" in res:
        return statistics.median(res["speed"]["ms_per_step"])
    return statistics.median(r["ms_per_step"] for r in res["steps"])


def time_steps(name: str, results: dict) -> int:
    """The steps that give `name` the baseline's wall time."""
    steps = results["gpt2"]["steps"][0]["evals"][-1][0]
    ratio = ms_per_step("gpt2", results) / ms_per_step(name, results)
    return max(1, round(steps * ratio))


def time_flags(name: str, results: dict) -> list[str]:
    """The flags that give `name` the baseline's wall time for its steps."""
    n = time_steps(name, results)
    return [f"--max_iters={n}", f"--lr_decay_iters={n}", f"--eval_interval={n}"]


def table(results: dict) -> str:
    header = (
        "| variant | flags | val loss at the end (per seed) | mean | ms/step |"
        " wall s | val loss at equal wall time (steps) | load |"
    )
    lines = [
        header,
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for name, flags in VARIANTS.items():
        res = results.get(name, {})
        steps, timed = res.get("steps", []), res.get("time", [])
        if not steps:
            continue
        losses = [r["val_loss"] for r in steps]
        equal = ", ".join(f"{r['val_loss']:.4f} ({r['evals'][-1][0]})" for r in timed)
        loads = [x for r in steps + timed for x in r["load"]]
        shown = MODERN_CFG if name == "modern" else " ".join(flags) or "(the recipe)"
        lines.append(
            f"| {name} | `{shown}` |"
            f" {', '.join(f'{x:.4f}' for x in losses)} |"
            f" {statistics.mean(losses):.4f} |"
            f" {ms_per_step(name, results):.1f} |"
            f" {statistics.median(r['wall_s'] for r in steps):.0f} |"
            f" {equal or 'not run'} | {min(loads):.1f}-{max(loads):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], allow_abbrev=False
    )
    parser.add_argument("--mode", choices=["steps", "speed", "time"], default="steps")
    parser.add_argument("--rounds", type=int, default=3, help="--mode=speed's rounds")
    parser.add_argument("--bench_steps", type=int, default=40, help="--mode=speed's")
    parser.add_argument("--seeds", default="1337,1338")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--results", type=Path, default=REPO / "benchmarks/ablation.json"
    )
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--table", action="store_true", help="print, do not run")
    args, extra = parser.parse_known_args()  # Other flags go to every run.
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    if not args.table and args.mode == "speed":
        results["machine"] = machine()
        names = args.variants.split(",")
        ms = {name: [] for name in names}
        for i in range(args.rounds):
            for name in names:
                ms[name].append(speed(VARIANTS[name], extra, args.bench_steps))
                print(f"{name} round {i}: {ms[name][-1]:.2f} ms/step", flush=True)
        for name in names:
            load = round(os.getloadavg()[0], 2)
            results.setdefault(name, {})["speed"] = {
                "ms_per_step": ms[name],
                "load": load,
            }
        args.results.write_text(json.dumps(results, indent=1) + "\n")
    elif not args.table:
        results["machine"] = machine()
        for name in args.variants.split(","):
            flags = VARIANTS[name]  # The variant's, then (time) its steps.
            if args.mode == "time":
                flags = flags + time_flags(name, results)
            runs = []
            for seed in (int(s) for s in args.seeds.split(",")):
                same = (
                    args.mode == "time"
                    and time_steps(name, results)
                    == (results["gpt2"]["steps"][0]["evals"][-1][0])
                )
                steps_run = [
                    r
                    for r in results.get(name, {}).get("steps", [])
                    if r["seed"] == seed
                ]
                if same and steps_run:  # The steps run itself.
                    runs.append(steps_run[0])
                else:
                    runs.append(run(flags, seed, args.data_dir, extra))
                r = runs[-1]
                print(
                    f"{name} seed {seed}: val {r['val_loss']:.4f},"
                    f" {r['ms_per_step']:.1f} ms/step, {r['wall_s']:.0f} s,"
                    f" load {r['load']}",
                    flush=True,
                )
            results.setdefault(name, {})[args.mode] = runs
            args.results.write_text(json.dumps(results, indent=1) + "\n")
    print(f"machine: {results.get('machine')}")
    print(table(results))


if __name__ == "__main__":
    main()

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
--mode=time: the same variants at equal wall time: each trains
round(steps x baseline ms/step / its ms/step) steps (the schedule scaled to
them), its ms/step taken from --results of a steps run on this machine. Run
it on a quiet machine, after a steps run there. Any other flag goes to every
run (a shorter schedule, a tiny model for a test).

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


def time_flags(name: str, results: dict) -> list[str]:
    """The flags that give `name` the baseline's wall time for its steps."""
    ms = lambda v: statistics.median(r["ms_per_step"] for r in results[v]["steps"])
    steps = results["gpt2"]["steps"][0]["evals"][-1][0]
    n = max(1, round(steps * ms("gpt2") / ms(name)))
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
            f" {statistics.median(r['ms_per_step'] for r in steps):.1f} |"
            f" {statistics.median(r['wall_s'] for r in steps):.0f} |"
            f" {equal or 'not run'} | {min(loads):.1f}-{max(loads):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], allow_abbrev=False
    )
    parser.add_argument("--mode", choices=["steps", "time"], default="steps")
    parser.add_argument("--seeds", default="1337,1338")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--results", type=Path, default=REPO / "benchmarks/ablation.json"
    )
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--table", action="store_true", help="print, do not run")
    args, extra = parser.parse_known_args()  # Other flags go to every run.
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    if not args.table:
        results["machine"] = machine()
        for name in args.variants.split(","):
            flags = VARIANTS[name]  # The variant's, then (time) its steps.
            if args.mode == "time":
                flags = flags + time_flags(name, results)
            runs = []
            for seed in (int(s) for s in args.seeds.split(",")):
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

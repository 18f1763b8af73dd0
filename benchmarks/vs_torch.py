"""jaxgpt against PyTorch on one recipe, side by side on this machine.

  python benchmarks/vs_torch.py --flagfile=experiments/shakespeare_cpu.cfg
  python benchmarks/vs_torch.py --flagfile=experiments/shakespeare.cfg --bench_chunk=3
  python benchmarks/vs_torch.py --flagfile=experiments/shakespeare_cpu.cfg --bench=run
  python benchmarks/vs_torch.py --flagfile=experiments/shakespeare_cpu.cfg --bench=sample
  python benchmarks/vs_torch.py --flagfile=experiments/shakespeare_cpu.cfg --bench=matmul

The PyTorch side is benchmarks/torch_twin.py: the same GPT, initialisation,
batches, optimizer and schedule, float32, written as nanoGPT writes it.

--bench=step (default): in this process, the training loop of each framework
  on the recipe's model and batches, in alternating chunks of --bench_chunk
  steps (A B A B ...): jaxgpt's is train.train itself (the compiled step, host
  batches, the log's sync every --log_interval), the twin's is nanoGPT's loop.
  A third chunk times jaxgpt's step as benchmarks/train.py does (blocking on
  every step). Prints the medians over --bench_rounds, tokens/s and the ratio.
  First, both take three steps from the same parameters on the same batches:
  their losses must agree (float32 rounding aside).
--bench=run: the whole command, `python -m jaxgpt.main --flagfile=...` and
  `python benchmarks/torch_twin.py --flagfile=...` (training, evaluations, the
  final 500-token sample; nanoGPT's generate() on the twin), alternating, each
  timed from launch to exit and at every evaluation it prints, with the time
  each first reaches --target_loss.
--bench=sample: tokens/s at batch 1 of jaxgpt's sampling (KV cache, compiled
  program, second call) and of nanoGPT's generate(), on the recipe's model.
--bench=matmul: the training step's matrix products (every layer's forward,
  input-gradient and weight-gradient product, and the tied output layer's),
  each timed alone in both frameworks (XLA's inside a compiled loop, the
  loop's own cost subtracted; torch.mm as autograd calls it, transposed
  operands as strided views), with their sum
  over one step: how much of the gap between the steps the products make.
  The attention's batched products (flash attention in torch) are left out.
--bench=seeds: the final val loss over --seeds of jaxgpt and of the twin run
  with nanoGPT's choices (torch_twin.Knobs), each on its own evaluation batches
  and on the whole val split: are the two the same within noise?
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_twin

from jaxgpt import generate, lecture, sharding, train
from jaxgpt.config import ModelConfig, TrainConfig
from jaxgpt.run import checkpoint as ckpt
from jaxgpt.run import (
    cli,  # Defines the flags.
    loop,
    metrics,
    perf,
    program,
)
from jaxgpt.run.configs import LoopConfig, RunConfig, SampleConfig
from jaxgpt.run.perf import cpu_speedups

_BENCH = flags.DEFINE_enum(
    "bench", "step", ["step", "run", "sample", "matmul", "seeds"], "What to measure."
)
_SEEDS = flags.DEFINE_list("seeds", ["1", "2", "3", "4", "5"], "--bench=seeds.")
_CHUNK = flags.DEFINE_integer("bench_chunk", 100, "Steps per timed chunk.")
_ROUNDS = flags.DEFINE_integer("bench_rounds", 5, "Chunks (or runs) per framework.")
_TARGET = flags.DEFINE_float(
    "target_loss", 1.8857, "--bench=run: report when val loss first reaches this."
)
_EXTRA = flags.DEFINE_list(
    "jaxgpt_flags", [], "--bench=run: extra flags for jaxgpt's command only."
)
_FLAGFILES = flags.DEFINE_list(
    "jaxgpt_flagfiles",
    [],
    "--bench=run: also time jaxgpt with each of these flagfiles (its own recipe,"
    " e.g. experiments/shakespeare_cpu_speedrun.cfg), in the same rounds.",
)
_TOKENS = flags.DEFINE_integer("bench_new_tokens", 500, "--bench=sample: tokens.")
_SETTLE = flags.DEFINE_float(
    "bench_settle_s", 0.5, "--bench=sample, matmul: idle seconds before each timing."
)
_CALLS = flags.DEFINE_integer("bench_calls", 200, "--bench=matmul: calls per product.")

REPO = Path(__file__).resolve().parent.parent


def machine() -> str:
    """The CPU's model name, family/model numbers, cores, and the thread counts used."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{perf.cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}"
        f" ({torch.get_num_threads()} threads), jax {jax.__version__};"
        f" load average {load:.2f}"
    )


OWN_FLAGS = ("bench", "seeds", "target_loss", "jaxgpt_flags", "jaxgpt_flagfiles")


def recipe_args() -> list[str]:
    """This command's arguments for the recipe (--flagfile and overrides), to
    hand to jaxgpt's and the twin's commands."""
    own = tuple(f"--{name}" for name in OWN_FLAGS)
    return [a for a in sys.argv[1:] if not a.startswith(own)]


def configs():
    run = cli.from_flags(RunConfig)
    train_cfg = cli.from_flags(TrainConfig)
    return run, train_cfg, cli.from_flags(ModelConfig, vocab_size=65)


# --- --bench=step ------------------------------------------------------------------


class _NoCheckpoints:
    """What train.train asks of its checkpointer, minus the disk: this
    benchmark times steps."""

    workdir = "(not saved)"
    best_val_loss = math.inf

    def latest_step(self):
        return None

    def check(self):
        pass

    def save(self, *args, **kwargs):
        pass

    def wait(self):
        pass


class _QuietLog(metrics.TrainLog):
    """The training log, syncing on the loss every log_interval, printing nothing."""

    def say(self, text: str) -> None:
        pass


def check_same_losses(model_cfg, train_cfg, batch, root, mesh) -> float:
    """Three steps of both from jaxgpt's initial parameters on the same batches:
    the largest difference of their losses."""
    model_cfg = dataclasses.replace(model_cfg, dropout=0.0)  # Same masks: none.
    state = program.create_state(model_cfg, train_cfg, root, mesh)
    step = program.make_train_step(model_cfg, train_cfg, mesh)
    twin = torch_twin.GPT(model_cfg)
    twin.load_flax(state.params)
    twin_step = torch_twin.make_train_step(twin, train_cfg)
    diffs = []
    for s in range(3):
        x, y = batch(s)
        state, m = step(state, x, y, root)
        tx, ty = (torch.from_numpy(np.array(z)).long() for z in (x, y))
        loss = twin_step(tx, ty, torch_twin.lr_at(s, train_cfg)).item()
        diffs.append(abs(float(m["loss"]) - loss))
    return max(diffs)


def bench_step():
    run, train_cfg, model_cfg = configs()
    B, T = train_cfg.batch_size, model_cfg.block_size
    needed = _CHUNK.value * (3 * _ROUNDS.value + 2)
    train_cfg = dataclasses.replace(
        train_cfg, max_iters=max(train_cfg.max_iters, needed + 1)
    )
    loop_cfg = dataclasses.replace(
        cli.from_flags(LoopConfig, max_iters=train_cfg.max_iters), eval_interval=10**9
    )
    tokens = np.random.default_rng(0).integers(0, 65, 1_000_000).astype(np.int32)
    root, mesh = train.root_key(run.seed), sharding.make_mesh()
    state = program.create_state(model_cfg, train_cfg, root, mesh)
    batch = program.make_batches(tokens, root, B, T, mesh)
    diff = check_same_losses(model_cfg, train_cfg, batch, root, mesh)

    step = program.make_train_step(model_cfg, train_cfg, mesh)
    step_fn = lambda state, x, y: step(state, x, y, root)
    schedule = train.lr_schedule(train_cfg)
    workdir = tempfile.mkdtemp(prefix="vs_torch_")

    def jaxgpt_loop(state, n):  # train.train from state.step, n steps.
        start = int(state.step)
        cfg = dataclasses.replace(loop_cfg, stop_at=start + n)
        log = _QuietLog(workdir, model_cfg, train_cfg, loop_cfg, schedule, start)
        evaluate = lambda params: {"train_loss": 0.0, "val_loss": 0.0}
        t0 = time.perf_counter()
        state, _ = loop.train(
            state, cfg, step_fn, batch, evaluate, _NoCheckpoints(), log
        )
        return state, (time.perf_counter() - t0) / n

    def jaxgpt_blocked(state, n):  # benchmarks/train.py: the median blocked step.
        start, times = int(state.step), []
        for s in range(start, start + n):
            t0 = time.perf_counter()
            state, m = step(state, *batch(s), root)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        return state, statistics.median(times)

    twin = torch_twin.GPT(model_cfg)
    twin.load_flax(state.params)
    twin_step = torch_twin.make_train_step(twin, train_cfg)
    twin_batch = torch_twin.batches(tokens, root, B, T)
    twin_at = [0]

    def twin_loop(n):  # nanoGPT's loop: .item() every log_interval.
        t0 = time.perf_counter()
        for s in range(twin_at[0], twin_at[0] + n):
            loss = twin_step(*twin_batch(s), torch_twin.lr_at(s, train_cfg))
            if (s + 1) % loop_cfg.log_interval == 0:
                loss.item()
        loss.item()
        twin_at[0] += n
        return (time.perf_counter() - t0) / n

    state, _ = jaxgpt_loop(state, _CHUNK.value)  # Compiles; warms both up.
    twin_loop(_CHUNK.value)
    times = {"jaxgpt loop": [], "torch loop": [], "jaxgpt blocked": []}
    for _ in range(_ROUNDS.value):
        state, dt = jaxgpt_loop(state, _CHUNK.value)
        times["jaxgpt loop"].append(dt)
        times["torch loop"].append(twin_loop(_CHUNK.value))
        state, dt = jaxgpt_blocked(state, _CHUNK.value)
        times["jaxgpt blocked"].append(dt)

    print(f"machine: {machine()}")
    print(
        f"recipe: L={model_cfg.n_layer} H={model_cfg.n_head} C={model_cfg.n_embd}"
        f" T={T} B={B} dropout={model_cfg.dropout} {model_cfg.dtype};"
        f" {_ROUNDS.value} rounds of {_CHUNK.value} steps each, interleaved"
    )
    print(
        f"same start, same batches (dropout off): losses of 3 steps differ by at"
        f" most {diff:.2e}"
    )
    print("| loop | ms/step (median) | spread | tokens/s |")
    print("|---|---:|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"| {name} | {1e3 * med:.2f} | {1e3 * min(ts):.1f}-{1e3 * max(ts):.1f} |"
            f" {B * T / med:,.0f} |"
        )
    jl, tl, jb = (statistics.median(times[k]) for k in times)
    print(f"jaxgpt / torch tokens/s: {tl / jl:.2f}x (loop vs loop)")
    print(f"jaxgpt loop / blocked step: {jl / jb:.3f}")


# --- --bench=run -------------------------------------------------------------------


def timed_command(cmd: list[str]) -> dict:
    """Runs cmd; returns its wall time and (seconds since launch, step, val loss)
    for every evaluation line it prints."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
    )
    evals, lines = [], []
    pattern = re.compile(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)")
    for line in proc.stdout:
        lines.append(line)
        if m := pattern.search(line):
            evals.append((time.perf_counter() - t0, int(m[1]), float(m[2])))
    proc.wait()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{''.join(lines[-20:])}")
    return {"wall": time.perf_counter() - t0, "evals": evals}


def bench_run():
    workdir = tempfile.mkdtemp(prefix="vs_torch_run_")
    jaxgpt = [sys.executable, "-m", "jaxgpt.main", *recipe_args()]
    where = [f"--workdir={workdir}", "--overwrite"]  # After any flagfile's own.
    commands = {"jaxgpt": jaxgpt + where + [f"--{f}" for f in _EXTRA.value]}
    for path in _FLAGFILES.value:  # Each its own recipe, in the same rounds.
        commands[f"jaxgpt {Path(path).stem}"] = [*jaxgpt, f"--flagfile={path}", *where]
    commands["torch twin"] = [
        sys.executable, "benchmarks/torch_twin.py", *recipe_args(),
        "--nanogpt_init", "--nanogpt_batches",
    ]  # fmt: skip
    print(f"machine: {machine()}")
    results = {name: [] for name in commands}
    for r in range(_ROUNDS.value):
        for name, cmd in commands.items():
            res = timed_command(cmd)
            results[name].append(res)
            first = next((e for e in res["evals"] if e[2] <= _TARGET.value), None)
            print(
                f"round {r}: {name}: {res['wall']:.1f} s, final val loss"
                f" {res['evals'][-1][2]:.4f}, val <= {_TARGET.value} at "
                + (f"{first[0]:.1f} s (step {first[1]})" if first else "never"),
                flush=True,
            )
            for t, s, v in res["evals"]:
                print(f"    {t:6.1f} s  step {s:5d}  val {v:.4f}")
    walls = {k: statistics.median(r["wall"] for r in v) for k, v in results.items()}
    twin = walls["torch twin"]
    print(
        f"median wall: jaxgpt {walls['jaxgpt']:.1f} s, torch twin"
        f" {twin:.1f} s: ratio {walls['jaxgpt'] / twin:.2f}"
    )
    reached = {name: time_to_target(runs) for name, runs in results.items()}
    for name, t in reached.items():
        if name != "torch twin" and t is not None and reached["torch twin"]:
            print(
                f"median time to val <= {_TARGET.value}: {name} {t:.1f} s, torch"
                f" twin {reached['torch twin']:.1f} s: ratio {t / reached['torch twin']:.2f}"
            )


def time_to_target(runs: list[dict]) -> float | None:
    """The median over rounds of the seconds to the first val loss <= --target_loss
    (None if a round never got there)."""
    times = [
        next((t for t, _, val in r["evals"] if val <= _TARGET.value), None)
        for r in runs
    ]
    return None if None in times else statistics.median(times)


# --- --bench=sample ----------------------------------------------------------------


def settle() -> None:
    """Lets the other framework's threads go idle before a timing: PyTorch's
    OpenMP workers spin for a while after each parallel region, taking a core
    from whatever runs next in the process."""
    time.sleep(_SETTLE.value)


def bench_sample():
    _, _, model_cfg = configs()
    N = _TOKENS.value
    cfg = dataclasses.replace(
        cli.from_flags(SampleConfig), num_samples=1, max_new_tokens=N
    )
    params = lecture.init_params(model_cfg, jax.random.PRNGKey(0))
    apply_fn = lecture.make_model(model_cfg).apply
    times = {"jaxgpt (KV cache)": [], "torch generate()": []}
    twin = torch_twin.GPT(model_cfg)
    twin.load_flax(params)
    key = jax.random.PRNGKey(0)
    draw = lambda: generate.sample(
        apply_fn, params, model_cfg, [0], key, **cfg.options()
    )
    draw().block_until_ready()  # What --mode=sample runs, compiled first.
    for r in range(_ROUNDS.value):
        settle()
        t0 = time.perf_counter()
        draw().block_until_ready()
        times["jaxgpt (KV cache)"].append(time.perf_counter() - t0)
        settle()
        t0 = time.perf_counter()
        torch_twin.generate(
            twin,
            torch.zeros((1, 1), dtype=torch.long),
            N,
            cfg.temperature,
            cfg.top_k or None,
        )
        times["torch generate()"].append(time.perf_counter() - t0)
    print(f"machine: {machine()}")
    print(
        f"model: L={model_cfg.n_layer} H={model_cfg.n_head} C={model_cfg.n_embd}"
        f" T={model_cfg.block_size}; {N} tokens at batch 1, median of {_ROUNDS.value}"
    )
    print("| sampler | s | tokens/s |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {N / med:,.0f} |")
    j, t = (statistics.median(v) for v in times.values())
    print(f"jaxgpt / torch tokens/s: {t / j:.1f}x")


# --- --bench=matmul ----------------------------------------------------------------


def step_products(
    model_cfg, batch_size: int
) -> list[tuple[str, int, int, int, int, bool]]:
    """(name, per step, M, K, N, lhs transposed) of the training step's dense
    products [M, K] @ [K, N]: each layer's, and the output layer's once; the
    weight gradients as x^T @ g with x stored [K, M]."""
    R, C, V = batch_size * model_cfg.block_size, model_cfg.n_embd, model_cfg.vocab_size
    L, rows = model_cfg.n_layer, []
    for name, count, n_in, n_out in [
        ("c_attn", L, C, 3 * C),
        ("attn c_proj", L, C, C),
        ("c_fc", L, C, 4 * C),
        ("mlp c_proj", L, 4 * C, C),
        ("output layer", 1, C, V),
    ]:
        rows += [(f"{name} forward", count, R, n_in, n_out, False)]
        rows += [(f"{name} input grad", count, R, n_out, n_in, False)]
        rows += [(f"{name} weight grad", count, n_in, R, n_out, True)]
    return rows


def median_ms(fn, repeats: int, per_call: int = 1) -> float:
    """Median ms of fn() over `repeats` timings, divided by the calls each makes."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times) / per_call


def jax_product_ms(a, b, transposed: bool, calls: int) -> float:
    """ms of one a @ b (a.T @ b if transposed) inside a compiled loop of `calls`
    products, each waiting for the previous one (b picks up 0 x the product's
    first element), less the same loop without the product: neither dispatch,
    nor overlap, nor the dependency's own pass over b enters the figure."""
    dot = (lambda a, b: a.T @ b) if transposed else (lambda a, b: a @ b)
    b, timed = jax.numpy.asarray(b), {}
    for name, first in [
        ("product", lambda b: dot(a, b)[0, 0]),
        ("loop", lambda b: b[0, 0]),
    ]:
        body = lambda i, b, first=first: b + 0.0 * first(b)
        loop = jax.jit(lambda b, body=body: jax.lax.fori_loop(0, calls, body, b))
        timed[name] = median_ms(
            lambda loop=loop, b=b: loop(b).block_until_ready(), 7, calls
        )
    return timed["product"] - timed["loop"]


def bench_matmul():
    _, train_cfg, model_cfg = configs()
    rng = np.random.default_rng(0)
    calls = _CALLS.value
    print(f"machine: {machine()}")
    print(
        f"model: L={model_cfg.n_layer} C={model_cfg.n_embd} T={model_cfg.block_size}"
        f" B={train_cfg.batch_size}, float32; median over {calls} products each"
    )
    print(
        "| product | [M, K] @ [K, N] | per step | jaxgpt ms | GFLOP/s | torch ms | GFLOP/s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    totals = {"jax": 0.0, "torch": 0.0}
    for name, count, M, K, N, transposed in step_products(
        model_cfg, train_cfg.batch_size
    ):
        a = rng.standard_normal((K, M) if transposed else (M, K), np.float32)
        b = rng.standard_normal((K, N), np.float32)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        ta = ta.t() if transposed else ta  # A strided view, as autograd hands mm.
        a = jax.numpy.asarray(a)
        same = np.asarray(a.T @ b if transposed else a @ b)  # The same product?
        np.testing.assert_allclose(same, torch.mm(ta, tb).numpy(), rtol=1e-4, atol=1e-3)
        settle()
        j = jax_product_ms(a, b, transposed, calls)
        settle()
        t = median_ms(lambda ta=ta, tb=tb: torch.mm(ta, tb), calls)
        totals["jax"] += count * j
        totals["torch"] += count * t
        gflop = 2 * M * K * N / 1e9
        print(
            f"| {name} | [{M}, {K}] @ [{K}, {N}] | {count} | {j:.3f} | {gflop / j * 1e3:.0f}"
            f" | {t:.3f} | {gflop / t * 1e3:.0f} |"
        )
    j, t = totals["jax"], totals["torch"]
    print(f"products per step: jaxgpt {j:.1f} ms, torch {t:.1f} ms ({j - t:+.1f} ms)")


# --- --bench=seeds --------------------------------------------------------------------


def bench_seeds():
    """Final val loss over seeds, on the run's evaluation batches and on the
    whole val split: jaxgpt itself, and the twin with nanoGPT's choices (its
    init, batches, warmup, GELU and fresh evaluation batches). jaxgpt runs in a
    subprocess while the twin trains on one thread beside it."""
    _, train_cfg, _ = configs()
    loop_cfg = cli.from_flags(LoopConfig, max_iters=train_cfg.max_iters)
    tok, splits = torch_twin.recipe_data()
    model_cfg = cli.from_flags(ModelConfig, vocab_size=tok.vocab_size)
    T = model_cfg.block_size
    torch.set_num_threads(1)
    rows = {}
    print(f"machine: {machine()}")
    print("| seed | jaxgpt | jaxgpt, whole val | nanoGPT twin | twin, whole val |")
    print("|---:|---:|---:|---:|---:|")
    for seed in map(int, _SEEDS.value):
        workdir = tempfile.mkdtemp(prefix="vs_torch_seed_")
        cmd = [sys.executable, "-m", "jaxgpt.main", *recipe_args()]
        cmd += [f"--seed={seed}", f"--workdir={workdir}", "--overwrite"]
        cmd += ["--max_new_tokens=1"]
        jaxgpt_run = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
        )
        evals = []
        record = lambda step, losses, *_, evals=evals: evals.append(losses["val_loss"])
        twin = torch_twin.train_recipe(
            model_cfg, train_cfg, loop_cfg, splits, seed, torch_twin.Knobs.nanogpt(),
            record,
        )  # fmt: skip
        out = jaxgpt_run.communicate()[0]
        jax_val = float(re.findall(r"val loss ([\d.]+)", out)[-1])
        twin_whole = torch_twin.full_loss(twin, splits["val"], T)
        with ckpt.Checkpointer(workdir) as checkpointer:  # jaxgpt's final model.
            target = program.abstract_params(model_cfg, sharding.make_mesh())
            twin.load_flax(checkpointer.restore_params(target))
        row = [jax_val, torch_twin.full_loss(twin, splits["val"], T)]
        rows[seed] = row + [evals[-1], twin_whole]
        print("| " + " | ".join([str(seed)] + [f"{v:.4f}" for v in rows[seed]]) + " |")
        sys.stdout.flush()
    if len(rows) > 1:
        cols = list(zip(*rows.values()))
        stat = lambda c: f"{statistics.mean(c):.4f} +- {statistics.stdev(c):.4f}"
        print("| mean +- sd | " + " | ".join(stat(c) for c in cols) + " |")


def main(argv):
    del argv
    cpu_speedups()
    benches = {"step": bench_step, "run": bench_run, "sample": bench_sample}
    benches |= {"matmul": bench_matmul, "seeds": bench_seeds}
    benches[_BENCH.value]()


if __name__ == "__main__":
    app.run(main)

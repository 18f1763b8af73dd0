"""Training throughput: compile time, ms/step, tokens/s, FLOPs and MFU.

  python benchmarks/train.py --flagfile=experiments/shakespeare_cpu.cfg
  python benchmarks/train.py --flagfile=experiments/shakespeare.cfg --peak_tflops=989

Runs the program the training loop runs: the same mesh, program.make_train_step
and program.make_batches (host batches from the batch stream), on random tokens
(no corpus needed). FLOPs, peak and MFU are the training log's
(jaxgpt/run/perf.py): model FLOPs per token 6N + 12*L*C*T, N the parameters
of the matmuls (all but the position table; a tied token table counts once,
as the output layer: nanoGPT's estimate_mfu); the peak is --peak_tflops, the
data sheet's for a known accelerator, or on a CPU the best matmul FLOP/s
stored for this machine (measured again when old or measured under load;
--measure_peak measures it now), so the MFU here is the MFU a run logs.
"""

from __future__ import annotations

import statistics
import sys
import time

import flax.linen
import jax
import numpy as np
from absl import app, flags

from jaxgpt import model, sharding, train
from jaxgpt.config import ConfigError, ModelConfig, TrainConfig
from jaxgpt.modes.training import check_backend
from jaxgpt.run import (
    cache,
    cli,  # Defines the flags.
    perf,
    program,
    quiet,
)
from jaxgpt.run.configs import MeshConfig, RunConfig
from jaxgpt.run.perf import keep_freed_memory, unroll_threefry

_STEPS = flags.DEFINE_integer("bench_steps", 50, "Timed steps.")
_WARMUP = flags.DEFINE_integer("bench_warmup", 5, "Untimed steps after compiling.")
_MEASURE = flags.DEFINE_bool(
    "measure_peak",
    False,
    "Measure the peak now (stored for the runs if it is the best yet), even on a"
    " device in the data-sheet table.",
)
_MATMUL_N = flags.DEFINE_integer("peak_matmul_n", 2048, "Size of the peak matmul.")
_MALLOPT = flags.DEFINE_bool(
    "bench_keep_freed_memory", True, "perf.keep_freed_memory (as main.py), or not."
)
_UNROLL = flags.DEFINE_bool(
    "bench_unroll_threefry", True, "perf.unroll_threefry (as main.py), or not."
)
_DROPOUT_RNG = flags.DEFINE_enum(
    "bench_dropout_rng",
    "threefry",
    ["threefry", "rbg", "unsafe_rbg"],
    "JAX PRNG implementation drawing the dropout masks (threefry: jaxgpt's).",
)
_ROWS = flags.DEFINE_bool(
    "bench_dense_on_rows",
    True,
    "model.Dense (a 2-D matmul on the rows), or flax's nn.Dense on 3-D input.",
)


def main(argv):
    del argv
    quiet.install()  # jaxgpt's log format; other libraries' notices dropped.
    if _MALLOPT.value:
        keep_freed_memory()
    if _UNROLL.value:
        unroll_threefry()
    if not _ROWS.value:  # What model.Dense's one line buys: measured here.
        model.Dense = flax.linen.Dense
    if _DROPOUT_RNG.value != "threefry":  # What another PRNG would buy.
        threefry_key, impl = train.stream_key, _DROPOUT_RNG.value

        def stream_key(root, name, i):
            bits = jax.random.bits(threefry_key(root, name, i), (4,), jax.numpy.uint32)
            return (
                jax.random.wrap_key_data(bits, impl=impl)
                if name == "dropout"
                else threefry_key(root, name, i)
            )

        train.stream_key = stream_key
    run, mesh_cfg = (
        cli.from_flags(RunConfig),
        cli.from_flags(MeshConfig),
    )
    train_cfg = cli.from_flags(TrainConfig)
    model_cfg = cli.from_flags(ModelConfig, vocab_size=65)
    try:  # --attention=cudnn off a GPU: one line, as jaxgpt.main says it.
        check_backend(model_cfg.attention)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    # The peak first, while the machine is otherwise idle.
    peak, source = perf.peak_flops(
        model_cfg.dtype,
        run.peak_tflops,
        _MATMUL_N.value,
        measure=_MEASURE.value,
        store=cache.peak_file(),
    )

    mesh = sharding.make_mesh(mesh_cfg.mesh_data, mesh_cfg.mesh_fsdp)
    B, T = train_cfg.batch_size, model_cfg.block_size
    root = train.root_key(run.seed)
    state = program.create_state(model_cfg, train_cfg, root, mesh)
    step = program.make_train_step(model_cfg, train_cfg, mesh)
    tokens = np.random.default_rng(0).integers(0, 65, 100 * T).astype(np.int32)
    batches = program.make_batches(tokens, root, B, T, mesh)

    t0 = time.perf_counter()
    compiled = step.lower(state, *batches(0), root).compile()
    compile_s = time.perf_counter() - t0
    for i in range(_WARMUP.value):
        state, _ = compiled(state, *batches(i), root)
    jax.block_until_ready(state)
    times = []
    for i in range(_WARMUP.value, _WARMUP.value + _STEPS.value):
        t0 = time.perf_counter()  # A step as the loop runs it: its batch included.
        state, metrics = compiled(state, *batches(i), root)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)

    flops_token = perf.flops_per_token(model_cfg)
    n_matmul = perf.matmul_params(model_cfg)
    tokens_s = B * T / step_s
    n_params = model.count_params(state.params)
    shape = (
        f"L={model_cfg.n_layer} H={model_cfg.n_head} C={model_cfg.n_embd} T={T} B={B}"
        f" dropout={model_cfg.dropout} {model_cfg.dtype} ({n_params:,} params)"
    )
    rows = [
        (
            "machine",
            f"{perf.cpu_name()}, {jax.local_device_count()} x {jax.devices()[0].device_kind}",
        ),
        ("mesh", str(dict(mesh.shape))),
        ("model", shape),
        ("compile (cold)", f"{compile_s:.2f} s"),
        ("ms/step (median)", f"{1e3 * step_s:.2f} (best {1e3 * min(times):.2f})"),
        ("tokens/s", f"{tokens_s:,.0f}"),
        (
            "model FLOPs/token",
            (
                f"{flops_token / 1e6:.2f} M (6N + 12LCT, N = {n_matmul:,} params"
                " in matmuls: all but the position table)"
            ),
        ),
        ("achieved", f"{flops_token * tokens_s / 1e9:.1f} GFLOP/s"),
        ("peak", f"{peak / 1e9:.1f} GFLOP/s per device ({source})"),
        ("MFU", f"{100 * perf.mfu(flops_token, tokens_s, peak, mesh.size):.1f}%"),
    ]
    for name, value in rows:
        print(f"{name:>18}: {value}")


if __name__ == "__main__":
    app.run(main)

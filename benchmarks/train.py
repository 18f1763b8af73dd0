"""Training throughput: compile time, ms/step, tokens/s, FLOPs and MFU.

  python benchmarks/train.py --flagfile=experiments/shakespeare_cpu.cfg
  python benchmarks/train.py --flagfile=experiments/shakespeare.cfg --peak_tflops=989

Model FLOPs per token are 6N + 12*L*C*T with N the non-embedding parameters
(PaLM's accounting, as nanoGPT's MFU); MFU divides the achieved FLOP/s by a
peak (jaxgpt/perf.py): on a CPU it is measured in this run (a large jitted
matmul in the run's dtype); on a known accelerator it is the data sheet's
figure; --peak_tflops gives it. Uses random tokens: no corpus.
"""

from __future__ import annotations

import statistics
import time

import jax
from absl import app, flags

from jaxgpt import main as jaxgpt_main  # Defines the model and training flags.
from jaxgpt import model, perf, runtime, sharding, train

_STEPS = flags.DEFINE_integer("bench_steps", 50, "Timed steps.")
_WARMUP = flags.DEFINE_integer("bench_warmup", 5, "Untimed steps after compiling.")
_MEASURE = flags.DEFINE_bool(
    "measure_peak", False, "Measure the peak even on a device in the data-sheet table."
)
_MATMUL_N = flags.DEFINE_integer("peak_matmul_n", 2048, "Size of the peak matmul.")


def main(argv):
    del argv
    runtime.keep_freed_memory()
    train_cfg = jaxgpt_main.train_config()
    model_cfg = jaxgpt_main.model_config(vocab_size=65)
    dtype = model_cfg.dtype
    # The peak first, while the machine is otherwise idle.
    peak, source = perf.peak_flops(
        dtype, flags.FLAGS.peak_tflops, _MATMUL_N.value, measure=_MEASURE.value
    )

    # The training program of main.py: the same mesh, shardings and step.
    mesh = jaxgpt_main.make_mesh()
    B, T = train_cfg.batch_size, model_cfg.block_size
    sharding.check_batch(B, train_cfg.grad_accum_steps, mesh)
    state = train.create_state(model_cfg, train_cfg, mesh)
    step = train.make_train_step(
        mesh, sharding.state_shardings(state, mesh), train_cfg.grad_accum_steps
    )
    tokens = jax.random.randint(jax.random.PRNGKey(0), (100 * T,), 0, 65)
    x, y = train.make_get_batch(mesh, B, T)(jax.random.PRNGKey(1), tokens)
    key = jax.random.PRNGKey(2)

    t0 = time.perf_counter()
    compiled = step.lower(state, x, y, key).compile()
    compile_s = time.perf_counter() - t0
    for i in range(_WARMUP.value):
        state, metrics = compiled(state, x, y, jax.random.fold_in(key, i))
    jax.block_until_ready(metrics)
    times = []
    for i in range(_STEPS.value):
        t0 = time.perf_counter()
        state, metrics = compiled(state, x, y, jax.random.fold_in(key, i))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)

    flops_token = model.flops_per_token(model_cfg)
    tokens_s = B * T / step_s
    achieved = flops_token * tokens_s
    n_params = model.count_params(state.params)
    rows = [
        (
            "devices",
            f"{mesh.size} x {jax.devices()[0].device_kind}, mesh {dict(mesh.shape)}",
        ),
        (
            "model",
            (
                f"L={model_cfg.n_layer} H={model_cfg.n_head} C={model_cfg.n_embd}"
                f" T={T} B={B} dropout={model_cfg.dropout} {dtype}"
                f" ({n_params:,} params)"
            ),
        ),
        ("compile (cold)", f"{compile_s:.2f} s"),
        ("ms/step (median)", f"{1e3 * step_s:.2f} (best {1e3 * min(times):.2f})"),
        ("tokens/s", f"{tokens_s:,.0f}"),
        (
            "model FLOPs/token",
            f"{flops_token / 1e6:.2f} M (6N + 12LCT, N = non-embedding params)",
        ),
        ("achieved", f"{achieved / 1e9:.1f} GFLOP/s"),
        ("peak", f"{peak / 1e9:.1f} GFLOP/s per device ({source})"),
        ("MFU", f"{100 * perf.mfu(flops_token, tokens_s, peak, mesh.size):.1f}%"),
    ]
    for name, value in rows:
        print(f"{name:>18}: {value}")


if __name__ == "__main__":
    app.run(main)

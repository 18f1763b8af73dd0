"""Training throughput: compile time, ms/step, tokens/s, FLOPs and MFU.

  python benchmarks/train.py --flagfile=experiments/shakespeare_cpu.cfg
  python benchmarks/train.py --flagfile=experiments/shakespeare.cfg --peak_tflops=989

Model FLOPs per token are 6N + 12*L*C*T with N the non-embedding parameters
(PaLM's accounting, as nanoGPT's MFU); MFU divides the achieved FLOP/s by a
peak that is measured in this run (a large jitted matmul in the run's dtype)
unless --peak_tflops or --accelerator names it. Uses random tokens: no corpus.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from jaxgpt import main as jaxgpt_main  # Defines the model and training flags.
from jaxgpt import model, runtime, train

# Dense peak TFLOP/s per chip from the vendors' data sheets.
KNOWN_PEAKS = {
    "a100-bf16": 312.0,
    "a100-fp32": 19.5,
    "a100-tf32": 156.0,
    "h100-bf16": 989.0,
    "h100-fp32": 67.0,
    "h200-bf16": 989.0,
    "tpu-v2-bf16": 45.0,
    "tpu-v5e-bf16": 197.0,
}

_STEPS = flags.DEFINE_integer("bench_steps", 50, "Timed steps.")
_WARMUP = flags.DEFINE_integer("bench_warmup", 5, "Untimed steps after compiling.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s to compute MFU against.")
_ACCEL = flags.DEFINE_enum(
    "accelerator",
    None,
    sorted(KNOWN_PEAKS),
    "Take the peak from this table instead of measuring it.",
)
_MATMUL_N = flags.DEFINE_integer("peak_matmul_n", 2048, "Size of the peak matmul.")


def measure_peak_flops(dtype, n: int, repeats: int = 10) -> float:
    """FLOP/s of the best of `repeats` n x n x n jitted matmuls in `dtype`."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def main(argv):
    del argv
    runtime.keep_freed_memory()
    train_cfg = jaxgpt_main.train_config()
    model_cfg = jaxgpt_main.model_config(vocab_size=65)
    B, T = train_cfg.batch_size, model_cfg.block_size
    state = train.create_state(model_cfg, train_cfg)
    key = jax.random.PRNGKey(0)
    x = jax.random.randint(key, (B, T), 0, model_cfg.vocab_size)
    y = jnp.roll(x, -1, axis=1)

    t0 = time.perf_counter()
    compiled = train.train_step.lower(state, x, y, key).compile()
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
    if _PEAK.value:
        peak, source = _PEAK.value * 1e12, "given"
    elif _ACCEL.value:
        peak, source = KNOWN_PEAKS[_ACCEL.value] * 1e12, _ACCEL.value
    else:
        dtype = jnp.float32  # The run's compute dtype.
        peak = measure_peak_flops(dtype, _MATMUL_N.value)
        source = f"measured, {_MATMUL_N.value}^3 {jnp.dtype(dtype).name} matmul"
    n_params = model.count_params(state.params)
    rows = [
        ("device", str(jax.devices()[0].device_kind)),
        (
            "model",
            f"L={model_cfg.n_layer} H={model_cfg.n_head} C={model_cfg.n_embd} "
            f"T={T} B={B} ({n_params:,} params)",
        ),
        ("compile (cold)", f"{compile_s:.2f} s"),
        ("ms/step (median)", f"{1e3 * step_s:.2f}"),
        ("tokens/s", f"{tokens_s:,.0f}"),
        (
            "model FLOPs/token",
            f"{flops_token / 1e6:.2f} M (6N + 12LCT, N = non-embedding params)",
        ),
        ("achieved", f"{achieved / 1e9:.1f} GFLOP/s"),
        ("peak", f"{peak / 1e9:.1f} GFLOP/s ({source})"),
        ("MFU", f"{100 * achieved / peak:.1f}%"),
    ]
    for name, value in rows:
        print(f"{name:>18}: {value}")


if __name__ == "__main__":
    app.run(main)

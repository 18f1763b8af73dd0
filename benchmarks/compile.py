"""Cold compile time of the train step: plain blocks vs --scan_layers, by depth.

  python benchmarks/compile.py
  python benchmarks/compile.py --bench_layers=6,12,24 --n_embd=768 --n_head=12

For each depth, with and without scan_layers, times the loop's train step's
lower (tracing to StableHLO) and compile (XLA) for a fresh model, so nothing
is cached. Width, heads and block size come from the model flags (defaults:
the baby GPT, 384 wide, 6 heads, block 256); the batch is small because
compile time hardly depends on it.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from jaxgpt import sharding
from jaxgpt.config import ModelConfig, TrainConfig
from jaxgpt.run import (
    cli,  # Defines the flags.
    program,
)
from jaxgpt.run.perf import cpu_speedups

_LAYERS = flags.DEFINE_list("bench_layers", ["6", "24"], "Depths to compile.")
_BATCH = flags.DEFINE_integer("bench_batch", 4, "Sequences per step.")


def compile_times(model_cfg, batch_size: int) -> tuple[float, float]:
    """Seconds to lower and to compile one train step of `model_cfg`."""
    train_cfg, mesh = TrainConfig(batch_size=batch_size), sharding.make_mesh()
    state = program.abstract_state(model_cfg, train_cfg, mesh)
    x_BT = jax.ShapeDtypeStruct((batch_size, model_cfg.block_size), jnp.int32)
    root = jax.ShapeDtypeStruct((2,), jnp.uint32)
    step = program.make_train_step(model_cfg, train_cfg, mesh)  # The loop's step.
    t0 = time.perf_counter()
    lowered = step.lower(state, x_BT, x_BT, root)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def main(argv):
    del argv
    cpu_speedups()
    base = cli.from_flags(ModelConfig, vocab_size=65)
    print(
        f"train step, C={base.n_embd} H={base.n_head} T={base.block_size}"
        f" B={_BATCH.value}, {base.dtype}; {jax.devices()[0].device_kind}"
    )
    print("| layers | scan_layers | lower (s) | compile (s) | total (s) |")
    print("|-------:|:-----------:|----------:|------------:|----------:|")
    for n_layer in map(int, _LAYERS.value):
        for scan in (False, True):
            cfg = dataclasses.replace(base, n_layer=n_layer, scan_layers=scan)
            lower_s, compile_s = compile_times(cfg, _BATCH.value)
            print(
                f"| {n_layer} | {'yes' if scan else 'no'} | {lower_s:.2f} |"
                f" {compile_s:.2f} | {lower_s + compile_s:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)

"""GPT-2 124M's train step on this machine: compile time, ms/step, peak memory.

  python benchmarks/gpt2_step.py            # B=1, T=1024, float32
  python benchmarks/gpt2_step.py --remat    # each block recomputed in backward

One configuration per process, since peak RSS only grows. Calls
train.create_state (params + AdamW state, no mesh) and train.train_step (the
jitted update, state donated), as main.py's single-device path does, with
runtime.keep_freed_memory applied first as main.py does. Random tokens, random
initial weights: the numbers do not depend on them.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import jax

from jaxgpt import model, runtime, train
from jaxgpt.config import ModelConfig, TrainConfig


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="Timed steps.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps.")
    args = parser.parse_args()
    runtime.keep_freed_memory()

    cfg = ModelConfig(
        vocab_size=50257,
        block_size=1024,
        n_layer=12,
        n_head=12,
        n_embd=768,
        dropout=0.0,
        bias=True,
        model="gpt",
        scan_layers=False,
        remat=args.remat,
    )
    state = train.create_state(cfg, TrainConfig(batch_size=args.batch_size))
    B, T = args.batch_size, cfg.block_size
    key = jax.random.PRNGKey(0)
    x_BT = jax.random.randint(jax.random.fold_in(key, 1), (B, T), 0, cfg.vocab_size)
    y_BT = jax.random.randint(jax.random.fold_in(key, 2), (B, T), 0, cfg.vocab_size)
    rss_state = peak_rss_gib()

    t0 = time.perf_counter()
    step = train.train_step.lower(state, x_BT, y_BT, key).compile()
    compile_s = time.perf_counter() - t0
    for i in range(args.warmup):
        state, metrics = step(state, x_BT, y_BT, jax.random.fold_in(key, i))
    jax.block_until_ready(metrics)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = step(state, x_BT, y_BT, jax.random.fold_in(key, 100 + i))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)

    ms = 1000 * statistics.median(times)
    print(
        f"GPT-2 124M ({model.count_params(state.params):,} params) B={B} T={T}"
        f" remat={args.remat} on {jax.devices()[0].device_kind}: compile"
        f" {compile_s:.1f} s, {ms:,.0f} ms/step (median of {args.steps},"
        f" min {1000 * min(times):,.0f}), {B * T / ms * 1000:,.0f} tokens/s,"
        f" peak RSS {peak_rss_gib():.2f} GiB (state alone {rss_state:.2f} GiB),"
        f" loss {float(metrics['loss']):.3f}"
    )


if __name__ == "__main__":
    main()

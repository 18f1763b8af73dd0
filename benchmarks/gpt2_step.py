"""GPT-2 124M's train step on this machine: compile time, ms/step, peak memory.

  python benchmarks/gpt2_step.py            # B=1, T=1024, float32
  python benchmarks/gpt2_step.py --remat    # each block recomputed in backward

One configuration per process, since peak RSS only grows. Runs the training
loop's own program: train.create_state (params + AdamW state) and
train.make_train_step (the compiled update, state donated) on the default
mesh, with perf.keep_freed_memory applied first as main.py does. Random
tokens, random initial weights: the numbers do not depend on them.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import jax
import numpy as np

from jaxgpt import model, sharding, train
from jaxgpt.config import ModelConfig, TrainConfig
from jaxgpt.perf import keep_freed_memory


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="Timed steps.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps.")
    args = parser.parse_args()
    keep_freed_memory()

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
    train_cfg, mesh = TrainConfig(batch_size=args.batch_size), sharding.make_mesh()
    root = train.root_key(0)
    state = train.create_state(cfg, train_cfg, root, mesh)
    B, T = args.batch_size, cfg.block_size
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 100 * T)
    batches = train.make_batches(tokens.astype(np.int32), root, B, T, mesh)
    rss_state = peak_rss_gib()

    t0 = time.perf_counter()
    step = train.make_train_step(cfg, train_cfg, mesh)
    compiled = step.lower(state, *batches(0), root).compile()
    compile_s = time.perf_counter() - t0
    for i in range(args.warmup):
        state, metrics = compiled(state, *batches(i), root)
    jax.block_until_ready(metrics)
    times = []
    for i in range(args.warmup, args.warmup + args.steps):
        t0 = time.perf_counter()  # A step as the loop runs it: its batch included.
        state, metrics = compiled(state, *batches(i), root)
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

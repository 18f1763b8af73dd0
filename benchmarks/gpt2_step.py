"""GPT-2 124M's train step on this machine: compile time, ms/step, MFU, peak memory.

  python benchmarks/gpt2_step.py            # B=1, T=1024, float32
  python benchmarks/gpt2_step.py --remat    # each block recomputed in backward
  python benchmarks/gpt2_step.py --dtype=bfloat16 --attention=cudnn --batch_size=auto

One configuration per process, since peak RSS only grows. Runs the training
loop's own program: program.create_state (params + AdamW state) and
program.make_train_step (the compiled update, state donated) on the default
mesh, with perf.cpu_speedups applied first as main.py does. Random tokens,
random initial weights: the numbers do not depend on them.

--batch_size=auto takes the largest batch that fits the device's memory: two
small batches are compiled and XLA's memory analysis of each gives the
memory per sequence (their difference) and the fixed rest; the batch that
fills --memory_fraction of what is free is compiled next, and a smaller one
if the device still runs out. MFU divides the model's FLOPs (6N + 12LCT per
token) by the data sheet's peak for a known device (jaxgpt/run/perf.py), else by
a measured matmul's.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import jax
import numpy as np

from jaxgpt import model, sharding, train
from jaxgpt.config import ModelConfig, TrainConfig
from jaxgpt.run import perf, program
from jaxgpt.run.perf import cpu_speedups


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def free_bytes() -> tuple[float, str]:
    """Memory the step may still take: the device's (its allocator's limit less
    what is in use), or on a CPU the host's available memory."""
    stats = jax.devices()[0].memory_stats()
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0), "device"
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host"


def step_bytes(compiled) -> float:
    """What a compiled step allocates beyond its (donated) inputs."""
    m = compiled.memory_analysis()
    return m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


def out_of_memory(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--scan_layers", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--attention", default="einsum", choices=["einsum", "dot_product", "cudnn"]
    )
    parser.add_argument("--batch_size", default="1", help="Rows per step, or auto.")
    parser.add_argument("--memory_fraction", type=float, default=0.9)
    parser.add_argument("--max_batch", type=int, default=512, help="auto's ceiling.")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps.")
    parser.add_argument("--peak_tflops", type=float, default=None)
    parser.add_argument("--peak_matmul_n", type=int, default=2048)
    # GPT-2 124M by default; smaller shapes check the script quickly.
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_head", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--vocab_size", type=int, default=50257)
    args = parser.parse_args()
    cpu_speedups()
    peak, peak_source = perf.peak_flops(
        args.dtype, args.peak_tflops, args.peak_matmul_n
    )

    cfg = ModelConfig(
        vocab_size=args.vocab_size,
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        dropout=0.0,
        bias=True,
        model="gpt",
        dtype=args.dtype,
        attention=args.attention,
        scan_layers=args.scan_layers,
        remat=args.remat,
    )
    mesh, root, T = sharding.make_mesh(), train.root_key(0), cfg.block_size
    new_state = lambda: program.create_state(cfg, TrainConfig(batch_size=1), root, mesh)
    state = new_state()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 100 * T)
    tokens = tokens.astype(np.int32)
    rss_state = peak_rss_gib()

    compiled_at = {}  # A probe's program serves again if its batch is chosen.

    def compile_at(B: int):
        """(the compiled step for B rows, its batches, seconds it took to compile)."""
        if B not in compiled_at:
            t0 = time.perf_counter()
            batches = program.make_batches(tokens, root, B, T, mesh)
            step = program.make_train_step(cfg, TrainConfig(batch_size=B), mesh)
            compiled = step.lower(state, *batches(0), root).compile()
            compiled_at[B] = compiled, batches, time.perf_counter() - t0
        return compiled_at[B]

    how = ""
    if args.batch_size == "auto":
        free, where = free_bytes()
        # Probes: what one more sequence costs, and the rest.
        lo, hi = (8, 16) if args.max_batch >= 16 else (1, max(2, args.max_batch))
        a, b = (step_bytes(compile_at(n)[0]) for n in (lo, hi))
        per_row = max((b - a) / (hi - lo), 1.0)
        fixed = max(a - lo * per_row, 0.0)
        fits = int((args.memory_fraction * free - fixed) // per_row)
        B = max(1, min(args.max_batch, fits))
        B = B - B % 8 if B >= 8 else B
        how = (
            f" (auto: {per_row / 2**20:,.4g} MiB per sequence + {fixed / 2**30:.2f}"
            f" GiB, {args.memory_fraction:.0%} of {free / 2**30:.1f} GiB {where}"
            f" memory free)"
        )
    else:
        B = int(args.batch_size)

    while True:
        try:
            compiled, batches, compile_s = compile_at(B)
            compiled_at.clear()  # The probes' programs are no longer needed.
            for i in range(args.warmup):
                state, metrics = compiled(state, *batches(i), root)
            jax.block_until_ready(metrics)
            break
        except Exception as e:  # jax.errors.JaxRuntimeError, by version.
            if args.batch_size != "auto" or not out_of_memory(e) or B == 1:
                raise
            B = max(1, (B * 3 // 4) - (B * 3 // 4) % 8)
            how += f"; out of memory, then B={B}"
            state = new_state()  # The failed step may have taken the donated one.
    times = []
    for i in range(args.warmup, args.warmup + args.steps):
        t0 = time.perf_counter()  # A step as the loop runs it: its batch included.
        state, metrics = compiled(state, *batches(i), root)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)

    ms = 1000 * statistics.median(times)
    tokens_s = B * T / ms * 1000
    mfu = perf.mfu(perf.flops_per_token(cfg), tokens_s, peak)
    gpt2 = (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size) == (12, 12, 768, 50257)
    name = "GPT-2 124M" if gpt2 else f"GPT L={cfg.n_layer} C={cfg.n_embd}"
    print(
        f"{name} ({model.count_params(state.params):,} params) B={B} T={T}"
        f" remat={args.remat} {args.dtype} {args.attention} on"
        f" {jax.devices()[0].device_kind}{how}: compile {compile_s:.1f} s,"
        f" {ms:,.1f} ms/step (median of {args.steps}, min"
        f" {1000 * min(times):,.1f}), {tokens_s:,.0f} tokens/s, MFU {100 * mfu:.1f}%"
        f" of {peak / 1e12:,.4g} TFLOP/s ({peak_source}), peak RSS"
        f" {peak_rss_gib():.2f} GiB (state alone {rss_state:.2f} GiB),"
        f" loss {float(metrics['loss']):.3f}"
    )


if __name__ == "__main__":
    main()

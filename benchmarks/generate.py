"""Generation speed: tokens/s with and without the KV cache.

  python benchmarks/generate.py                              # baby GPT, random init
  python benchmarks/generate.py --workdir=out/shakespeare    # a trained checkpoint
  python benchmarks/generate.py --dtype=bfloat16                # the baby GPT in bf16

The model comes from the model flags (their defaults are shakespeare.cfg's baby
GPT: 6 layers, 6 heads, 384 wide, block 256) with vocabulary 65 and random
parameters, or from the checkpoint in --workdir when that flag is given. Each
row compiles generate() for a one-token prompt (lower + compile, timed on its
own), then times one run of the compiled program. Sampling uses --temperature,
--top_k and --top_p as --mode=sample does.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from absl import app, flags

from jaxgpt import generate, lecture, model, sharding
from jaxgpt.config import ModelConfig
from jaxgpt.run import checkpoint as ckpt
from jaxgpt.run import (
    cli,  # Defines the flags.
    program,
)
from jaxgpt.run.configs import SampleConfig
from jaxgpt.run.perf import cpu_speedups

_BATCHES = flags.DEFINE_list("bench_batch_sizes", ["1", "8"], "Rows sampled at once.")
_NEW = flags.DEFINE_integer("bench_new_tokens", 500, "Tokens generated per row.")


def load_model():
    """(model config, params): the checkpoint in --workdir if given, else random."""
    if not flags.FLAGS["workdir"].present:
        cfg = cli.from_flags(ModelConfig, vocab_size=65)
        return cfg, lecture.init_params(cfg, jax.random.PRNGKey(0))
    with ckpt.Checkpointer(flags.FLAGS.workdir) as checkpointer:
        cfg = ModelConfig(**checkpointer.read_meta()["model"])
        target = program.abstract_params(cfg, sharding.make_mesh())
        return cfg, checkpointer.restore_params(target)


def main(argv):
    del argv
    cpu_speedups()
    cfg, params = load_model()
    sampling = cli.from_flags(SampleConfig)
    apply_fn = lecture.make_model(cfg).apply
    N, key = _NEW.value, jax.random.PRNGKey(0)
    print(
        f"model: L={cfg.n_layer} H={cfg.n_head} C={cfg.n_embd} T={cfg.block_size}"
        f" V={cfg.vocab_size} ({model.count_params(params):,} params), {cfg.dtype};"
        f" {N} new tokens from a 1-token prompt; {jax.devices()[0].device_kind}"
    )
    print("| batch | KV cache | compile (s) | run (s) | tokens/s | speed-up |")
    print("|------:|:--------:|------------:|--------:|---------:|---------:|")
    # (label, kv_cache, rolling): a rotary model's cache rolls on when full
    # (as sampling does); re-encoding, the policy of learned positions, beside it.
    policies = [("yes", True, False), ("no", False, False)]
    if cfg.position == "rope":
        policies = [
            ("rolling", True, True),
            ("re-encoding", True, False),
            *policies[1:],
        ]
    for B in map(int, _BATCHES.value):
        prompt_BP = jnp.zeros((B, 1), jnp.int32)
        rows = {}
        for label, kv_cache, rolling in policies:
            t0 = time.perf_counter()
            compiled = generate.generate.lower(
                apply_fn,
                params,
                prompt_BP,
                key,
                block_size=cfg.block_size,
                max_new_tokens=N,
                temperature=float(sampling.temperature),
                top_k=sampling.top_k or None,
                top_p=sampling.top_p if sampling.top_p < 1.0 else None,
                kv_cache=kv_cache,
                rolling=rolling,
            ).compile()
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            compiled(params, prompt_BP, key).block_until_ready()
            rows[label] = (compile_s, time.perf_counter() - t0)
        for label, (compile_s, run_s) in rows.items():
            speedup = rows["no"][1] / run_s  # Against recomputing the window.
            print(
                f"| {B} | {label} | {compile_s:.2f} |"
                f" {run_s:.2f} | {B * N / run_s:,.0f} | {speedup:.1f}x |",
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)

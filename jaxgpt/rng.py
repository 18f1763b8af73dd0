"""Random bits for dropout masks: `jax.random.bits`, bit for bit, but fused.

JAX's default generator is the Threefry-2x32 hash of (key, counter). On a CPU,
JAX lowers that hash to a rolled while-loop of 5 steps, and each step writes
the whole counter-sized state to memory; for the baby GPT's 25M-element
attention masks that made dropout cost more than the attention matmuls. Here
the same hash is written out with its 20 rounds unrolled, which XLA fuses into
one elementwise loop (8x faster measured, see benchmarks/README.md).
tests/test_rng.py checks it against `jax.random.bits` for several keys and shapes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))  # Threefry-2x32's rotation constants.


def threefry2x32(k1, k2, x1, x2):
    """The Threefry-2x32 block cipher (20 rounds) of counters (x1, x2) under key (k1, k2)."""
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):  # 5 groups of 4 rounds, each followed by a key injection.
        for r in ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = (x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r))
            x2 = x1 ^ x2
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def _uses_threefry(key: jax.Array) -> bool:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return "threefry" in str(jax.random.key_impl(key))
    return key.shape == (2,) and "threefry" in jax.config.jax_default_prng_impl


def bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 random bits of `shape`: equal to jax.random.bits(key, shape).

    Falls back to jax.random.bits itself where the two would differ: another
    generator than threefry, or jax_threefry_partitionable switched off.
    """
    n = math.prod(shape)
    if not (
        _uses_threefry(key) and jax.config.jax_threefry_partitionable and n < 2**32
    ):
        return jax.random.bits(key, shape, jnp.uint32)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    counter = jax.lax.iota(jnp.uint32, n).reshape(shape)  # The element's index.
    b1, b2 = threefry2x32(key[0], key[1], jnp.zeros_like(counter), counter)
    return b1 ^ b2


def dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout: zero each element with probability `rate`, scale the rest up."""
    threshold = np.uint32(round(rate * 2**32))  # P(bits < threshold) = rate.
    keep = bits(key, x.shape) >= threshold
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))

"""What makes XLA fast on a CPU, kept out of the model's way. Each piece does
the same math as the plain JAX/Flax it replaces; figures are ms/step before ->
after, measured with benchmarks/train.py on a 2-core AMD EPYC (benchmarks/README.md):

- keep_freed_memory: glibc keeps XLA's freed buffers instead of returning them
  to the kernel, so steps stop page-faulting (CPU recipe 41 -> 29 ms/step).
- Dense: nn.Dense on 2-D rows; on 3-D input XLA:CPU transposes the MLP's
  weight gradient in a strided copy (CPU recipe 30 -> 21 ms/step).
- Dropout: masks from Threefry written out unrolled, which XLA fuses; JAX's own
  lowering is a rolled loop through memory (baby GPT 6.18 -> 4.63 s/step).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# --- The allocator -----------------------------------------------------------

# mallopt(3) parameter numbers from glibc's malloc.h.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8


def keep_freed_memory() -> bool:
    """Tells glibc malloc to reuse freed memory instead of returning it to the OS.

    One arena (so XLA's threads share the reuse), no mmap'd allocations, and no
    trimming of the heap. Call before XLA allocates. A no-op (False) off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = {
        M_ARENA_MAX: 1,
        M_MMAP_MAX: 0,
        M_TRIM_THRESHOLD: -1,  # glibc reads -1 as SIZE_MAX: never trim.
        M_TOP_PAD: 256 * 2**20,
    }
    return all(mallopt(param, value) == 1 for param, value in settings.items())


# --- Dense on rows -----------------------------------------------------------


class Dense(nn.Dense):
    """nn.Dense on the rows of x_...C: one 2-D [N, C] matmul, N = all leading axes.

    The same parameters and math as nn.Dense (a free reshape around it).
    """

    def __call__(self, x_NC: jax.Array) -> jax.Array:
        *lead, C = x_NC.shape
        return super().__call__(x_NC.reshape(-1, C)).reshape(*lead, self.features)


# --- Dropout from fused random bits ------------------------------------------

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


def fold_in(key: jax.Array, i) -> jax.Array:
    """jax.random.fold_in(key, i) for a raw Threefry key (uint32[2]) and a 32-bit
    `i`, hashed by the unrolled cipher: JAX's CPU lowering is a loop of 5 steps,
    whose per-step overhead dominates a small sampling step."""
    if not (_uses_threefry(key) and key.dtype == jnp.uint32):
        return jax.random.fold_in(key, i)
    i = jnp.asarray(i).astype(jnp.uint32)  # fold_in's seed: [i >> 32, i] = [0, i].
    y1, y2 = threefry2x32(key[0], key[1], jnp.zeros_like(i), i)
    return jnp.stack([y1, y2])


def categorical(key: jax.Array, logits_BV: jax.Array) -> jax.Array:
    """jax.random.categorical(key, logits_BV, axis=-1) for float32 logits:
    the argmax of logits plus Gumbel noise, drawn from `bits` (fused)."""
    if logits_BV.dtype != jnp.float32:
        return jax.random.categorical(key, logits_BV, axis=-1)
    tiny = np.float32(np.finfo(np.float32).tiny)
    mantissa = bits(key, logits_BV.shape) >> np.uint32(32 - 23)  # As jax.random.
    one_to_two = jax.lax.bitcast_convert_type(
        mantissa | np.float32(1.0).view(np.uint32), jnp.float32
    )
    u = jnp.maximum(tiny, (one_to_two - np.float32(1.0)) * (1 - tiny) + tiny)
    return jnp.argmax(logits_BV - jnp.log(-jnp.log(u)), axis=-1)


def dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout: zero each element with probability `rate`, scale the rest up."""
    threshold = np.uint32(round(rate * 2**32))  # P(bits < threshold) = rate.
    keep = bits(key, x.shape) >= threshold
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class Dropout(nn.Module):
    """nn.Dropout's semantics, with masks from `bits` (fused Threefry)."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        return dropout(self.make_rng("dropout"), x, self.rate)

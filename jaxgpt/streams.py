"""Every random stream of a run, derived from one root key by one rule.

    root           = PRNGKey(seed)
    stream(name)   = fold_in(root, TAGS[name])       one key per stream
    key(name, i)   = fold_in(stream(name), i)         draw i of the stream

The streams and what their index i counts:

    params    the initial parameters (the stream key itself; no index)
    batch     training batches: i is the step
    dropout   dropout masks: i is the step (inside the compiled step)
    eval      evaluation batches: i is the batch's number (fixed for the run)
    sample    generated text: i is the token's position

fold_in is a hash of (key, i), and each stream hangs off the root under its
own tag, so two streams never share a key, whatever the seed and the index
(tests/test_streams.py checks this over ranges of both). Batches are read on
the host from token files, so the batch and eval streams give numpy
generators, seeded with the stream's key and the index.
"""

from __future__ import annotations

import jax
import numpy as np

TAGS = {"params": 1, "batch": 2, "dropout": 3, "eval": 4, "sample": 5}


def root(seed: int) -> jax.Array:
    """The run's root key: the only place the seed enters."""
    return jax.random.PRNGKey(seed)


def stream(root_key: jax.Array, name: str) -> jax.Array:
    """The key of the stream `name` (one of TAGS)."""
    return jax.random.fold_in(root_key, TAGS[name])


def key(root_key: jax.Array, name: str, i) -> jax.Array:
    """Draw `i` of stream `name`; `i` may be traced (e.g. the step inside jit)."""
    return jax.random.fold_in(stream(root_key, name), i)


def host_rng(stream_key, i: int) -> np.random.Generator:
    """numpy's generator for draw `i` of a stream, from the stream's key (no JAX work)."""
    words = np.asarray(stream_key, dtype=np.uint32).tolist()
    return np.random.default_rng([*words, i])

"""Every random stream hangs off one root, and no two of them ever share a key."""

import itertools

import jax
import numpy as np

from jaxgpt import train

SEEDS, INDICES = range(4), range(64)


def all_keys(seed: int) -> dict[tuple, tuple[int, int]]:
    """Every key a run with `seed` uses for draws 0..63, by (stream, index)."""
    root = train.root_key(seed)
    keys = {("params",): train.stream(root, "params")}
    for name in ("batch", "dropout", "eval", "sample"):
        for i in INDICES:
            keys[(name, i)] = train.stream_key(root, name, i)
    return {k: tuple(np.asarray(v).tolist()) for k, v in keys.items()}


def test_streams_never_share_a_key_over_seeds_and_indices():
    seen = {}
    for seed in SEEDS:
        for what, key in all_keys(seed).items():
            assert key not in seen, f"{(seed, *what)} collides with {seen[key]}"
            seen[key] = (seed, *what)
    assert len(seen) == len(SEEDS) * (1 + 4 * len(INDICES))


def test_the_old_collisions_are_gone():
    """fold_in(root, 0) was both the init key and step 0's batch key; likewise
    dropout's root and step 2's batch, the eval root and step 3's batch."""
    root = train.root_key(1337)
    batch_keys = {
        tuple(np.asarray(train.stream_key(root, "batch", s))) for s in range(4)
    }
    for name in ("params", "dropout", "eval", "sample"):
        assert tuple(np.asarray(train.stream(root, name))) not in batch_keys


def test_keys_are_fold_in_of_the_stream_at_the_index():
    root = train.root_key(3)
    stream = train.stream(root, "dropout")
    np.testing.assert_array_equal(
        stream, jax.random.fold_in(root, train.TAGS["dropout"])
    )
    got = jax.jit(lambda step: train.stream_key(root, "dropout", step))(
        41
    )  # Traced index.
    np.testing.assert_array_equal(got, jax.random.fold_in(stream, 41))


def test_host_generators_are_pure_and_distinct():
    root = train.root_key(7)
    draws = {}
    for name, i in itertools.product(("batch", "eval"), range(32)):
        stream = np.asarray(train.stream(root, name))
        first = train.host_rng(stream, i).integers(0, 2**62, size=4)
        again = train.host_rng(stream, i).integers(0, 2**62, size=4)
        np.testing.assert_array_equal(first, again)  # A function of (seed, i) only.
        draws[(name, i)] = tuple(first.tolist())
    assert len(set(draws.values())) == len(draws)  # No two draws alike.

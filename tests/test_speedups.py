import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import model, speedups
from jaxgpt.config import ModelConfig

KEYS = [
    jax.random.PRNGKey(0),
    jax.random.PRNGKey(2**31 + 12345),
    jax.random.fold_in(jax.random.PRNGKey(3), 99),
    jax.random.key(7),  # A typed key.
]


@pytest.mark.parametrize("shape", [(1,), (5,), (3, 7), (2, 3, 5, 4), (64, 6, 16, 16)])
@pytest.mark.parametrize("key", KEYS, ids=["k0", "k_big", "folded", "typed"])
def test_bits_equal_jax_random_bits(key, shape):
    """The unrolled Threefry hash is JAX's own generator, bit for bit."""
    fast = jax.jit(speedups.bits, static_argnums=1)(key, shape)
    np.testing.assert_array_equal(fast, jax.random.bits(key, shape, jnp.uint32))


def test_other_generators_fall_back_to_jax():
    key = jax.random.key(0, impl="rbg")
    np.testing.assert_array_equal(
        speedups.bits(key, (4, 5)), jax.random.bits(key, (4, 5), jnp.uint32)
    )


def test_unrolled_lowering_has_no_loop():
    """The point of the module: the hash compiles to straight-line code."""
    hlo = jax.jit(speedups.bits, static_argnums=1).lower(KEYS[0], (64, 64)).as_text()
    assert "while" not in hlo
    if jax.default_backend() == "cpu":  # Elsewhere JAX unrolls it too.
        rolled = jax.jit(lambda k: jax.random.bits(k, (64, 64), jnp.uint32))
        assert "while" in rolled.lower(KEYS[0]).as_text(), (
            "speedups.bits may be moot now"
        )


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.5])
def test_dropout_statistics(rate):
    x = jnp.full((200, 500), 3.0)
    y = np.asarray(speedups.dropout(jax.random.PRNGKey(1), x, rate))
    dropped = (y == 0).mean()
    n = y.size
    assert abs(dropped - rate) < 5 * np.sqrt(rate * (1 - rate) / n)  # 5 sigma.
    np.testing.assert_allclose(y[y != 0], 3.0 / (1 - rate), rtol=1e-6)
    # Different keys give different masks; the same key the same one.
    z = np.asarray(speedups.dropout(jax.random.PRNGKey(2), x, rate))
    assert (z != y).any()
    np.testing.assert_array_equal(y, speedups.dropout(jax.random.PRNGKey(1), x, rate))


def test_dropout_module_is_identity_when_deterministic_or_rate_zero():
    x = jnp.arange(12.0).reshape(3, 4)
    drop = speedups.Dropout(0.5)
    np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)
    np.testing.assert_array_equal(
        speedups.Dropout(0.0).apply(
            {}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)}
        ),
        x,
    )
    y = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    assert ((y == 0) | (y == 2 * x)).all() and (y == 0).any()


def test_dense_on_rows_equals_flax_dense():
    """speedups.Dense (via model.dense) flattens the leading axes: same parameters, same outputs."""
    import flax.linen as nn

    cfg = ModelConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=8, block_size=4)
    layer = model.dense(cfg, 5, nn.initializers.normal(1.0), "d")
    x_BTC = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8))
    params = layer.init(jax.random.PRNGKey(1), x_BTC)
    ref = nn.Dense(5, use_bias=cfg.bias).apply(params, x_BTC)
    np.testing.assert_allclose(layer.apply(params, x_BTC), ref, rtol=1e-6, atol=1e-6)


def test_allocator_settings_apply_on_linux():
    assert speedups.keep_freed_memory() == sys.platform.startswith("linux")

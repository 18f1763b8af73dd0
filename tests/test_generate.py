import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import generate, model
from jaxgpt.config import ModelConfig, SampleConfig

CFG = ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def params():
    return model.init_params(CFG, jax.random.PRNGKey(0))


def naive_greedy(params, prompt, n):
    """Greedy decoding by re-running the model on the cropped context each step."""
    apply = model.make_model(CFG).apply
    ids = list(prompt)
    for _ in range(n):
        context = jnp.asarray(ids[-CFG.block_size :])[None]
        ids.append(int(jnp.argmax(apply({"params": params}, context)[0, -1])))
    return ids


@pytest.mark.parametrize("prompt_len,new", [(1, 5), (3, 20), (12, 6)])
def test_greedy_matches_step_by_step_decoding(params, prompt_len, new):
    """Covers prompts shorter and longer than block_size and sliding past it."""
    prompt = list(np.arange(prompt_len) % CFG.vocab_size)
    out = generate.generate(
        model.make_model(CFG).apply,
        params,
        jnp.asarray([prompt]),
        jax.random.PRNGKey(0),
        block_size=CFG.block_size,
        max_new_tokens=new,
        temperature=0.0,
    )
    chex.assert_shape(out, (1, prompt_len + new))
    assert out[0].tolist() == naive_greedy(params, prompt, new)


def test_top_k_one_is_greedy(params):
    apply = model.make_model(CFG).apply
    prompt = jnp.asarray([[1, 2, 3]])
    kw = dict(block_size=CFG.block_size, max_new_tokens=10)
    greedy = generate.generate(
        apply, params, prompt, jax.random.PRNGKey(0), temperature=0.0, **kw
    )
    top1 = generate.generate(
        apply, params, prompt, jax.random.PRNGKey(5), temperature=1.5, top_k=1, **kw
    )
    chex.assert_trees_all_equal(greedy, top1)


def test_top_k_only_draws_from_the_k_likeliest():
    logits = jnp.tile(jnp.arange(10.0)[None], (2000, 1))
    draws = generate.sample_logits(jax.random.PRNGKey(0), logits, 1.0, 3)
    assert set(np.asarray(draws).tolist()) == {7, 8, 9}


def test_temperature_sharpens_the_distribution():
    logits = jnp.tile(jnp.log(jnp.array([0.5, 0.3, 0.2]))[None], (20000, 1))
    for temp, expected in [(1.0, [0.5, 0.3, 0.2]), (0.5, [25 / 38, 9 / 38, 4 / 38])]:
        draws = generate.sample_logits(jax.random.PRNGKey(1), logits, temp, None)
        freq = np.bincount(np.asarray(draws), minlength=3) / 20000
        np.testing.assert_allclose(freq, expected, atol=0.015)


def test_sample_shapes_seed_and_single_compilation(params):
    apply = model.make_model(CFG).apply
    cfg = SampleConfig(prompt="x", max_new_tokens=30, num_samples=4, seed=3)
    before = generate.generate._cache_size()
    a = generate.sample(apply, params, CFG, [4, 5], cfg)
    assert generate.generate._cache_size() == before + 1  # One program for 30 tokens.
    b = generate.sample(apply, params, CFG, [4, 5], cfg)
    assert generate.generate._cache_size() == before + 1  # Reused, not recompiled.
    chex.assert_shape(a, (4, 32))
    chex.assert_trees_all_equal(a, b)  # Same seed, same samples.
    assert len({tuple(row) for row in np.asarray(a).tolist()}) > 1  # Rows differ.
    assert (a[:, :2] == jnp.array([4, 5])).all() and int(a.max()) < CFG.vocab_size

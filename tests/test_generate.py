import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import generate, lecture
from jaxgpt.config import ConfigError, ModelConfig
from jaxgpt.hub import hf
from jaxgpt.run.configs import SampleConfig

CFG = ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def params():
    return lecture.init_params(CFG, jax.random.PRNGKey(0))


def naive_greedy(params, prompt, n):
    """Greedy decoding by re-running the model on the cropped context each step."""
    apply = jax.jit(lecture.make_model(CFG).apply)  # One program per context length.
    ids = list(prompt)
    for _ in range(n):
        context = jnp.asarray(ids[-CFG.block_size :])[None]
        ids.append(int(jnp.argmax(apply({"params": params}, context)[0, -1])))
    return ids


@pytest.mark.parametrize(
    "prompt_len,new,kv_cache",
    [(1, 5, False), (3, 20, False), (12, 6, False), (2, 6, True)],
)
def test_greedy_matches_step_by_step_decoding(params, prompt_len, new, kv_cache):
    """Covers prompts shorter and longer than block_size and sliding past it.

    The cache agrees with nanoGPT's per-step crop up to block_size tokens in
    all; past that its policy differs (see test_cache_follows_its_policy...).
    """
    prompt = list(np.arange(prompt_len) % CFG.vocab_size)
    out = generate.generate(
        lecture.make_model(CFG).apply,
        params,
        jnp.asarray([prompt]),
        jax.random.PRNGKey(0),
        block_size=CFG.block_size,
        max_new_tokens=new,
        temperature=0.0,
        kv_cache=kv_cache,
    )
    chex.assert_shape(out, (1, prompt_len + new))
    assert out[0].tolist() == naive_greedy(params, prompt, new)


def test_top_k_one_is_greedy(params):
    apply = lecture.make_model(CFG).apply
    prompt = jnp.asarray([[1, 2, 3]])
    kw = {"block_size": CFG.block_size, "max_new_tokens": 10}
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
    apply = lecture.make_model(CFG).apply
    cfg = SampleConfig(prompt="x", max_new_tokens=30, num_samples=4)
    key = jax.random.PRNGKey(3)
    before = generate.generate._cache_size()
    a = generate.sample(apply, params, CFG, [4, 5], key, **cfg.options())
    assert generate.generate._cache_size() == before + 1  # One program for 30 tokens.
    b = generate.sample(apply, params, CFG, [4, 5], key, **cfg.options())
    assert generate.generate._cache_size() == before + 1  # Reused, not recompiled.
    chex.assert_shape(a, (4, 32))
    chex.assert_trees_all_equal(a, b)  # Same seed, same samples.
    assert len({tuple(row) for row in np.asarray(a).tolist()}) > 1  # Rows differ.
    assert (a[:, :2] == jnp.array([4, 5])).all() and int(a.max()) < CFG.vocab_size


# KV cache ---------------------------------------------------------------------

CFG2 = ModelConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def params2():
    return lecture.init_params(CFG2, jax.random.PRNGKey(1))


def run(params, prompt_BP, new, cfg=CFG2, **kw):
    """generate() on cfg's model, returning (tokens, logits)."""
    return generate.generate(
        lecture.make_model(cfg).apply,
        params,
        jnp.asarray(prompt_BP),
        jax.random.PRNGKey(7),
        block_size=cfg.block_size,
        max_new_tokens=new,
        return_logits=True,
        **kw,
    )


def policy_reference(params, prompt_BP, new, cfg=CFG2):
    """The cache's policy, naively: a full forward pass over the context it implies.

    The context starts as the prompt's last block_size tokens and grows by one
    token per step; when it holds block_size tokens, the next one keeps only
    the last block_size // 2 (new token included). Greedy decoding. (Contexts
    are zero-padded to block_size so one compiled forward serves them all; the
    padding comes after the last position read, so causality hides it.)
    """
    forward = jax.jit(lecture.make_model(cfg).apply)
    S, K = cfg.block_size, cfg.block_size // 2
    ids_BS = np.asarray(prompt_BP)
    context_BT = ids_BS[:, -S:]
    all_logits = []
    for _ in range(new):
        T = context_BT.shape[1]
        padded_BS = np.pad(context_BT, ((0, 0), (0, S - T)))
        logits_BV = np.asarray(forward({"params": params}, padded_BS))[:, T - 1]
        next_B1 = logits_BV.argmax(-1)[:, None]
        all_logits.append(logits_BV)
        ids_BS = np.concatenate([ids_BS, next_B1], axis=1)
        context_BT = np.concatenate([context_BT, next_B1], axis=1)
        if context_BT.shape[1] > S:
            context_BT = context_BT[:, -K:]
    return ids_BS, np.stack(all_logits, axis=1)


PROMPTS_B3 = [[1, 2, 3], [4, 4, 4], [10, 0, 5]]


@pytest.mark.parametrize(
    "prompt_len,new,sampling",
    [
        (1, 7, {"temperature": 0.0}),
        (3, 5, {"temperature": 1.0, "top_k": 6, "top_p": 0.8}),
    ],
    ids=["greedy", "sampled"],
)
def test_cache_matches_recomputing_within_block_size(
    params2, prompt_len, new, sampling
):
    """Up to block_size tokens, the cache changes nothing: same logits, same tokens."""
    prompt_BP = [row[:prompt_len] for row in PROMPTS_B3]
    with_cache, logits_a = run(params2, prompt_BP, new, kv_cache=True, **sampling)
    without, logits_b = run(params2, prompt_BP, new, kv_cache=False, **sampling)
    chex.assert_shape(logits_a, (3, new, CFG2.vocab_size))
    np.testing.assert_allclose(logits_a, logits_b, atol=2e-5)
    chex.assert_trees_all_equal(with_cache, without)
    if sampling["temperature"]:  # The sampled rows really are random draws.
        assert len({tuple(r) for r in np.asarray(with_cache)[:, prompt_len:]}) > 1


@pytest.mark.parametrize("prompt_len", [3, 12], ids=["short", "longer_than_block"])
def test_cache_follows_its_policy_beyond_block_size(params2, prompt_len):
    """Past block_size: re-encode the last block_size // 2 tokens when full.

    20 new tokens with block_size 8 refill the cache several times; every
    step's logits must equal a full forward pass over the policy's context.
    """
    prompt_BP = [[(3 * b + 5 * i) % 11 for i in range(prompt_len)] for b in range(2)]
    tokens, logits = run(params2, prompt_BP, 20, kv_cache=True, temperature=0.0)
    ref_tokens, ref_logits = policy_reference(params2, prompt_BP, 20)
    np.testing.assert_allclose(logits, ref_logits, atol=2e-5)
    np.testing.assert_array_equal(tokens, ref_tokens)


def test_prompt_longer_than_block_size_first_token_agrees(params2):
    """Both paths crop a long prompt to its last block_size tokens for token P."""
    prompt_BP = [list(range(11)) + [3, 1]]
    a, logits_a = run(params2, prompt_BP, 1, kv_cache=True, temperature=0.0)
    b, logits_b = run(params2, prompt_BP, 1, kv_cache=False, temperature=0.0)
    np.testing.assert_allclose(logits_a, logits_b, atol=2e-5)
    chex.assert_trees_all_equal(a, b)
    chex.assert_shape(a, (1, 14))


@pytest.mark.parametrize(
    "variant",
    [{"scan_layers": True, "remat": True}, {"attention": "dot_product"}],
    ids=["scan_remat", "dot_product"],
)
def test_cache_with_model_variants(params2, variant):
    """Scanned (params converted) and dot_product models decode like the plain one."""
    cfg = dataclasses.replace(CFG2, **variant)
    p = hf.stack_blocks(params2) if cfg.scan_layers else params2
    prompt_BP = [row[:2] for row in PROMPTS_B3]
    tokens, logits = run(p, prompt_BP, 12, cfg=cfg, temperature=0.0)
    ref_tokens, ref_logits = policy_reference(params2, prompt_BP, 12)
    np.testing.assert_allclose(logits, ref_logits, atol=2e-5)
    np.testing.assert_array_equal(tokens, ref_tokens)


def test_bigram_decodes_with_and_without_cache():
    """The bigram model has no cache to fill: both paths draw the same tokens."""
    cfg = ModelConfig(vocab_size=11, block_size=4, model="bigram")
    p = lecture.init_params(cfg, jax.random.PRNGKey(0))
    a, _ = run(p, [[1, 2]], 9, cfg=cfg, kv_cache=True)
    b, _ = run(p, [[1, 2]], 9, cfg=cfg, kv_cache=False)
    chex.assert_trees_all_equal(a, b)


def test_cached_loop_is_traced_once_not_per_token(params2):
    """One compiled program per call shape; within it the model is traced a fixed
    number of times (shape probe; the prompt's prefill and one-token step; and,
    if the cache can fill, the refill and its one-token step), not per token."""
    traces = []

    def apply_fn(*args, **kw):
        traces.append(kw.get("decode", False))
        return lecture.make_model(CFG2).apply(*args, **kw)

    def call(prompt_len, new):
        prompt = jnp.ones((2, prompt_len), jnp.int32)
        kw = {"block_size": CFG2.block_size, "max_new_tokens": new}
        out = generate.generate(apply_fn, params2, prompt, jax.random.PRNGKey(0), **kw)
        chex.assert_shape(out, (2, prompt_len + new))

    before = generate.generate._cache_size()
    call(3, 30)
    assert generate.generate._cache_size() == before + 1
    assert traces == [False, True, True, True, True]
    call(3, 30)  # Same shapes: the compiled loop is reused, nothing is traced.
    assert generate.generate._cache_size() == before + 1 and len(traces) == 5
    call(1, 2)  # Another shape: one more program; 3 tokens never fill the cache.
    assert generate.generate._cache_size() == before + 2
    assert traces[5:] == [False, True, True]


@pytest.mark.parametrize(
    "sampling,kv_cache",
    [({"temperature": 1.0, "top_k": 6}, True), ({"temperature": 0.0}, False)],
    ids=["sampled-cache", "greedy-no_cache"],  # (Greedy is sampling's limit.)
)
def test_padded_prompts_draw_what_the_prompts_alone_do(params2, kv_cache, sampling):
    """With prompt_len, one program serves prompts of every length up to P: each
    row draws the tokens (from the same logits) its unpadded prompt draws,
    including prompts longer than block_size and generation that refills the
    cache (P = 12, 10 new tokens, block_size 8)."""
    padded_BP = np.random.default_rng(0).integers(0, 11, (2, 12), dtype=np.int32)
    padded_BP[1] = padded_BP[1, ::-1]
    kw = {"block_size": 8, "max_new_tokens": 10, "return_logits": True}
    draw = functools.partial(
        generate.generate, lecture.make_model(CFG2).apply, params2, **kw, **sampling
    )
    before = generate.generate._cache_size()
    for p in (1, 5, 8, 12):
        key = jax.random.PRNGKey(p)
        tokens, logits = draw(
            padded_BP, key, prompt_len=jnp.int32(p), kv_cache=kv_cache
        )
        want, want_logits = draw(padded_BP[:, :p], key, kv_cache=kv_cache)
        chex.assert_trees_all_equal(np.asarray(tokens)[:, : p + 10], want)
        np.testing.assert_allclose(logits, want_logits, atol=2e-5)
    assert generate.generate._cache_size() == before + 1 + 4  # Padded: once.


# Top-p ------------------------------------------------------------------------


def nucleus_reference(logits_V: np.ndarray, top_p: float) -> set[int]:
    """The smallest set of likeliest tokens whose probability reaches top_p (numpy)."""
    p = np.exp(logits_V - logits_V.max())
    p /= p.sum()
    order = np.argsort(-p)
    n_keep = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1
    return set(order[:n_keep].tolist())


def test_top_p_keeps_the_nucleus_of_a_known_distribution():
    """p = [.1, .5, .15, .25]: top_p .6 keeps {1, 3}; .8 keeps {1, 3, 2}; .3 {1}."""
    logits_1V = jnp.log(jnp.array([[0.1, 0.5, 0.15, 0.25]]))
    for top_p, allowed in [(0.6, {1, 3}), (0.8, {1, 2, 3}), (0.3, {1}), (1.0, None)]:
        kept = np.isfinite(generate.filter_logits(logits_1V, 1.0, None, top_p)[0])
        assert set(np.flatnonzero(kept).tolist()) == (allowed or {0, 1, 2, 3})


def test_top_p_matches_numpy_reference_on_random_logits():
    logits_BV = jax.random.normal(jax.random.PRNGKey(3), (64, 23)) * 2.0
    for top_p in (0.1, 0.5, 0.9, 0.99):
        kept_BV = np.isfinite(generate.filter_logits(logits_BV, 1.0, None, top_p))
        for row, kept in zip(np.asarray(logits_BV), kept_BV):
            assert set(np.flatnonzero(kept).tolist()) == nucleus_reference(row, top_p)


def test_top_p_sampling_frequencies():
    """Draws never hit excluded tokens and follow the renormalised nucleus."""
    probs = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
    logits_NV = jnp.tile(jnp.log(jnp.asarray(probs))[None], (20000, 1))
    draws = generate.sample_logits(jax.random.PRNGKey(2), logits_NV, 1.0, None, 0.8)
    freq = np.bincount(np.asarray(draws), minlength=5) / 20000
    expected = np.array([0, 0.4, 0, 0.3, 0.15]) / 0.85  # Nucleus {1, 3, 4}.
    assert freq[0] == 0 and freq[2] == 0
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_top_p_applies_after_top_k_and_temperature():
    """top_k 2 leaves {9, 8}; at temperature 2 their mass splits 0.62/0.38, so
    top_p 0.6 keeps only 9 while top_p 0.7 keeps both."""
    logits_1V = jnp.arange(10.0)[None]
    kept = lambda p: set(
        np.flatnonzero(np.isfinite(generate.filter_logits(logits_1V, 2.0, 2, p)[0]))
    )
    assert kept(0.6) == {9} and kept(0.7) == {8, 9}


@pytest.mark.parametrize("top_p", [0.0, -0.5, 1.5])
def test_bad_top_p_names_the_flag(top_p):
    with pytest.raises(ConfigError, match="--top_p"):
        SampleConfig(top_p=top_p)


def test_sample_logits_draws_the_distribution():
    """Frequencies of 20,000 draws from three tokens match their probabilities."""
    probs = np.array([0.5, 0.3, 0.2], np.float32)
    logits_NV = jnp.log(jnp.tile(jnp.asarray(probs), (20_000, 1)))
    draws = generate.sample_logits(jax.random.PRNGKey(0), logits_NV, 1.0)
    freq = np.bincount(np.asarray(draws), minlength=3) / 20_000
    np.testing.assert_allclose(freq, probs, atol=0.015)

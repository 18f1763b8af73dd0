"""hub.load.grow_vocab: a model whose tokenizer gains ids (the chat tokens) gets
the rows of its vocabulary-sized parameters, as its own init draws them."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import lecture
from jaxgpt.config import ModelConfig
from jaxgpt.hub import load

V, NEW_V = 61, 65  # A base vocabulary and four chat tokens after it.
SMALL = {"block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 64}
MODELS = {
    "gpt2_tied": dict(model="gpt", bias=True, **SMALL),
    "gpt2_untied_scanned": dict(
        model="gpt", tie_embeddings=False, scan_layers=True, **SMALL
    ),
    "llama_untied": dict(
        model="gpt",
        position="rope",
        norm="rmsnorm",
        mlp="swiglu",
        n_kv_head=1,
        tie_embeddings=False,
        **SMALL,
    ),
    "llama_tied": dict(
        model="gpt", position="rope", norm="rmsnorm", mlp="swiglu", **SMALL
    ),
    "bigram": dict(model="bigram", **SMALL),
    "lecture": dict(model="lecture_layernorm", **SMALL),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def grown(request):
    """(name, old config, old params, new config, new params)."""
    cfg = ModelConfig(vocab_size=V, **MODELS[request.param])
    params = lecture.init_params(cfg, jax.random.key(0))
    new_params, new_cfg = load.grow_vocab(params, cfg, NEW_V, jax.random.key(1))
    return request.param, cfg, params, new_cfg, new_params


def vocab_axes(shape: tuple[int, ...], v: int) -> list[int]:
    return [axis for axis, n in enumerate(shape) if n == v]


def test_shapes_and_old_rows_kept(grown):
    name, cfg, params, new_cfg, new_params = grown
    assert new_cfg == ModelConfig(**{**cfg.to_dict(), "vocab_size": NEW_V})
    n_grown = 0
    for (path, old), new in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(new_params)
    ):
        expected = tuple(NEW_V if n == V else n for n in old.shape)
        chex.assert_shape(new, expected)
        assert new.dtype == old.dtype
        np.testing.assert_array_equal(new[tuple(map(slice, old.shape))], old)
        n_grown += new.shape != old.shape
    # The embedding, plus an untied head (kernel, and the lecture's bias).
    want = {"gpt2_tied": 1, "llama_tied": 1, "bigram": 1, "lecture": 3}
    assert n_grown == want.get(name, 2)


def test_new_rows_are_the_models_own_init(grown):
    """The new rows are those of the grown model's own init from the same key:
    GPT's normal(0.02), the lecture's normal(1) embedding and PyTorch's uniform
    head, the bigram's normal(0.02) table."""
    name, _, params, new_cfg, new_params = grown
    fresh = lecture.init_params(new_cfg, jax.random.key(1))
    for old, new, ref in zip(*map(jax.tree.leaves, (params, new_params, fresh))):
        for axis in vocab_axes(new.shape, NEW_V):
            if old.shape[axis] == V:
                rows = jnp.take(new, jnp.arange(V, NEW_V), axis=axis)
                np.testing.assert_array_equal(
                    rows, jnp.take(ref, jnp.arange(V, NEW_V), axis=axis)
                )
    if name.startswith(("gpt2", "llama")):
        rows = new_params["wte"]["embedding"][V:]
        assert 0.015 < float(rows.std()) < 0.025  # 256 draws of normal(0.02).
        assert not np.allclose(rows, 0)


def test_old_tokens_logits_unchanged(grown):
    """On the old ids, the grown model's logits over the old vocabulary are the
    old model's; the new ids are read (their rows exist) and finite."""
    _, cfg, params, new_cfg, new_params = grown
    idx_BT = jax.random.randint(jax.random.key(2), (2, 8), 0, V)
    old_BTV = lecture.make_model(cfg).apply({"params": params}, idx_BT)
    new_BTV = lecture.make_model(new_cfg).apply({"params": new_params}, idx_BT)
    chex.assert_shape(new_BTV, (2, 8, NEW_V))
    np.testing.assert_allclose(new_BTV[..., :V], old_BTV, rtol=1e-5, atol=1e-5)
    chat_BT = jnp.concatenate(
        [idx_BT[:, :4], jnp.arange(V, NEW_V)[None].repeat(2, 0)], 1
    )
    chex.assert_tree_all_finite(
        lecture.make_model(new_cfg).apply({"params": new_params}, chat_BT)
    )


def test_no_growth_needed():
    cfg = ModelConfig(vocab_size=NEW_V, **MODELS["gpt2_tied"])
    params = {"wte": {"embedding": jnp.zeros((NEW_V, 64))}}
    assert load.grow_vocab(params, cfg, NEW_V, jax.random.key(0)) == (params, cfg)
    assert load.grow_vocab(params, cfg, V, jax.random.key(0)) == (params, cfg)


def test_params_of_another_model_refused():
    cfg = ModelConfig(vocab_size=V, **MODELS["gpt2_tied"])
    params = lecture.init_params(
        ModelConfig(vocab_size=V, **MODELS["llama_untied"]), jax.random.key(0)
    )
    with pytest.raises(ValueError, match="not those of"):
        load.grow_vocab(params, cfg, NEW_V, jax.random.key(0))

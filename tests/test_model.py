import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import lecture, model
from jaxgpt.config import ConfigError, ModelConfig
from jaxgpt.run import perf

CFG = ModelConfig(
    vocab_size=65, block_size=16, n_layer=2, n_head=4, n_embd=32, bias=True
)


@functools.cache
def compiled_apply(cfg: ModelConfig):
    """The model's apply as one program (op by op, each new shape compiles
    dozens of small ones)."""
    return jax.jit(lecture.make_model(cfg).apply, static_argnames="deterministic")


def apply(cfg, params, idx, **kw):
    return compiled_apply(cfg)({"params": params}, idx, **kw)


@pytest.fixture(scope="module")
def params():
    return lecture.init_params(CFG, jax.random.PRNGKey(0))


def test_logits_shape(params):
    idx = jnp.zeros((3, CFG.block_size), jnp.int32)
    chex.assert_shape(apply(CFG, params, idx), (3, CFG.block_size, CFG.vocab_size))
    chex.assert_shape(apply(CFG, params, idx[:, :5]), (3, 5, CFG.vocab_size))


def test_longer_than_block_size_is_refused(params):
    with pytest.raises(ValueError, match="block_size"):
        apply(CFG, params, jnp.zeros((1, CFG.block_size + 1), jnp.int32))


def test_causality(params):
    """Changing tokens after position t leaves the logits at positions <= t unchanged."""
    idx = jax.random.randint(jax.random.PRNGKey(1), (2, CFG.block_size), 0, 65)
    t = 6
    changed = idx.at[:, t + 1 :].set((idx[:, t + 1 :] + 7) % 65)
    a, b = apply(CFG, params, idx), apply(CFG, params, changed)
    chex.assert_trees_all_close(a[:, : t + 1], b[:, : t + 1], atol=1e-6)
    assert not np.allclose(a[:, t + 1 :], b[:, t + 1 :], atol=1e-3)


def reference_attention(p, x, n_head):
    """Attention in plain numpy (float64), written from the paper's formula."""
    x = np.asarray(x, np.float64)
    B, T, C = x.shape
    D = C // n_head
    qkv = x @ np.asarray(p["c_attn"]["kernel"]) + np.asarray(p["c_attn"]["bias"])
    q, k, v = (qkv[..., i * C : (i + 1) * C].reshape(B, T, n_head, D) for i in range(3))
    out = np.zeros((B, T, n_head, D))
    for b in range(B):
        for h in range(n_head):
            s = q[b, :, h] @ k[b, :, h].T / math.sqrt(D)
            s[np.triu_indices(T, 1)] = -np.inf
            w = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, h] = (w / w.sum(-1, keepdims=True)) @ v[b, :, h]
    y = out.reshape(B, T, C)
    return y @ np.asarray(p["c_proj"]["kernel"]) + np.asarray(p["c_proj"]["bias"])


def test_attention_matches_reference(params):
    attn = model.CausalSelfAttention(CFG)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 9, CFG.n_embd))
    p = params["h_0"]["attn"]
    got = attn.apply({"params": p}, x, deterministic=True)
    np.testing.assert_allclose(got, reference_attention(p, x, CFG.n_head), atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n_layer,n_embd,block_size", [(1, 16, 8), (3, 48, 32)])
def test_param_count_matches_closed_form(bias, n_layer, n_embd, block_size):
    cfg = ModelConfig(
        vocab_size=65,
        block_size=block_size,
        n_layer=n_layer,
        n_head=4,
        n_embd=n_embd,
        bias=bias,
    )
    params = lecture.init_params(cfg, jax.random.PRNGKey(0))
    V, T, C, L = 65, block_size, n_embd, n_layer
    per_block = 4 * C * C + 8 * C * C + (2 * C if not bias else 13 * C)
    expected = V * C + T * C + L * per_block + (2 * C if bias else C)
    assert model.count_params(params) == expected


def test_baby_gpt_size():
    """nanoGPT reports 10.65M parameters (without position embeddings) for this model."""
    cfg = ModelConfig(
        vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, bias=False
    )
    params = jax.eval_shape(lambda: lecture.init_params(cfg, jax.random.PRNGKey(0)))
    n = model.count_params(params) - 256 * 384
    assert round(n / 1e6, 2) == 10.65


def test_output_projection_is_tied(params):
    assert "lm_head" not in params and set(params) >= {"wte", "wpe", "ln_f"}


def test_gpt2_initialisation():
    cfg = ModelConfig(
        vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=256, bias=True
    )
    p = lecture.init_params(cfg, jax.random.PRNGKey(0))
    assert abs(float(p["wte"]["embedding"].std()) - 0.02) < 2e-3
    assert abs(float(p["h_0"]["mlp"]["c_fc"]["kernel"].std()) - 0.02) < 2e-3
    residual = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert abs(float(p["h_0"]["mlp"]["c_proj"]["kernel"].std()) - residual) < 1e-3
    assert abs(float(p["h_0"]["attn"]["c_proj"]["kernel"].std()) - residual) < 1e-3
    assert float(jnp.abs(p["h_0"]["attn"]["c_attn"]["bias"]).max()) == 0.0


@pytest.mark.parametrize("kind", ["gpt", "bigram"])
def test_initial_loss_near_log_vocab(kind, corpus_text):
    from jaxgpt import data, tokenizer

    tok = tokenizer.CharTokenizer.train(corpus_text)
    vocab = tok.vocab
    cfg = ModelConfig(
        vocab_size=len(vocab), block_size=32, n_layer=2, n_head=2, n_embd=32, model=kind
    )
    params = lecture.init_params(cfg, jax.random.PRNGKey(0))
    tokens = tok.encode(corpus_text[:20000])
    x, y = data.get_batch(tokens, np.random.default_rng(0), 16, 32)
    loss = float(model.cross_entropy(apply(cfg, params, x), y))
    assert abs(loss - math.log(len(vocab))) < 0.05


def test_bigram_is_a_lookup_table():
    cfg = ModelConfig(vocab_size=5, block_size=4, model="bigram")
    params = lecture.init_params(cfg, jax.random.PRNGKey(0))
    assert model.count_params(params) == 25
    idx = jnp.array([[3, 1, 3]])
    logits = apply(cfg, params, idx)
    chex.assert_shape(logits, (1, 3, 5))
    np.testing.assert_array_equal(logits[0, 0], params["table"]["embedding"][3])


def test_dropout_only_when_training():
    cfg = ModelConfig(
        vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.5
    )
    params = lecture.init_params(cfg, jax.random.PRNGKey(0))
    idx = jnp.arange(16)[None] % 65
    eval_a, eval_b = apply(cfg, params, idx), apply(cfg, params, idx)
    chex.assert_trees_all_equal(eval_a, eval_b)
    train = lambda k: apply(cfg, params, idx, deterministic=False, rngs={"dropout": k})
    a, b = train(jax.random.PRNGKey(1)), train(jax.random.PRNGKey(2))
    assert not np.allclose(a, b)
    chex.assert_trees_all_equal(a, train(jax.random.PRNGKey(1)))


def test_cross_entropy_matches_formula():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 7))
    targets = jnp.array([[0, 6, 3], [2, 2, 1]])
    logp = jax.nn.log_softmax(logits)
    expected = -np.mean([logp[b, t, targets[b, t]] for b in range(2) for t in range(3)])
    np.testing.assert_allclose(
        model.cross_entropy(logits, targets), expected, rtol=1e-6
    )


@pytest.mark.parametrize(
    "kw,flag",
    [
        ({"n_embd": 30, "n_head": 4}, "--n_embd"),
        ({"n_layer": 0}, "--n_layer"),
        ({"block_size": -1}, "--block_size"),
        ({"dropout": 1.0}, "--dropout"),
        ({"model": "lstm"}, "--model"),
    ],
)
def test_bad_model_config_names_the_flag(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        ModelConfig(vocab_size=65, **kw)


def test_dense_on_rows_equals_flax_dense():
    """model.Dense (via model.dense) flattens the leading axes: same parameters,
    same outputs as nn.Dense on 3-D input."""
    import flax.linen as nn

    cfg = ModelConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=8, block_size=4)
    layer = model.dense(cfg, 5, nn.initializers.normal(1.0), "d")
    x_BTC = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8))
    params = layer.init(jax.random.PRNGKey(1), x_BTC)
    ref = nn.Dense(5, use_bias=cfg.bias).apply(params, x_BTC)
    np.testing.assert_allclose(layer.apply(params, x_BTC), ref, rtol=1e-6, atol=1e-6)


def xla_flops_per_token(cfg: ModelConfig, B: int = 2) -> float:
    """XLA's own count of the FLOPs of the compiled loss gradient, per token."""
    apply = lecture.make_model(cfg).apply
    params = jax.eval_shape(lambda: lecture.init_params(cfg, jax.random.PRNGKey(0)))
    x_BT = jax.ShapeDtypeStruct((B, cfg.block_size), jnp.int32)
    loss = lambda p, x: model.cross_entropy(apply({"params": p}, x), x)
    cost = jax.jit(jax.grad(loss)).lower(params, x_BT).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"] / (B * cfg.block_size)


@pytest.mark.parametrize(
    "shape",
    [
        {"n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 64, "vocab_size": 65},
        {
            "n_layer": 1,
            "n_head": 2,
            "n_embd": 256,
            "block_size": 32,
            "vocab_size": 1024,
        },
        {
            "n_layer": 3,
            "n_head": 4,
            "n_embd": 64,
            "block_size": 128,
            "vocab_size": 300,
            "bias": True,
        },
        # The architecture options: no position table, an untied head (the
        # token embedding only looked up), fewer key/value heads, SwiGLU.
        {
            "n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 64,
            "vocab_size": 65, "position": "rope", "norm": "rmsnorm",
            "norm_scale": False, "qk_norm": True, "mlp": "relu2", "n_kv_head": 2,
            "tie_embeddings": False, "logit_cap": 15.0,
        },
        {
            "n_layer": 2, "n_head": 8, "n_embd": 128, "block_size": 32,
            "vocab_size": 1024, "position": "rope", "norm": "rmsnorm",
            "mlp": "swiglu", "n_kv_head": 1, "tie_embeddings": False,
        },
        {
            "n_layer": 2, "n_head": 2, "n_embd": 128, "block_size": 64,
            "vocab_size": 300, "mlp": "swiglu", "mlp_hidden": 256,
        },
    ],
    ids=["gpt2_a", "gpt2_b", "gpt2_bias", "modern", "llama_mqa", "swiglu_tied"],
)  # fmt: skip
def test_flops_per_token_matches_xlas_count(shape):
    """6N + 12LCT against the FLOPs XLA counts in the lowered gradient (matmuls
    plus the elementwise work, a few percent at these sizes)."""
    cfg = ModelConfig(**shape)
    ratio = xla_flops_per_token(cfg) / perf.flops_per_token(cfg)
    assert 0.98 < ratio < 1.06, ratio

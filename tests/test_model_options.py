"""The architecture options of ModelConfig (positions, norms, QK-norm, the MLP,
key/value heads, the output layer, the soft-cap) against a float64 numpy GPT
written here from their formulas; their parameters, the KV cache past the
context, the ways to compute them (dropout, bfloat16, remat, scan_layers,
dot_product attention), Muon's labels and checkpoints."""

from __future__ import annotations

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt import generate, lecture, model
from jaxgpt.config import ConfigError, ModelConfig, TrainConfig
from jaxgpt.hub import hf
from jaxgpt.run import checkpoint as ckpt
from jaxgpt.run import muon

BASE = ModelConfig(
    vocab_size=13, block_size=12, n_layer=2, n_head=4, n_embd=32, bias=True
)
MODERN = {  # nanochat's choices (experiments/shakespeare_cpu_modern.cfg).
    "position": "rope",
    "norm": "rmsnorm",
    "norm_scale": False,
    "qk_norm": True,
    "mlp": "relu2",
    "n_kv_head": 2,
    "tie_embeddings": False,
    "logit_cap": 15.0,
}
COMBOS = {
    "gpt2": {},
    "rope": {"position": "rope", "rope_theta": 500.0},
    "rmsnorm": {"norm": "rmsnorm", "norm_eps": 1e-6},
    "layernorm_no_scale": {"norm_scale": False},
    "qk_norm": {"qk_norm": True},
    "relu2": {"mlp": "relu2"},
    "swiglu": {"mlp": "swiglu", "mlp_hidden": 40},
    "gqa": {"n_kv_head": 2},
    "mqa_dot_product": {"n_kv_head": 1, "attention": "dot_product"},
    "untied": {"tie_embeddings": False},
    "logit_cap": {"logit_cap": 2.0},
    "modern": MODERN,
    "llama": {
        "position": "rope",
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "n_kv_head": 2,
        "tie_embeddings": False,
        "bias": False,
    },
}


def config(**kw) -> ModelConfig:
    return dataclasses.replace(BASE, **kw)


def noisy_params(cfg: ModelConfig, seed: int = 0):
    """init_params plus N(0, 0.1) on every leaf: biases and gains away from 0 and 1."""
    params = jax.jit(lecture.init_params, static_argnums=0)(
        cfg, jax.random.PRNGKey(seed)
    )
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
    noise = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, noise)


# --- The reference: the GPT in float64 numpy, one formula per option ------------


def ref_norm(cfg, p, x):
    x = np.asarray(x, np.float64)
    if cfg.norm == "layernorm":
        y = (x - x.mean(-1, keepdims=True)) / np.sqrt(
            x.var(-1, keepdims=True) + cfg.norm_eps
        )
    else:
        y = x / np.sqrt((x**2).mean(-1, keepdims=True) + cfg.norm_eps)
    if cfg.norm_scale:
        y = y * np.asarray(p["scale"], np.float64)
    if cfg.norm == "layernorm" and cfg.bias:
        y = y + np.asarray(p["bias"], np.float64)
    return y


def ref_dense(p, x):
    y = x @ np.asarray(p["kernel"], np.float64)
    return y + np.asarray(p["bias"], np.float64) if "bias" in p else y


def ref_rope(x_THD, theta):
    """Channel i of the first half and channel i of the second turn together by
    the angle position * theta^(-2i/D) (Llama's rotate-half)."""
    T, _, D = x_THD.shape
    out = np.empty_like(x_THD)
    for t in range(T):
        for i in range(D // 2):
            angle = t * theta ** (-2 * i / D)
            a, b = x_THD[t, :, i], x_THD[t, :, i + D // 2]
            out[t, :, i] = a * math.cos(angle) - b * math.sin(angle)
            out[t, :, i + D // 2] = b * math.cos(angle) + a * math.sin(angle)
    return out


def ref_attention(cfg, p, x_TC, window):
    T, C = x_TC.shape
    H, K, D = cfg.n_head, cfg.kv_heads, C // cfg.n_head
    qkv = ref_dense(p["c_attn"], x_TC)
    q = qkv[:, : H * D].reshape(T, H, D)
    k = qkv[:, H * D : (H + K) * D].reshape(T, K, D)
    v = qkv[:, (H + K) * D :].reshape(T, K, D)
    if cfg.qk_norm:
        q, k = ref_norm(cfg, p.get("q_norm"), q), ref_norm(cfg, p.get("k_norm"), k)
    if cfg.position == "rope":
        q, k = ref_rope(q, cfg.rope_theta), ref_rope(k, cfg.rope_theta)
    y = np.zeros((T, H, D))
    for h in range(H):
        j = h // (H // K)  # The key/value head of query head h.
        s = q[:, h] @ k[:, j].T / math.sqrt(D)
        t_, u_ = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
        s[(u_ > t_) | (t_ - u_ >= window)] = -np.inf  # Causal, within the window.
        w = np.exp(s - s.max(-1, keepdims=True))
        y[:, h] = (w / w.sum(-1, keepdims=True)) @ v[:, j]
    return ref_dense(p["c_proj"], y.reshape(T, C))


def ref_mlp(cfg, p, x):
    h = ref_dense(p["c_fc"], x)
    if cfg.mlp == "gelu":
        h = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    elif cfg.mlp == "relu2":
        h = np.maximum(h, 0) ** 2
    else:
        gate, up = h[:, : cfg.hidden_dim], h[:, cfg.hidden_dim :]
        h = gate / (1 + np.exp(-gate)) * up
    return ref_dense(p["c_proj"], h)


def ref_logits(cfg, params, idx_T, window=None):
    """Logits [T, V] of one sequence, any length with rope; `window` (default:
    all) limits each token to the last `window` positions, itself included."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    T = len(idx_T)
    x = p["wte"]["embedding"][idx_T]
    if cfg.position == "learned":
        x = x + p["wpe"]["embedding"][:T]
    for i in range(cfg.n_layer):
        b = p[f"h_{i}"]
        x = x + ref_attention(
            cfg, b["attn"], ref_norm(cfg, b.get("ln_1"), x), window or T
        )
        x = x + ref_mlp(cfg, b["mlp"], ref_norm(cfg, b.get("ln_2"), x))
    x = ref_norm(cfg, p.get("ln_f"), x)
    if cfg.tie_embeddings:
        logits = x @ p["wte"]["embedding"].T
    else:
        logits = x @ p["lm_head"]["kernel"]
    if cfg.logit_cap:
        logits = cfg.logit_cap * np.tanh(logits / cfg.logit_cap)
    return logits


# Every option in at least one of these (a compile each, so few of them).
FORMULA_COMBOS = {
    "gpt2": {},
    "llama_qk": {
        **COMBOS["llama"],
        "qk_norm": True,
        "norm_eps": 1e-6,
        "rope_theta": 500.0,
    },
    "modern_mqa": {**MODERN, "n_kv_head": 1, "attention": "dot_product"},
    "layernorm_gqa": {
        "norm_scale": False,
        "mlp": "relu2",
        "n_kv_head": 2,
        "logit_cap": 2.0,
        "tie_embeddings": False,
        "mlp_hidden": 40,
    },
}


@pytest.mark.parametrize("name", FORMULA_COMBOS)
def test_each_option_computes_its_formula(name):
    cfg = config(**FORMULA_COMBOS[name])
    params = noisy_params(cfg)
    idx_BT = jax.random.randint(jax.random.PRNGKey(1), (2, cfg.block_size), 0, 13)
    got_BTV = jax.jit(lecture.make_model(cfg).apply)({"params": params}, idx_BT)
    for b in range(2):
        want_TV = ref_logits(cfg, params, np.asarray(idx_BT[b]))
        assert np.std(want_TV) > 0.1
        np.testing.assert_allclose(got_BTV[b], want_TV, atol=2e-5, rtol=1e-5)


# --- Parameters -------------------------------------------------------------------


def expected_count(cfg: ModelConfig) -> int:
    """The parameter count, in closed form."""
    V, T, C, L = cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_layer
    KD, F = cfg.kv_heads * cfg.head_dim, cfg.hidden_dim
    norm = (C if cfg.norm_scale else 0) + (
        C if cfg.norm == "layernorm" and cfg.bias else 0
    )
    qk = 2 * (norm // C) * cfg.head_dim if cfg.qk_norm else 0
    b = cfg.bias
    attn = C * (C + 2 * KD) + (C + 2 * KD if b else 0) + C * C + (C if b else 0)
    n_in = 2 * F if cfg.mlp == "swiglu" else F
    mlp = C * n_in + (n_in if b else 0) + F * C + (C if b else 0)
    per_block = attn + mlp + 2 * norm + qk
    embeddings = V * C + (T * C if cfg.position == "learned" else 0)
    head = 0 if cfg.tie_embeddings else C * V
    return embeddings + L * per_block + norm + head


@pytest.mark.parametrize("name", COMBOS)
def test_param_count_matches_closed_form(name):
    cfg = config(**COMBOS[name])
    shapes = jax.eval_shape(lambda: lecture.init_params(cfg, jax.random.PRNGKey(0)))
    assert model.count_params(shapes) == expected_count(cfg)


def test_gpt2_choices_keep_gpt2s_parameter_tree():
    """Defaults: the tree nanoGPT's GPT has (hf.py's GPT-2 mapping reads it)."""
    params = jax.eval_shape(lambda: lecture.init_params(BASE, jax.random.PRNGKey(0)))
    assert set(params) == {"wte", "wpe", "ln_f", "h_0", "h_1"}
    block = jax.tree.map(lambda x: x.shape, params["h_0"])
    assert block["attn"]["c_attn"]["kernel"] == (32, 96)
    assert block["mlp"]["c_fc"]["kernel"] == (32, 128)
    assert set(block) == {"ln_1", "attn", "ln_2", "mlp"}
    modern = config(**MODERN)
    p = jax.eval_shape(lambda: lecture.init_params(modern, jax.random.PRNGKey(0)))
    assert set(p) == {"wte", "lm_head", "h_0", "h_1"}  # No table, no norm scales.
    assert p["h_0"]["attn"]["c_attn"]["kernel"].shape == (32, 32 + 2 * 2 * 8)


@pytest.mark.parametrize(
    "kw,flag",
    [
        ({"n_kv_head": 3}, "--n_kv_head"),
        ({"n_kv_head": 0}, "--n_kv_head"),
        ({"position": "rope", "n_head": 32, "n_embd": 32}, "--position=rope"),
        ({"logit_cap": -1.0}, "--logit_cap"),
        ({"mlp_hidden": 0}, "--mlp_hidden"),
        ({"norm": "batchnorm"}, "--norm"),
        ({"rope_theta": 0.0}, "--rope_theta"),
        ({"model": "lecture_ffwd", "mlp": "swiglu"}, "--mlp=swiglu"),
    ],
)
def test_bad_options_name_the_flag(kw, flag):
    with pytest.raises(ConfigError, match=flag) as e:
        config(**kw)
    assert "\n" not in str(e.value)


def test_checkpoints_of_other_choices_do_not_resume():
    saved = config(**MODERN).to_dict()
    ckpt.check_compatible(saved, config(**MODERN), "wd")
    ckpt.check_compatible(  # The defaults written out are the same model.
        config(**MODERN, mlp_hidden=128).to_dict(), config(**MODERN), "wd"
    )
    with pytest.raises(ConfigError, match="position: checkpoint 'rope'"):
        ckpt.check_compatible(saved, config(**{**MODERN, "position": "learned"}), "wd")


# --- The ways to compute ---------------------------------------------------------


def tokens(step: int, batch: int = 8):
    """A learnable stream: each token is the previous one + 3 (mod 13)."""
    start_B1 = jax.random.randint(jax.random.PRNGKey(step), (batch, 1), 0, 13)
    seq_BT = (start_B1 + 3 * jnp.arange(BASE.block_size + 1)) % 13
    return seq_BT[:, :-1], seq_BT[:, 1:]


@functools.cache
def grad_fn(cfg: ModelConfig):
    x_BT, y_BT = tokens(0)
    apply = lecture.make_model(cfg).apply

    def loss_fn(params, key):
        det = cfg.dropout == 0
        logits = apply(
            {"params": params}, x_BT, deterministic=det, rngs={"dropout": key}
        )
        return model.cross_entropy(logits, y_BT)

    return jax.jit(jax.value_and_grad(loss_fn))


def test_the_modern_model_computes_every_way():
    """remat with scan_layers: the same loss and gradients; bfloat16 close;
    dropout drawn from its key. (dot_product attention: the formula test.)"""
    cfg = config(**MODERN)
    params, key = noisy_params(cfg), jax.random.PRNGKey(3)
    loss, grads = grad_fn(cfg)(params, key)
    scanned = config(**MODERN, scan_layers=True, remat=True)
    s_loss, s_grads = grad_fn(scanned)(hf.stack_blocks(params), key)
    np.testing.assert_allclose(s_loss, loss, rtol=1e-6)
    chex.assert_trees_all_close(s_grads, hf.stack_blocks(grads), atol=1e-6)
    bf16_loss, _ = grad_fn(config(**MODERN, dtype="bfloat16"))(params, key)
    assert bf16_loss != loss and abs(bf16_loss - loss) < 0.02 * loss
    dropout = config(**MODERN, dropout=0.2)
    a, b = (grad_fn(dropout)(params, jax.random.PRNGKey(k))[0] for k in (1, 2))
    assert a != b and a == grad_fn(dropout)(params, jax.random.PRNGKey(1))[0]


def test_muon_labels_new_kernels_and_trains_the_modern_model():
    """Every block kernel (the fused q|k|v and gate|up too) is Muon's; the
    untied lm_head, the embedding and any norm gains are AdamW's."""
    for kw in (MODERN, COMBOS["llama"], {"qk_norm": True, "mlp": "swiglu"}):
        cfg = config(**kw)
        shapes = jax.eval_shape(
            lambda c=cfg: lecture.init_params(c, jax.random.PRNGKey(0))
        )
        for path, label in jax.tree_util.tree_flatten_with_path(
            muon.muon_labels(shapes)
        )[0]:
            names = [k.key for k in path]
            in_block = names[0].startswith("h_")
            assert label == ("muon" if in_block and names[-1] == "kernel" else "adamw")
    cfg = config(**MODERN)
    tc = TrainConfig(optimizer="muon", learning_rate=1e-2, warmup_iters=2, max_iters=30)
    tx, apply = muon.make_optimizer(tc), lecture.make_model(cfg).apply
    params = lecture.init_params(cfg, jax.random.PRNGKey(0))

    @jax.jit
    def step(params, opt_state, x_BT, y_BT):
        loss_fn = lambda p: model.cross_entropy(apply({"params": p}, x_BT), y_BT)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = tx.init(params), []
    for s in range(30):
        params, opt_state, loss = step(params, opt_state, *tokens(s))
        losses.append(float(loss))
    assert losses[0] > 2.3 and losses[-1] < 0.5, losses  # From ln 13 to the rule.


# --- The KV cache ----------------------------------------------------------------


def run(cfg, params, prompt_BP, new, **kw):
    return generate.generate(
        lecture.make_model(cfg).apply,
        params,
        jnp.asarray(prompt_BP),
        jax.random.PRNGKey(7),
        block_size=cfg.block_size,
        max_new_tokens=new,
        temperature=0.0,
        return_logits=True,
        **kw,
    )


@pytest.mark.parametrize("name", ["modern", "llama"])
def test_cached_decoding_is_uncached_decoding_within_the_context(name):
    cfg = config(**COMBOS[name])
    params = noisy_params(cfg)
    prompt_BP = [[1, 2, 3], [7, 7, 0]]
    new = cfg.block_size - 3
    rolling = cfg.position == "rope"
    cached, logits_a = run(cfg, params, prompt_BP, new, rolling=rolling)
    plain, logits_b = run(cfg, params, prompt_BP, new, kv_cache=False)
    np.testing.assert_allclose(logits_a, logits_b, atol=2e-5)
    chex.assert_trees_all_equal(cached, plain)


@pytest.mark.parametrize("n_layer", [1, 2])
def test_rotary_cache_rolls_on_as_a_sliding_window(n_layer):
    """Past block_size, the rotary cache keeps the last block_size keys: every
    logit equals the reference's over the whole sequence with a window of
    block_size. With one layer that is also nanoGPT's crop (no cache)."""
    cfg = config(**MODERN, n_layer=n_layer, block_size=6)
    params = noisy_params(cfg)
    prompt_BP, new = [[1, 2, 3, 4], [5, 0, 9, 9]], 14
    tokens_BA, logits_BNV = run(cfg, params, prompt_BP, new, rolling=True)
    for b in range(2):
        want = ref_logits(cfg, params, np.asarray(tokens_BA[b]), window=6)
        np.testing.assert_allclose(logits_BNV[b], want[3:-1], atol=5e-5)
    crop, crop_logits = run(cfg, params, prompt_BP, new, kv_cache=False)
    if n_layer == 1:
        np.testing.assert_allclose(logits_BNV, crop_logits, atol=5e-5)
        chex.assert_trees_all_equal(tokens_BA, crop)
    else:  # Older keys carry context from before the window: not the crop.
        assert np.abs(np.asarray(logits_BNV) - np.asarray(crop_logits)).max() > 1e-3


def test_sampling_a_rotary_model_rolls_its_cache(monkeypatch):
    """generate.sample passes rolling=True for --position=rope only."""
    seen = []
    real = generate.generate
    spy = lambda *a, **kw: seen.append(kw["rolling"]) or real(*a, **kw)
    monkeypatch.setattr(generate, "generate", spy)
    for cfg in (BASE, config(**MODERN)):
        params = lecture.init_params(cfg, jax.random.PRNGKey(0))
        key = jax.random.PRNGKey(0)
        generate.sample(
            lecture.make_model(cfg).apply, params, cfg, [1], key,
            max_new_tokens=2, temperature=0.0,
        )  # fmt: skip
    assert seen == [False, True]

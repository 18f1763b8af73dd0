"""dtype, remat, scan_layers and attention: the same network, computed differently."""

import dataclasses
import functools
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt import lecture, model, train
from jaxgpt.config import ConfigError, ModelConfig
from jaxgpt.hub import hf
from jaxgpt.run import checkpoint as ckpt

CFG = ModelConfig(
    vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True
)


@pytest.fixture(scope="module")
def params():
    return jax.jit(lecture.init_params, static_argnums=0)(CFG, jax.random.PRNGKey(0))


def tokens(step: int, batch: int = 8):
    """A learnable stream: each token is the previous one + 3 (mod 11)."""
    start_B1 = jax.random.randint(jax.random.PRNGKey(step), (batch, 1), 0, 11)
    seq_BT = (start_B1 + 3 * jnp.arange(CFG.block_size + 1)) % 11
    return seq_BT[:, :-1], seq_BT[:, 1:]


@functools.cache  # One compiled function per config, shared by the tests.
def grad_fn(cfg: ModelConfig, dropout: bool):
    """jit(value_and_grad) of the loss on tokens(0), with dropout from a key."""
    x_BT, y_BT = tokens(0)
    apply = lecture.make_model(cfg).apply

    def loss_fn(params, key):
        rngs = {"dropout": key} if dropout else {}
        logits = apply({"params": params}, x_BT, deterministic=not dropout, rngs=rngs)
        return model.cross_entropy(logits, y_BT)

    return jax.jit(jax.value_and_grad(loss_fn))


def loss_and_grads(cfg, params, dropout_key=None):
    key = jax.random.PRNGKey(0) if dropout_key is None else dropout_key
    return grad_fn(cfg, dropout_key is not None)(params, key)


# dtype ------------------------------------------------------------------------


def test_bfloat16_computes_in_bfloat16_with_float32_params_and_logits(params):
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    x_BT, _ = tokens(0)
    apply = partial(lecture.make_model(cfg).apply, capture_intermediates=True)
    logits, state = jax.jit(apply)({"params": params}, x_BT)
    inner = state["intermediates"]["h_0"]
    assert inner["attn"]["c_attn"]["__call__"][0].dtype == jnp.bfloat16
    assert inner["mlp"]["c_fc"]["__call__"][0].dtype == jnp.bfloat16
    assert logits.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    shapes = jax.eval_shape(lambda: lecture.init_params(cfg, jax.random.PRNGKey(0)))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))


def test_bfloat16_training_tracks_float32():
    """20 AdamW steps from the same init: bf16 losses within 0.02 of float32's.

    bfloat16 keeps 8 significant bits, so each rounding of an activation is off
    by up to 2^-9 (0.2%) relative; the loss averages many such errors, and
    parameters, the residual stream, softmax, logits and loss stay float32.
    Measured here: the curves differ by at most ~0.003 nats while the loss
    falls from 2.45 to ~0.2. So 0.02 (1% of the initial loss, ~7x the measured
    gap) flags a real divergence, yet is 100x smaller than the fall itself.
    """

    def train(cfg):
        apply = lecture.make_model(cfg).apply
        tx = optax.adamw(1e-2)

        @jax.jit
        def step(params, opt_state, x_BT, y_BT):
            loss_fn = lambda p: model.cross_entropy(apply({"params": p}, x_BT), y_BT)
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        params = lecture.init_params(CFG, jax.random.PRNGKey(0))
        opt_state, losses = tx.init(params), []
        for s in range(20):
            params, opt_state, loss = step(params, opt_state, *tokens(s))
            losses.append(float(loss))
        return np.array(losses)

    f32, bf16 = train(CFG), train(dataclasses.replace(CFG, dtype="bfloat16"))
    assert f32[-1] < f32[0] - 1.5  # It learns, so tracking it means something.
    np.testing.assert_allclose(bf16, f32, atol=0.02)
    assert not np.array_equal(bf16, f32)  # And bf16 really computed differently.


# remat ------------------------------------------------------------------------


def test_remat_gives_the_same_loss_and_gradients(params):
    """Same dropout masks too: remat only changes what the backward pass stores."""
    cfg = dataclasses.replace(CFG, dropout=0.1)
    key = jax.random.PRNGKey(3)
    plain = loss_and_grads(cfg, params, key)
    remat = loss_and_grads(dataclasses.replace(cfg, remat=True), params, key)
    chex.assert_trees_all_close(remat, plain, atol=1e-6)
    other_key = loss_and_grads(cfg, params, jax.random.PRNGKey(4))
    assert plain[0] != other_key[0]  # Dropout was on.
    program = lambda c: str(jax.make_jaxpr(grad_fn(c, True))(params, key))
    assert "remat" in program(dataclasses.replace(cfg, remat=True))  # It did remat.
    assert "remat" not in program(cfg)


# scan_layers ------------------------------------------------------------------


def test_stack_and_unstack_blocks_are_inverse(params):
    stacked = hf.stack_blocks(params)
    assert "h" in stacked and not any(k.startswith("h_") for k in stacked)
    chex.assert_shape(stacked["h"]["attn"]["c_attn"]["kernel"], (2, 32, 96))
    np.testing.assert_array_equal(
        stacked["h"]["mlp"]["c_fc"]["kernel"][1], params["h_1"]["mlp"]["c_fc"]["kernel"]
    )
    chex.assert_trees_all_equal(hf.unstack_blocks(stacked), params)
    cfg = dataclasses.replace(CFG, scan_layers=True)
    scanned = jax.eval_shape(lambda: lecture.init_params(cfg, jax.random.PRNGKey(0)))
    chex.assert_trees_all_equal_shapes_and_dtypes(scanned, stacked)
    with pytest.raises(ValueError, match="already stacked"):
        hf.stack_blocks(stacked)


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_model_gives_the_same_loss_and_gradients(params, remat):
    cfg = dataclasses.replace(CFG, scan_layers=True, remat=remat)
    loss, grads = loss_and_grads(cfg, hf.stack_blocks(params))
    ref_loss, ref_grads = loss_and_grads(CFG, params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    chex.assert_trees_all_close(grads, hf.stack_blocks(ref_grads), atol=1e-6)


def test_scanned_model_splits_dropout_masks_per_layer(params):
    """With dropout, each layer draws its own masks (dropout rngs split per layer)."""
    cfg = dataclasses.replace(CFG, scan_layers=True, dropout=0.5, n_layer=2)
    stacked = hf.stack_blocks(params)
    same = jax.tree.map(lambda x: jnp.stack([x[0], x[0]]), stacked["h"])
    x_BT, _ = tokens(0, batch=1)
    _, state = lecture.make_model(cfg).apply(
        {"params": {**stacked, "h": same}},
        x_BT,
        deterministic=False,
        rngs={"dropout": jax.random.PRNGKey(0)},
        capture_intermediates=lambda mdl, _: isinstance(mdl, model.MLP),
    )
    mlp_out_L = state["intermediates"]["h"]["mlp"]["__call__"][0]
    chex.assert_shape(mlp_out_L, (2, 1, CFG.block_size, CFG.n_embd))
    zeros_L = (mlp_out_L == 0).reshape(2, -1)
    assert not np.array_equal(zeros_L[0], zeros_L[1])  # Different masks per layer.


def test_scan_keeps_the_traced_program_flat_in_n_layer(params):
    """The scanned model's program has the same size for 2 and 6 layers."""

    def size(n_layer, scan):
        cfg = dataclasses.replace(CFG, n_layer=n_layer, scan_layers=scan)
        p = jax.eval_shape(lambda: lecture.init_params(cfg, jax.random.PRNGKey(0)))
        x_BT, y_BT = tokens(0)
        loss = lambda p: model.cross_entropy(
            lecture.make_model(cfg).apply({"params": p}, x_BT), y_BT
        )
        return len(jax.make_jaxpr(jax.grad(loss))(p).eqns)

    assert size(2, scan=True) == size(6, scan=True)
    assert size(6, scan=False) > size(2, scan=False) + 100


def test_decay_mask_skips_the_stacked_layer_axis(params):
    plain = train.decay_mask(params)
    assert plain["h_0"]["attn"]["c_attn"]["kernel"] and plain["wte"]["embedding"]
    assert not plain["h_0"]["attn"]["c_attn"]["bias"] and not plain["ln_f"]["scale"]
    stacked = train.decay_mask(hf.stack_blocks(params))
    assert stacked["h"]["attn"]["c_attn"]["kernel"]
    assert not stacked["h"]["attn"]["c_attn"]["bias"]  # 2-D only by the L axis.
    assert not stacked["h"]["ln_1"]["scale"]
    assert (
        jax.tree.leaves(stacked).count(True)
        == jax.tree.leaves(plain).count(True) - (CFG.n_layer - 1) * 4
    )  # 4 matrices per block, now one leaf each.


# attention --------------------------------------------------------------------


def test_dot_product_attention_matches_einsum(params, monkeypatch):
    calls, real = [], jax.nn.dot_product_attention
    spy = lambda *args, **kw: calls.append(kw["is_causal"]) or real(*args, **kw)
    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    cfg = dataclasses.replace(CFG, attention="dot_product")
    chex.assert_trees_all_close(
        loss_and_grads(cfg, params), loss_and_grads(CFG, params), atol=1e-6
    )
    x_BT, _ = tokens(1)
    logits = lambda c: jax.jit(lecture.make_model(c).apply)({"params": params}, x_BT)
    chex.assert_trees_all_close(logits(cfg), logits(CFG), atol=1e-5)
    assert calls and all(calls)  # jax.nn's causal attention did the work.


def test_dot_product_attention_with_dropout_is_refused():
    with pytest.raises(ConfigError, match="--attention=dot_product") as e:
        dataclasses.replace(CFG, attention="dot_product", dropout=0.1)
    assert "--dropout=0" in str(e.value) and "--attention=einsum" in str(e.value)


def test_cudnn_attention_needs_bfloat16_and_no_dropout():
    with pytest.raises(ConfigError, match="--dtype=bfloat16"):
        dataclasses.replace(CFG, attention="cudnn")
    with pytest.raises(ConfigError, match="--attention=cudnn"):
        dataclasses.replace(CFG, attention="cudnn", dtype="bfloat16", dropout=0.1)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN runs on a GPU")
def test_cudnn_checkpoints_sample_off_the_gpu_with_xla_attention(params):
    """Away from a GPU, --attention=cudnn models run jax.nn's XLA version."""
    bf16 = dataclasses.replace(CFG, dtype="bfloat16")
    cfg = dataclasses.replace(bf16, attention="cudnn")
    assert not model.use_cudnn(cfg, decode=False)
    x_BT, _ = tokens(1)
    logits = lambda c: jax.jit(lecture.make_model(c).apply)({"params": params}, x_BT)
    chex.assert_trees_all_close(logits(cfg), logits(bf16), atol=0.05)


@pytest.mark.parametrize(
    "kw,flag",
    [({"dtype": "float16"}, "--dtype"), ({"attention": "flash"}, "--attention")],
)
def test_bad_variant_names_the_flag(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        dataclasses.replace(CFG, **kw)


# resuming ---------------------------------------------------------------------


def test_resume_allows_dtype_remat_attention_but_not_scan_layers():
    saved = CFG.to_dict()
    for kw in ({"dtype": "bfloat16"}, {"remat": True}, {"attention": "dot_product"}):
        ckpt.check_compatible(saved, dataclasses.replace(CFG, **kw), "wd")
    with pytest.raises(ConfigError) as e:
        ckpt.check_compatible(saved, dataclasses.replace(CFG, scan_layers=True), "wd")
    message = str(e.value)
    assert "scan_layers" in message and "--scan_layers=false" in message
    assert "--overwrite" in message and "\n" not in message


def test_checkpoints_from_before_the_new_fields_still_resume():
    old = {
        k: v
        for k, v in CFG.to_dict().items()
        if k not in ("dtype", "remat", "scan_layers", "attention")
    }
    ckpt.check_compatible(old, CFG, "wd")
    with pytest.raises(ConfigError, match="scan_layers"):
        ckpt.check_compatible(old, dataclasses.replace(CFG, scan_layers=True), "wd")

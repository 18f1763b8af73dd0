"""The GPT (nanoGPT's architecture) and the bigram baseline, in Flax linen.

Shapes are suffixes: B batch, T time (sequence), C embedding (n_embd),
H heads, D head size (C // H), V vocabulary, L layers.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxgpt.config import ModelConfig

init_normal = nn.initializers.normal(stddev=0.02)  # GPT-2 initialisation.


def residual_init(config: ModelConfig):
    """GPT-2 scales the projections that write into the residual stream by 1/sqrt(2L)."""
    return nn.initializers.normal(stddev=0.02 / math.sqrt(2 * config.n_layer))


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t sees positions <= t only."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTC: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        B, T, C = x_BTC.shape
        H, D = cfg.n_head, cfg.head_dim
        qkv_BT3C = nn.Dense(
            3 * C, use_bias=cfg.bias, kernel_init=init_normal, name="c_attn"
        )(x_BTC)
        q_BTHD, k_BTHD, v_BTHD = jnp.split(qkv_BT3C.reshape(B, T, 3 * H, D), 3, axis=2)
        # Scaled dot-product scores; 1/sqrt(D) keeps their variance near 1.
        att_BHTT = jnp.einsum("bqhd,bkhd->bhqk", q_BTHD, k_BTHD) / math.sqrt(D)
        causal_TT = jnp.tril(jnp.ones((T, T), dtype=bool))
        att_BHTT = jnp.where(causal_TT, att_BHTT, jnp.finfo(att_BHTT.dtype).min)
        att_BHTT = jax.nn.softmax(att_BHTT, axis=-1)
        att_BHTT = nn.Dropout(cfg.dropout)(att_BHTT, deterministic=deterministic)
        y_BTHD = jnp.einsum("bhqk,bkhd->bqhd", att_BHTT, v_BTHD)
        y_BTC = nn.Dense(
            C, use_bias=cfg.bias, kernel_init=residual_init(cfg), name="c_proj"
        )(y_BTHD.reshape(B, T, C))
        return nn.Dropout(cfg.dropout)(y_BTC, deterministic=deterministic)


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C -> GELU -> C."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTC: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        h_BTF = nn.Dense(
            4 * cfg.n_embd, use_bias=cfg.bias, kernel_init=init_normal, name="c_fc"
        )(x_BTC)
        h_BTF = jax.nn.gelu(h_BTF, approximate=True)  # GPT-2's tanh GELU.
        y_BTC = nn.Dense(
            cfg.n_embd, use_bias=cfg.bias, kernel_init=residual_init(cfg), name="c_proj"
        )(h_BTF)
        return nn.Dropout(cfg.dropout)(y_BTC, deterministic=deterministic)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTC: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, use_bias=cfg.bias, name=name)
        x_BTC = x_BTC + CausalSelfAttention(cfg, name="attn")(
            ln("ln_1")(x_BTC), deterministic
        )
        x_BTC = x_BTC + MLP(cfg, name="mlp")(ln("ln_2")(x_BTC), deterministic)
        return x_BTC


class GPT(nn.Module):
    """Token + position embeddings, L blocks, final LayerNorm, tied output layer."""

    config: ModelConfig

    @nn.compact
    def __call__(self, idx_BT: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        T = idx_BT.shape[1]
        if T > cfg.block_size:
            raise ValueError(
                f"sequence length {T} exceeds block_size {cfg.block_size}."
            )
        wte = nn.Embed(
            cfg.vocab_size, cfg.n_embd, embedding_init=init_normal, name="wte"
        )
        wpe = nn.Embed(
            cfg.block_size, cfg.n_embd, embedding_init=init_normal, name="wpe"
        )
        x_BTC = wte(idx_BT) + wpe(jnp.arange(T))[None]
        x_BTC = nn.Dropout(cfg.dropout)(x_BTC, deterministic=deterministic)
        for i in range(cfg.n_layer):
            x_BTC = Block(cfg, name=f"h_{i}")(x_BTC, deterministic)
        x_BTC = nn.LayerNorm(epsilon=1e-5, use_bias=cfg.bias, name="ln_f")(x_BTC)
        return wte.attend(x_BTC)  # logits_BTV; weights tied to the token embedding.


class Bigram(nn.Module):
    """The baseline: a V x V table whose row for token t holds next-token logits."""

    config: ModelConfig

    @nn.compact
    def __call__(self, idx_BT: jax.Array, deterministic: bool = True) -> jax.Array:
        del deterministic  # No dropout: the table is the whole model.
        table = nn.Embed(
            self.config.vocab_size,
            self.config.vocab_size,
            embedding_init=init_normal,
            name="table",
        )
        return table(idx_BT)  # logits_BTV


def make_model(config: ModelConfig) -> nn.Module:
    return {"gpt": GPT, "bigram": Bigram}[config.model](config)


def init_params(config: ModelConfig, key: jax.Array):
    """Initial parameters for `config`, from `key`."""
    idx_BT = jnp.zeros((1, config.block_size), jnp.int32)
    return make_model(config).init(key, idx_BT)["params"]


def count_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def expected_param_count(config: ModelConfig) -> int:
    """Closed-form parameter count (used by the tests and the startup log)."""
    V, T, C, L = config.vocab_size, config.block_size, config.n_embd, config.n_layer
    if config.model == "bigram":
        return V * V
    # Per block: qkv C*3C, attention out C*C, MLP C*4C + 4C*C = 12C^2 weights;
    # biases 3C + C + 4C + C = 9C; two LayerNorms: 2C scales (+ 2C biases).
    ln = 2 * C if config.bias else C
    block = 12 * C * C + (9 * C if config.bias else 0) + 2 * ln
    return V * C + T * C + L * block + ln


def flops_per_token(config: ModelConfig) -> float:
    """Training FLOPs per token, 6N + 12*L*C*T with N the non-embedding parameters.

    6N: forward (2N) and backward (4N) matmuls; 12LCT: attention scores and
    values. The tied output projection (2VC per token forward) is not in N.
    """
    if config.model == "bigram":
        return 0.0
    C, L, T = config.n_embd, config.n_layer, config.block_size
    n = expected_param_count(config) - config.vocab_size * C - T * C
    return 6.0 * n + 12.0 * L * C * T


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy, computed in float32."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_BTV, targets_BT
    ).mean()

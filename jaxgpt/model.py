"""The GPT (nanoGPT's architecture) and the bigram baseline, in Flax linen.

Shapes are suffixes: B batch, T time (sequence), C embedding (n_embd),
H heads, D head size (C // H), V vocabulary, L layers, S key positions (T, or
block_size when decoding from the cache).

Options (ModelConfig) that leave the math unchanged:
- dtype: matmuls and activations inside the blocks in float32 or bfloat16.
  Like torch.autocast in nanoGPT, parameters, the residual stream, LayerNorm
  statistics, the softmax, the logits and the loss stay float32.
- remat: each block's activations are recomputed in the backward pass.
- scan_layers: one `nn.scan` over the blocks, so the block is traced and
  compiled once whatever n_layer; its parameters are stacked along a leading
  L axis under "h" (plain models have "h_0" ... "h_{L-1}"; see stack_blocks).
- attention: the einsum below, or jax.nn.dot_product_attention (XLA's, or
  "cudnn": cuDNN's flash attention on an NVIDIA GPU, in bfloat16).
`decode=True` runs the model on the next tokens of a sequence whose keys and
values so far sit in the "cache" collection (see generate.py); GPT keeps the
one position counter and hands each block the position `start` of its tokens.
Dense is Flax's, applied to the rows of its input (see the class below).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxgpt.config import ModelConfig


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t sees positions <= t only."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self, x_BTC: jax.Array, deterministic: bool, decode: bool = False, start=0
    ) -> jax.Array:
        cfg = self.config
        B, T, C = x_BTC.shape
        H, D = cfg.n_head, cfg.head_dim
        qkv_BT3C = dense(cfg, 3 * C, init_normal, "c_attn")(x_BTC)
        q_BTHD, k_BSHD, v_BSHD = jnp.split(qkv_BT3C.reshape(B, T, 3 * H, D), 3, axis=2)
        if decode:  # The keys and values so far come from the cache; these join them.
            k_BSHD, v_BSHD = self.append_to_cache(k_BSHD, v_BSHD, start)
        q_pos_T = start + jnp.arange(T)  # Positions of the queries (keys: 0 .. S-1).
        causal_TS = q_pos_T[:, None] >= jnp.arange(k_BSHD.shape[1])[None, :]
        if cfg.attention == "einsum":
            # Scaled dot-product scores; 1/sqrt(D) keeps their variance near 1.
            att_BHTS = jnp.einsum(
                "bqhd,bkhd->bhqk", q_BTHD, k_BSHD, preferred_element_type=jnp.float32
            ) / math.sqrt(D)
            att_BHTS = jnp.where(causal_TS, att_BHTS, jnp.finfo(jnp.float32).min)
            att_BHTS = jax.nn.softmax(att_BHTS, axis=-1)
            att_BHTS = nn.Dropout(cfg.dropout)(att_BHTS, deterministic=deterministic)
            y_BTHD = jnp.einsum(
                "bhqk,bkhd->bqhd", att_BHTS.astype(v_BSHD.dtype), v_BSHD
            )
        else:  # The same math in one call (cuDNN's flash attention can serve it).
            y_BTHD = jax.nn.dot_product_attention(
                q_BTHD,
                k_BSHD,
                v_BSHD,
                mask=causal_TS[None, None] if decode else None,
                is_causal=not decode,
                implementation="cudnn" if use_cudnn(cfg, decode) else None,
            )
        y_BTC = dense(cfg, C, residual_init(cfg), "c_proj")(y_BTHD.reshape(B, T, C))
        return nn.Dropout(cfg.dropout)(y_BTC, deterministic=deterministic)

    def append_to_cache(self, k_BTHD: jax.Array, v_BTHD: jax.Array, start):
        """Writes k, v at positions start .. start + T - 1 of the cache; returns it all.

        The cache holds block_size positions; slots past start + T hold zeros or
        stale values that the causal mask hides. Callers keep start + T within
        block_size (generate.py does).
        """
        B, _, H, D = k_BTHD.shape
        shape_BSHD = (B, self.config.block_size, H, D)
        k_cache = self.variable("cache", "k", jnp.zeros, shape_BSHD, k_BTHD.dtype)
        v_cache = self.variable("cache", "v", jnp.zeros, shape_BSHD, v_BTHD.dtype)
        at = (0, start, 0, 0)
        k_cache.value = jax.lax.dynamic_update_slice(k_cache.value, k_BTHD, at)
        v_cache.value = jax.lax.dynamic_update_slice(v_cache.value, v_BTHD, at)
        return k_cache.value, v_cache.value


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C -> GELU -> C."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTC: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        h_BTF = dense(cfg, 4 * cfg.n_embd, init_normal, "c_fc")(x_BTC)
        h_BTF = jax.nn.gelu(h_BTF, approximate=True)  # GPT-2's tanh GELU.
        y_BTC = dense(cfg, cfg.n_embd, residual_init(cfg), "c_proj")(h_BTF)
        return nn.Dropout(cfg.dropout)(y_BTC, deterministic=deterministic)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self, x_BTC: jax.Array, deterministic: bool, decode: bool = False, start=0
    ) -> jax.Array:
        cfg = self.config
        ln = lambda name: nn.LayerNorm(
            epsilon=1e-5, use_bias=cfg.bias, dtype=jnp.dtype(cfg.dtype), name=name
        )
        x_BTC = x_BTC + CausalSelfAttention(cfg, name="attn")(
            ln("ln_1")(x_BTC), deterministic, decode, start
        )
        x_BTC = x_BTC + MLP(cfg, name="mlp")(ln("ln_2")(x_BTC), deterministic)
        return x_BTC


class ScannedBlock(Block):
    """A Block with nn.scan's signature: (carry, x) -> (carry, output)."""

    def __call__(
        self, x_BTC: jax.Array, deterministic: bool, decode: bool = False, start=0
    ) -> tuple[jax.Array, None]:
        return super().__call__(x_BTC, deterministic, decode, start), None


class GPT(nn.Module):
    """Token + position embeddings, L blocks, final LayerNorm, tied output layer."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self, idx_BT: jax.Array, deterministic: bool = True, decode: bool = False
    ) -> jax.Array:
        cfg = self.config
        T = idx_BT.shape[1]
        cfg.check_length(T)
        start = 0  # The position of idx_BT's first token.
        if decode:  # These tokens continue the ones already in the cache.
            index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
            start, index.value = index.value, index.value + T
        wte = nn.Embed(
            cfg.vocab_size, cfg.n_embd, embedding_init=init_normal, name="wte"
        )
        wpe = nn.Embed(
            cfg.block_size, cfg.n_embd, embedding_init=init_normal, name="wpe"
        )
        x_BTC = wte(idx_BT) + wpe(start + jnp.arange(T))[None]
        x_BTC = nn.Dropout(cfg.dropout)(x_BTC, deterministic=deterministic)
        block = ScannedBlock if cfg.scan_layers else Block
        if cfg.remat:  # Keep only each block's input; recompute the rest for grads.
            block = nn.remat(
                block, static_argnums=(2, 3), prevent_cse=not cfg.scan_layers
            )  # Arguments (self, x, deterministic, decode, start): flags static.
        if cfg.scan_layers:
            x_BTC, _ = nn.scan(
                block,
                variable_axes={"params": 0, "cache": 0, "intermediates": 0},  # On L.
                split_rngs={"params": True, "dropout": True},  # Own init and masks.
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.n_layer,
            )(cfg, name="h")(x_BTC, deterministic, decode, start)
        else:
            for i in range(cfg.n_layer):
                x_BTC = block(cfg, name=f"h_{i}")(x_BTC, deterministic, decode, start)
        x_BTC = nn.LayerNorm(epsilon=1e-5, use_bias=cfg.bias, name="ln_f")(x_BTC)
        B, T, C = x_BTC.shape  # Tied to the token embedding; rows as in Dense.
        return wte.attend(x_BTC.reshape(B * T, C)).reshape(B, T, -1)  # float32


class Bigram(nn.Module):
    """The baseline: a V x V table whose row for token t holds next-token logits."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self, idx_BT: jax.Array, deterministic: bool = True, decode: bool = False
    ) -> jax.Array:
        del deterministic, decode  # No dropout, no context: the table is the model.
        table = nn.Embed(
            self.config.vocab_size,
            self.config.vocab_size,
            embedding_init=init_normal,
            name="table",
        )
        return table(idx_BT)  # logits_BTV


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy, computed in float32."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_BTV, targets_BT
    ).mean()


def make_model(config: ModelConfig) -> nn.Module:
    """The network --model names: GPT, the bigram, or a step of the lecture."""
    from jaxgpt import lecture  # The lecture's steps, built on this module's layers.

    return {"gpt": GPT, "bigram": Bigram, **lecture.MODELS}[config.model](config)


def init_params(config: ModelConfig, key: jax.Array):
    """Initial parameters for `config`, from `key`."""
    idx_BT = jnp.zeros((1, config.block_size), jnp.int32)
    return make_model(config).init(key, idx_BT)["params"]


# --- Building blocks ---------------------------------------------------------

init_normal = nn.initializers.normal(stddev=0.02)  # GPT-2 initialisation.


class Dense(nn.Dense):
    """nn.Dense on the rows of x_...C: one 2-D [N, C] matmul, same parameters and
    math. On 3-D input XLA:CPU transposes the weight gradient in a strided copy:
    the CPU recipe's step takes 57.6 ms instead of 42.7 (2-core AMD EPYC)."""

    def __call__(self, x_NC: jax.Array) -> jax.Array:
        *lead, C = x_NC.shape
        return super().__call__(x_NC.reshape(-1, C)).reshape(*lead, self.features)


def residual_init(config: ModelConfig):
    """GPT-2 scales the projections that write into the residual stream by 1/sqrt(2L)."""
    return nn.initializers.normal(stddev=0.02 / math.sqrt(2 * config.n_layer))


def dense(cfg: ModelConfig, features: int, kernel_init, name: str) -> Dense:
    """A Dense layer that computes in cfg.dtype; its parameters stay float32."""
    return Dense(
        features,
        use_bias=cfg.bias,
        kernel_init=kernel_init,
        dtype=jnp.dtype(cfg.dtype),
        name=name,
    )


def use_cudnn(cfg: ModelConfig, decode: bool) -> bool:
    """--attention=cudnn on a GPU, outside decoding (one query against a masked
    cache, which XLA's version serves); elsewhere (e.g. sampling on a laptop
    from a GPU-trained checkpoint) the same math runs on XLA's version."""
    return cfg.attention == "cudnn" and not decode and jax.default_backend() == "gpu"


def count_params(params) -> int:
    """The number of parameters in a tree (of arrays or their shapes)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))

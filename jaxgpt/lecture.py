"""The models of Karpathy's "Let's build GPT", one per step of the lecture.

Each step adds one idea (val losses on tiny shakespeare are the lecture's;
`python -m jaxgpt.tools.ladder` reproduces them):

  bigram              model.Bigram: the next token from the current one   2.49
  lecture_head        one self-attention head as wide as the embedding    2.37
  lecture_heads       n_head heads of n_embd / n_head, concatenated       2.28
  lecture_ffwd        + a feed-forward layer: Linear(C, C), ReLU          2.24
  lecture_residual    n_layer residual blocks, the attention's projection,
                      a 4C-wide feed-forward                              2.08
  lecture_layernorm   + pre-LayerNorm in each block and a final one       2.06
                      (6 layers, 6 heads, 384 wide, T 256, dropout 0.2:
                      the lecture's gpt.py)                               1.48

As the lecture builds them, they differ from model.GPT: separate heads,
biases, an untied lm_head, PyTorch's initialisation, float32 only, and no KV
cache: sampling re-runs the last block_size tokens, as the lecture's
generate() does. Shapes: B batch, T time, C n_embd, D head size, V vocabulary.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.config import ModelConfig
from jaxgpt.model import GPT, Bigram, Dense


def torch_uniform(fan_in: int):
    """PyTorch's default for nn.Linear's weight and bias: U(-1/sqrt(fan_in), +)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def linear(features: int, fan_in: int, name: str, bias: bool = True) -> Dense:
    """nn.Linear(fan_in, features) with PyTorch's default initialisation."""
    init = torch_uniform(fan_in)
    return Dense(features, use_bias=bias, kernel_init=init, bias_init=init, name=name)


class Head(nn.Module):
    """One head of causal self-attention: x_BTC -> out_BTD."""

    head_size: int
    dropout: float

    @nn.compact
    def __call__(self, x_BTC: jax.Array, deterministic: bool) -> jax.Array:
        T, C, D = x_BTC.shape[1], x_BTC.shape[2], self.head_size
        k_BTD = linear(D, C, "key", bias=False)(x_BTC)
        q_BTD = linear(D, C, "query", bias=False)(x_BTC)
        wei_BTT = q_BTD @ k_BTD.swapaxes(-2, -1) * D**-0.5  # "Affinities".
        tril_TT = jnp.tril(jnp.ones((T, T), bool))
        wei_BTT = jax.nn.softmax(jnp.where(tril_TT, wei_BTT, -jnp.inf), axis=-1)
        wei_BTT = nn.Dropout(self.dropout)(wei_BTT, deterministic=deterministic)
        v_BTD = linear(D, C, "value", bias=False)(x_BTC)
        return wei_BTT @ v_BTD


class MultiHeadAttention(nn.Module):
    """n_head heads side by side, their outputs concatenated: x_BTC -> y_BTC;
    `residual`: with a projection back into the residual stream, and dropout."""

    n_head: int
    head_size: int
    dropout: float
    residual: bool

    @nn.compact
    def __call__(self, x_BTC: jax.Array, deterministic: bool) -> jax.Array:
        heads = [
            Head(self.head_size, self.dropout, name=f"heads_{i}")
            for i in range(self.n_head)
        ]
        y_BTC = jnp.concatenate([head(x_BTC, deterministic) for head in heads], axis=-1)
        if not self.residual:
            return y_BTC
        C = y_BTC.shape[-1]
        y_BTC = linear(C, C, "proj")(y_BTC)
        return nn.Dropout(self.dropout)(y_BTC, deterministic=deterministic)


class FeedForward(nn.Module):
    """Per-position computation: Linear(C, C) and ReLU; `residual`: Linear(C, 4C),
    ReLU, Linear(4C, C) back into the residual stream, dropout."""

    dropout: float
    residual: bool

    @nn.compact
    def __call__(self, x_BTC: jax.Array, deterministic: bool) -> jax.Array:
        C = x_BTC.shape[-1]
        if not self.residual:
            return jax.nn.relu(linear(C, C, "net_0")(x_BTC))
        h_BTF = jax.nn.relu(linear(4 * C, C, "net_0")(x_BTC))
        y_BTC = linear(C, 4 * C, "net_2")(h_BTF)
        return nn.Dropout(self.dropout)(y_BTC, deterministic=deterministic)


class Block(nn.Module):
    """Communication then computation, each added to the residual stream:
    x + sa(x), then x + ffwd(x); with `layernorm`, on LayerNorm'ed inputs."""

    config: ModelConfig
    layernorm: bool

    @nn.compact
    def __call__(self, x_BTC: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        norm = lambda name: (
            nn.LayerNorm(epsilon=1e-5, name=name) if self.layernorm else (lambda x: x)
        )
        sa = MultiHeadAttention(cfg.n_head, cfg.head_dim, cfg.dropout, True, name="sa")
        x_BTC = x_BTC + sa(norm("ln1")(x_BTC), deterministic)
        ffwd = FeedForward(cfg.dropout, residual=True, name="ffwd")
        return x_BTC + ffwd(norm("ln2")(x_BTC), deterministic)


class LectureModel(nn.Module):
    """Token and position embeddings, the step's `body` (x_BTC -> x_BTC: each
    subclass is a step of the lecture), an untied lm_head."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self, idx_BT: jax.Array, deterministic: bool = True, decode: bool = False
    ) -> jax.Array:
        if decode:
            raise ValueError("the lecture's models have no KV cache: kv_cache=False.")
        cfg = self.config
        T = idx_BT.shape[1]
        cfg.check_length(T)
        embed = lambda n, name: nn.Embed(
            n, cfg.n_embd, embedding_init=nn.initializers.normal(1.0), name=name
        )
        tok_emb_BTC = embed(cfg.vocab_size, "token_embedding_table")(idx_BT)
        pos_emb_TC = embed(cfg.block_size, "position_embedding_table")(jnp.arange(T))
        x_BTC = self.body(tok_emb_BTC + pos_emb_TC, deterministic)
        return linear(cfg.vocab_size, cfg.n_embd, "lm_head")(x_BTC)  # logits_BTV

    def body(self, x_BTC: jax.Array, deterministic: bool) -> jax.Array:
        raise NotImplementedError


class OneHead(LectureModel):
    """One self-attention head of size n_embd (n_head is not used)."""

    def body(self, x_BTC, deterministic):
        cfg = self.config
        return Head(cfg.n_embd, cfg.dropout, name="sa_head")(x_BTC, deterministic)


class MultiHead(LectureModel):
    """n_head heads of size n_embd / n_head, concatenated."""

    def body(self, x_BTC, deterministic):
        cfg = self.config
        sa = MultiHeadAttention(
            cfg.n_head, cfg.head_dim, cfg.dropout, False, name="sa_heads"
        )
        return sa(x_BTC, deterministic)


class WithFeedForward(MultiHead):
    """The heads, then a feed-forward layer: attention gathers, ffwd thinks."""

    def body(self, x_BTC, deterministic):
        x_BTC = super().body(x_BTC, deterministic)
        return FeedForward(self.config.dropout, False, name="ffwd")(
            x_BTC, deterministic
        )


class Residual(LectureModel):
    """n_layer blocks with residual connections (and no LayerNorm)."""

    layernorm = False

    def body(self, x_BTC, deterministic):
        for i in range(self.config.n_layer):
            x_BTC = Block(self.config, self.layernorm, name=f"blocks_{i}")(
                x_BTC, deterministic
            )
        return x_BTC


class WithLayerNorm(Residual):
    """The residual blocks with pre-LayerNorm, and a final LayerNorm (gpt.py)."""

    layernorm = True

    def body(self, x_BTC, deterministic):
        x_BTC = super().body(x_BTC, deterministic)
        return nn.LayerNorm(epsilon=1e-5, name="ln_f")(x_BTC)


STEPS = {
    "lecture_head": OneHead,
    "lecture_heads": MultiHead,
    "lecture_ffwd": WithFeedForward,
    "lecture_residual": Residual,
    "lecture_layernorm": WithLayerNorm,
}


# --- Every model jaxgpt builds, by its --model name ---------------------------

MODELS = {"gpt": GPT, "bigram": Bigram, **STEPS}


def make_model(config: ModelConfig) -> nn.Module:
    """The network --model names: GPT, the bigram, or a step of the lecture."""
    return MODELS[config.model](config)


@functools.lru_cache
def apply_of(config: ModelConfig):
    """make_model(config).apply, one per config: compiled sampling is cached by it."""
    return make_model(config).apply


def init_params(config: ModelConfig, key: jax.Array):
    """Initial parameters for `config`, from `key`: one compiled program (op by op,
    a small model's init takes 2-3 s on a CPU), the same one train.create_state
    runs."""
    idx_BT = jnp.zeros((1, config.block_size), jnp.int32)
    return jax.jit(make_model(config).init)(key, idx_BT)["params"]

"""Sampling: one jitted program draws all new tokens (compiled once per shape).

Shapes: B rows, P prompt tokens, N new tokens, A = P + N, V vocabulary, S =
block_size. Tokens live in a fixed buffer buf_BA; token t is drawn with the
key fold_in(key, t).

With the KV cache (the default), a "prefill" encodes the prompt (its last S
tokens) in one pass and keeps each layer's keys and values in the model's
"cache" collection; then each step feeds only the newest token. When the
cache is full, learned positions (GPT-2's) re-encode the last K = S // 2
tokens at positions 0 .. K - 1 and go on, in a schedule fixed by the shapes
(a lax.cond between refill and step would copy every layer's cache at every
step); rotary positions (`rolling=True`) roll on in a ring buffer, a sliding
window (docs/architecture.md). Without the cache (nanoGPT's loop), each step
re-runs the model on the last min(S, A) positions.

In reading order: sample_logits picks a token, draw writes it; window_step
(no cache); prefill, extend, decode_step and segment (the cache); generate
schedules them in one program; sample is what a run calls.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxgpt.config import ModelConfig


def filter_logits(
    logits_BV: jax.Array,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """float32 logits / temperature, with -inf on the tokens top-k and top-p exclude.

    top-k keeps the k likeliest tokens. top-p (nucleus) then keeps the smallest
    set of likeliest tokens whose probability adds up to at least top_p (ties
    with the least likely kept token are kept too).
    """
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p is not None and top_p < 1.0:
        sorted_BV = jnp.flip(jnp.sort(logits_BV, axis=-1), axis=-1)  # Likeliest first.
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # Mass of likelier ones.
        n_keep_B1 = jnp.sum(before_BV < top_p, axis=-1, keepdims=True)  # >= 1.
        cutoff_B1 = jnp.take_along_axis(sorted_BV, n_keep_B1 - 1, axis=-1)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return logits_BV


def sample_logits(
    key: jax.Array,
    logits_BV: jax.Array,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """Draws one token per row: greedy if temperature == 0, else from filter_logits."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1)
    logits_BV = filter_logits(logits_BV, temperature, top_k, top_p)
    return jax.random.categorical(key, logits_BV, axis=-1)


class Sampling(NamedTuple):
    """What every step of one generate call shares: the model, the sampling
    options, and where the new tokens go (columns p .. end - 1; traced with
    prompt_len)."""

    apply_fn: Callable
    variables: dict
    key: jax.Array
    temperature: float
    top_k: int | None
    top_p: float | None
    return_logits: bool
    S: int  # The cache's length: block_size.
    p: Any  # The first new token's column.
    end: Any  # One past the last.


def draw(s: Sampling, t, logits_BV: jax.Array, carry):
    """Draws token t from its logits into the buffer (and keeps the logits)."""
    buf_BA, logits_BNV = carry
    key_t = jax.random.fold_in(s.key, t)
    next_B = sample_logits(key_t, logits_BV, s.temperature, s.top_k, s.top_p)
    buf_BA = buf_BA.at[:, t].set(next_B.astype(jnp.int32))
    if s.return_logits:
        logits_BNV = logits_BNV.at[:, t - s.p].set(logits_BV)
    return buf_BA, logits_BNV


def window_step(s: Sampling, t, carry):
    """No cache: re-runs the model on the last W tokens, then draws token t."""
    B, A = carry[0].shape
    W = min(s.S, A)
    start = jnp.clip(t - W, 0, A - W)
    window_BW = jax.lax.dynamic_slice(carry[0], (0, start), (B, W))
    logits_BWV = s.apply_fn(s.variables, window_BW, deterministic=True)
    logits_BV = jax.lax.dynamic_index_in_dim(
        logits_BWV, t - 1 - start, axis=1, keepdims=False
    )
    return draw(s, t, logits_BV, carry)


def prefill(s: Sampling, t, n, W: int, buf_BA: jax.Array):
    """A fresh cache of the n tokens before t, at positions 0 .. n - 1, read as
    W >= n tokens (the padding past n is hidden, then overwritten); returns
    token t's logits and the cache."""
    window_BW = jax.lax.dynamic_slice(buf_BA, (0, t - n), (buf_BA.shape[0], W))
    logits_B1V, new = s.apply_fn(
        s.variables, window_BW, decode=True, mutable="cache", logits_at=n - 1
    )
    cache = new.get("cache", {})
    if "index" in cache:  # The next token takes position n.
        cache = {**cache, "index": jnp.asarray(n, jnp.int32)}
    return logits_B1V[:, 0], cache


def extend(s: Sampling, t, buf_BA: jax.Array, cache):
    """Feeds token t - 1 at the cache's next position: token t's logits, the cache."""
    token_B1 = jax.lax.dynamic_slice(buf_BA, (0, t - 1), (buf_BA.shape[0], 1))
    logits_B1V, new = s.apply_fn(
        {**s.variables, "cache": cache}, token_B1, decode=True, mutable="cache"
    )
    return logits_B1V[:, -1], new.get("cache", {})


def decode_step(s: Sampling, u, state):
    """One step of a segment: extend by token u - 1, draw token u."""
    carry, cache = state
    logits_BV, cache = extend(s, u, carry[0], cache)
    return draw(s, u, logits_BV, carry), cache


def segment(s: Sampling, t, n, W: int, carry, stop=None):
    """Draws tokens t, t+1, ... from a fresh cache of the n tokens before t, one
    token per step, until the cache is full or all are drawn (or, given `stop`,
    until token stop - 1: a rolling cache)."""
    logits_BV, cache = prefill(s, t, n, W, carry[0])
    carry = draw(s, t, logits_BV, carry)
    if stop is None:
        stop = jnp.minimum(s.end, t + 1 + s.S - n)  # The cache then holds S tokens.
    carry, _ = jax.lax.fori_loop(t + 1, stop, partial(decode_step, s), (carry, cache))
    return carry


@partial(
    jax.jit,
    static_argnames=(
        "apply_fn",
        "block_size",
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "kv_cache",
        "rolling",
        "return_logits",
    ),
)
def generate(
    apply_fn: Callable,
    params,
    prompt_BP: jax.Array,
    key: jax.Array,
    *,
    block_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    kv_cache: bool = True,
    rolling: bool = False,
    return_logits: bool = False,
    prompt_len: jax.Array | None = None,
):
    """Extends each prompt row by `max_new_tokens` sampled tokens: returns [B, P + N].

    rolling: the model has rotary positions, so a full cache rolls on (see
    above); False re-encodes, which any model allows. With return_logits,
    also returns the [B, N, V] float32 logits each new token was drawn from
    (before temperature, top-k and top-p). With `prompt_len` (an int32 scalar
    <= P), the prompts end there: the new tokens fill columns prompt_len ..
    prompt_len + N - 1, and the columns after them hold padding.
    """
    B, P = prompt_BP.shape
    A = P + max_new_tokens
    S, K = block_size, max(1, block_size // 2)  # Cache length; tokens kept when full.
    if prompt_len is None:  # The schedule below is fixed by the shapes.
        p, lo, hi = P, min, max
    else:  # It depends on the traced prompt length.
        p, lo, hi = prompt_len, jnp.minimum, jnp.maximum
    end = p + max_new_tokens  # One past the last token drawn.
    variables = {"params": params}
    V = jax.eval_shape(lambda: apply_fn(variables, prompt_BP[:, :1])).shape[-1]
    options = (temperature, top_k, top_p, return_logits)
    s = Sampling(apply_fn, variables, key, *options, S, p, end)
    buf_BA = jnp.zeros((B, A), jnp.int32).at[:, :P].set(prompt_BP)
    logits_BNV = jnp.zeros((B, max_new_tokens, V)) if return_logits else None
    carry = (buf_BA, logits_BNV)
    if not kv_cache:
        carry = jax.lax.fori_loop(p, end, partial(window_step, s), carry)
    elif rolling:  # One segment: the ring buffer never needs a refill.
        carry = segment(s, p, lo(p, S), min(P, S), carry, stop=end)
    else:  # The prompt's segment, then refills of K tokens until all are drawn.
        n = lo(p, S)
        carry = segment(s, p, n, min(P, S), carry)
        first, length = p + 1 + S - n, S - K + 1  # Tokens per refill.
        refills = hi(0, -(-(end - first) // length))  # Rounded up; 0 if never full.
        if refills if prompt_len is None else A > S:  # (Else the cache never fills.)
            refill = lambda i, c: segment(s, first + i * length, K, K, c)
            carry = jax.lax.fori_loop(0, refills, refill, carry)
    buf_BA, logits_BNV = carry
    return (buf_BA, logits_BNV) if return_logits else buf_BA


def cache_options(model_cfg: ModelConfig, kv_cache: bool = True) -> dict:
    """generate's kv_cache and rolling for a model: the lecture's models have no
    KV cache, and a cache of rotary positions rolls on."""
    return {
        "kv_cache": kv_cache and not model_cfg.kind.lecture,
        "rolling": model_cfg.kind.gpt and model_cfg.position == "rope",
    }


def sample(
    apply_fn,
    params,
    model_cfg: ModelConfig,
    prompt_ids,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    num_samples: int = 1,
    kv_cache: bool = True,
) -> jax.Array:
    """[num_samples, len(prompt) + max_new_tokens] token ids continuing one prompt,
    drawn from `key` (a run's: train.stream(root, "sample")); top_k 0 and top_p
    1 keep every token."""
    prompt_BP = jnp.tile(jnp.asarray(prompt_ids, jnp.int32)[None], (num_samples, 1))
    options = {
        "block_size": model_cfg.block_size,
        "max_new_tokens": max_new_tokens,
        "temperature": float(temperature),
        "top_k": top_k or None,
        "top_p": float(top_p) if top_p < 1.0 else None,
        **cache_options(model_cfg, kv_cache),
    }
    return generate(apply_fn, params, prompt_BP, key, **options)

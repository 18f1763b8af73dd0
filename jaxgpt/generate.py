"""Sampling: one jitted loop generates all new tokens (compiled once per call shape).

The tokens live in a fixed buffer of length P + N (prompt + new). At each step
the model sees the last W = min(block_size, P + N) positions ending at the
newest token; when fewer than W tokens exist yet, the window starts at 0 and
its not-yet-written tail is ignored because attention is causal. So contexts
longer than block_size are cropped to their last block_size tokens.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxgpt.config import ModelConfig, SampleConfig


def sample_logits(key, logits_BV, temperature: float, top_k: int | None):
    """Draws one token per row: greedy if temperature == 0, else softmax(logits/temp) over the top k."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1)


@partial(
    jax.jit,
    static_argnames=(
        "apply_fn",
        "block_size",
        "max_new_tokens",
        "temperature",
        "top_k",
    ),
)
def generate(
    apply_fn,
    params,
    prompt_BP,
    key,
    *,
    block_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
):
    """Extends each prompt row by `max_new_tokens` sampled tokens: returns [B, P + N]."""
    B, P = prompt_BP.shape
    total = P + max_new_tokens
    W = min(block_size, total)
    buf_BS = jnp.zeros((B, total), jnp.int32).at[:, :P].set(prompt_BP)

    def step(t, carry):  # Writes position t from the tokens before it.
        buf_BS, key = carry
        start = jnp.clip(t - W, 0, total - W)
        window_BW = jax.lax.dynamic_slice(buf_BS, (0, start), (B, W))
        logits_BWV = apply_fn({"params": params}, window_BW, deterministic=True)
        logits_BV = jax.lax.dynamic_index_in_dim(
            logits_BWV, t - 1 - start, axis=1, keepdims=False
        )
        key, sub = jax.random.split(key)
        next_B = sample_logits(sub, logits_BV, temperature, top_k).astype(jnp.int32)
        return buf_BS.at[:, t].set(next_B), key

    buf_BS, _ = jax.lax.fori_loop(P, total, step, (buf_BS, key))
    return buf_BS


def sample(apply_fn, params, model_cfg: ModelConfig, prompt_ids, cfg: SampleConfig):
    """Returns [num_samples, len(prompt) + max_new_tokens] token ids for one prompt."""
    prompt_BP = jnp.tile(jnp.asarray(prompt_ids, jnp.int32)[None], (cfg.num_samples, 1))
    return generate(
        apply_fn,
        params,
        prompt_BP,
        jax.random.PRNGKey(cfg.seed),
        block_size=model_cfg.block_size,
        max_new_tokens=cfg.max_new_tokens,
        temperature=float(cfg.temperature),
        top_k=cfg.top_k,
    )

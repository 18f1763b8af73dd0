"""Log-likelihoods of continuations: the compiled program behind task evaluations.

A request is a context and a continuation, as token ids. As
lm-evaluation-harness scores it, the model reads the last block_size + 1
tokens of context + continuation less the last one, and the continuation's
log-likelihood is the sum of the log-probabilities of its tokens at the
positions that predict them (a continuation longer than the window is cut to
it); it is "greedy" when each of its tokens is also the model's likeliest
there. Rows are padded on the right (causality hides the padding) to one of a
few lengths (`lengths`), so a handful of compiled programs serve every request.

Shapes: B rows, T padded length, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxgpt import sharding, tokenizer
from jaxgpt.config import ConfigError, ModelConfig
from jaxgpt.hub import tokenizer_io
from jaxgpt.lecture import make_model
from jaxgpt.run import layout
from jaxgpt.run.program import param_shapes


def lengths(block_size: int) -> tuple[int, ...]:
    """The lengths rows are padded to: 32, 48, 64, 96, 128, 192, ... (a row
    takes at most 1.5x its length), up to block_size."""
    steps = {n * 2**k for n in (32, 48) for k in range(block_size.bit_length())}
    return tuple(sorted({n for n in steps if n < block_size} | {block_size}))


def padded_length(n: int, block_size: int) -> int:
    """The shortest of `lengths(block_size)` that holds n tokens."""
    return next(T for T in lengths(block_size) if T >= n)


def window(
    context: Sequence[int], continuation: Sequence[int], block_size: int
) -> tuple[list[int], list[int], int]:
    """(inputs, targets, n): the tokens the model reads, the tokens they predict,
    and how many of the last targets are the continuation's."""
    tokens = [*context, *continuation][-(block_size + 1) :]
    return tokens[:-1], tokens[1:], min(len(continuation), len(tokens) - 1)


def pack(
    windows: Sequence[tuple[list[int], list[int], int]], B: int, T: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x_BT, y_BT int32 and mask_BT bool of up to B windows, padded with zeros
    (rows past the last window score nothing)."""
    x_BT = np.zeros((B, T), np.int32)
    y_BT = np.zeros((B, T), np.int32)
    mask_BT = np.zeros((B, T), bool)
    for row, (inputs, targets, n) in enumerate(windows):
        x_BT[row, : len(inputs)] = inputs
        y_BT[row, : len(targets)] = targets
        mask_BT[row, len(targets) - n : len(targets)] = True
    return x_BT, y_BT, mask_BT


def continuation_scores(
    logits_BTV: jax.Array, y_BT: jax.Array, mask_BT: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(ll_B, greedy_B): the summed float32 log-probabilities of the masked
    targets, and whether each of them is the argmax."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    picked_BT = jnp.take_along_axis(logits_BTV, y_BT[..., None], axis=-1)[..., 0]
    logp_BT = picked_BT - jax.nn.logsumexp(logits_BTV, axis=-1)
    ll_B = jnp.sum(jnp.where(mask_BT, logp_BT, 0.0), axis=-1)
    hit_BT = jnp.argmax(logits_BTV, axis=-1) == y_BT
    return ll_B, jnp.all(hit_BT | ~mask_BT, axis=-1)


def make_score(model_cfg: ModelConfig, mesh: Mesh) -> Callable:
    """score(params, x_BT, y_BT, mask_BT) -> (ll_B, greedy_B), jitted: rows split
    over the mesh's devices, one program per (B, T)."""
    apply_fn = make_model(model_cfg).apply

    def score(params, x_BT, y_BT, mask_BT):
        params = sharding.gather(params)
        x_BT, y_BT, mask_BT = sharding.split_batch((x_BT, y_BT, mask_BT))
        logits_BTV = apply_fn({"params": params}, x_BT, deterministic=True)
        return continuation_scores(logits_BTV, y_BT, mask_BT)

    params = layout.state_shardings(param_shapes(model_cfg), mesh)
    rows = layout.batch_sharding(mesh)
    return layout.jit_on_mesh(
        score,
        mesh,
        in_shardings=(params, rows, rows, rows),
        out_shardings=layout.replicated(mesh),
    )


# --- Text to tokens ---------------------------------------------------------------


def prefix_token(tok) -> int:
    """The token a text with no context is scored after, as the harness's HFLM
    takes it: the tokenizer's bos (else its eos), else (jaxgpt's char and
    learned tokenizers may have none) the newline's, else 0."""
    for token_id in (tok.bos_id, tok.eos_id):
        if token_id is not None:
            return token_id
    newline = encoder(tok)("\n")
    return newline[0] if len(newline) == 1 else 0


def encoder(tok, add_bos_token: bool | None = None) -> Callable[..., list[int]]:
    """encode(text, special=None) -> token ids, as the harness's HFLM encodes
    with the model's transformers tokenizer (its add_bos_token too), and
    never failing.

    special=None: the tokenizer's own special tokens (a Hugging Face
    tokenizer's post-processor, e.g. Llama's <s>; jaxgpt's own add none);
    with add_bos_token=True, bos then the text, with add_bos_token=False the
    text alone (transformers rebuilds the post-processor so). special=False:
    the text alone. Special-token strings in the text become their ids (as
    Hugging Face's tokenizers read them); a character outside a char
    tokenizer's vocabulary becomes its space (else its first character).
    """
    if add_bos_token and tok.bos_id is None:
        raise ConfigError(
            f"add_bos_token=True: the model's {tok.name!r} tokenizer has no"
            " beginning-of-text token; leave add_bos_token out."
        )
    own = None  # The tokenizer's own encode, where it adds special tokens.
    if isinstance(tok, tokenizer.CharTokenizer):
        stoi, unknown = tok.stoi, tok.stoi.get(" ", 0)

        def plain(text: str) -> list[int]:
            return [stoi.get(ch, unknown) for ch in text]

    elif isinstance(tok, tokenizer_io.BPETokenizer):

        def plain(text: str) -> list[int]:
            return tok.encode(text, allowed_special="all").tolist()

    else:  # Hugging Face's (they read special-token strings themselves).

        def plain(text: str) -> list[int]:
            return tokenizer_io.encode_plain(tok, text).tolist()

        def own(text: str) -> list[int]:
            return tok.encode(text).tolist()

    def encode(text: str, special: bool | None = None) -> list[int]:
        if special is False or add_bos_token is False:
            return plain(text)
        if add_bos_token:
            return [tok.bos_id, *plain(text)]
        return plain(text) if own is None else own(text)

    return encode

"""Decoding many requests at once: each row its own prompt, options and seed.

generate.py continues one prompt in every row of a batch; here each of R rows
(slots) holds a request of its own. `Decoder.start_rows` prefills rows (the
prompts of one padded length W together: a compiled program per W and row
count), and `Decoder.step` draws the next token of every row in one jitted
call: the model vmapped over the rows, so each row keeps its own KV cache,
position and key, and a row's tokens depend on its prompt and options only,
never on the other rows (the same seed gives the same reply alone or beside
others). Models without a KV cache (the lecture's) re-run the model on each
row's window instead.

A row ends at the model's context (block_size): prompt plus reply never
exceed it. `decode` runs a list of prompts to the end through one Decoder;
jaxgpt.chat.engine runs requests that come and go.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import ModelConfig
from jaxgpt.generate import cache_options


@dataclasses.dataclass(frozen=True)
class RowOptions:
    """How one row samples: new tokens at most, temperature (0: greedy), top-p,
    top-k (0: all) and the seed of its key: jax.random.PRNGKey(seed mod 2**32),
    token i drawn with fold_in(key, i)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0


def first_max(x_V: jax.Array) -> jax.Array:
    """jnp.argmax(x_V) (the first of equal maxima) in two plain reductions,
    5x faster on a CPU for a 50,257-token vocabulary."""
    V = x_V.shape[-1]
    return jnp.min(jnp.where(x_V == x_V.max(), jnp.arange(V), V - 1))


def draw(logits_V, key, i, temperature):
    """Token i of a row: the argmax of logits_V at temperature 0, else of
    logits_V / temperature plus Gumbel noise from fold_in(key, i) (a draw from
    their softmax, as jax.random.categorical's; one argmax serves both)."""
    noise_V = jax.random.gumbel(jax.random.fold_in(key, i), logits_V.shape)
    scaled_V = logits_V.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    picked_V = jnp.where(temperature == 0, logits_V, scaled_V + noise_V)
    return first_max(picked_V).astype(jnp.int32)


NEAR = 256  # top_k up to this reads only the likeliest NEAR tokens (no sort).


def cutoff(sorted_N, top_p, top_k):
    """The least likely value kept among sorted_N (the likeliest values, in
    order): the top_k likeliest (0: all), then the likeliest of those holding
    top_p of their mass (as generate.filter_logits; ties kept)."""
    N = sorted_N.shape[0]
    kept_N = jnp.arange(N) < jnp.where(top_k > 0, top_k, N)  # A prefix.
    probs_N = jax.nn.softmax(jnp.where(kept_N, sorted_N, -jnp.inf))
    before_N = jnp.cumsum(probs_N) - probs_N  # The mass of the likelier tokens.
    kept_N &= (before_N < top_p) | (top_p >= 1.0)
    return sorted_N[jnp.sum(kept_N) - 1]


def draw_row(logits_V, key, i, temperature, top_p, top_k, every=False):
    """draw() among the tokens that top_k and top_p keep. A top_k of 1 to NEAR
    needs only jax.lax.top_k's NEAR likeliest, 40x faster than sorting a
    50,257-token vocabulary; `every`: also sort all tokens, for the rows whose
    top_k is 0 (with top_p < 1) or above NEAR."""
    scaled_V = logits_V.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    kept = cutoff(jax.lax.top_k(scaled_V, min(NEAR, len(scaled_V)))[0], top_p, top_k)
    if every:
        wide = (top_k == 0) | (top_k > NEAR)
        kept = jnp.where(wide, cutoff(jnp.flip(jnp.sort(scaled_V)), top_p, top_k), kept)
    kept = jnp.where((top_p < 1) | (top_k > 0), kept, -jnp.inf)  # Else: all.
    return draw(jnp.where(scaled_V < kept, -jnp.inf, logits_V), key, i, temperature)


def draw_rows(logits_RV, key_R, i_R, opts_R):
    """Every row's draw_row, with the least work that draws the same tokens:
    no filter when no row asks top_k or top_p, no sort unless one needs it."""
    temperature_R, top_p_R, top_k_R = opts_R
    filtered_R = (top_p_R < 1) | (top_k_R > 0)
    wide_R = ((top_k_R == 0) | (top_k_R > NEAR)) & filtered_R
    branch = jnp.where(jnp.any(wide_R), 2, jnp.where(jnp.any(filtered_R), 1, 0))
    return jax.lax.switch(
        branch,
        [
            lambda: jax.vmap(draw)(logits_RV, key_R, i_R, temperature_R),
            lambda: jax.vmap(draw_row)(logits_RV, key_R, i_R, *opts_R),
            lambda: jax.vmap(partial(draw_row, every=True))(
                logits_RV, key_R, i_R, *opts_R
            ),
        ],
    )


@partial(jax.jit, static_argnames=("apply_fn",))
def prefill(apply_fn: Callable, params, ids_NW, n_N, key_N, opts_N):
    """N rows' first n tokens (ids_NW padded past n; the causal mask hides the
    padding, which later tokens overwrite), the model vmapped over the rows:
    each row's first new token, and the rows' caches."""

    def one(ids_W, n):
        logits_11V, new = apply_fn(
            {"params": params},
            ids_W[None],
            decode=True,
            mutable="cache",
            logits_at=n - 1,
        )
        return logits_11V[0, 0], {**new["cache"], "index": n.astype(jnp.int32)}

    logits_NV, cache_N = jax.vmap(one)(ids_NW, n_N)
    return draw_rows(logits_NV, key_N, jnp.zeros_like(n_N), opts_N), cache_N


@partial(jax.jit, donate_argnums=0)
def put_rows(cache_R, rows_N: jax.Array, cache_N):
    """The batch's caches with rows rows_N replaced by cache_N (a row past the
    batch's: dropped)."""
    return jax.tree.map(
        lambda all_R, new_N: all_R.at[rows_N].set(new_N, mode="drop"), cache_R, cache_N
    )


@partial(jax.jit, static_argnames=("apply_fn",), donate_argnums=2)
def cache_step(
    apply_fn: Callable, params, cache_R, index_R, last_R, key_R, i_R, opts_R
):
    """Every row fed its last token at position index_R (free rows: 0, so that
    attention reads only the slots busy rows use): each row's next token, and
    the caches."""

    def one(cache, token):
        logits_11V, new = apply_fn(
            {"params": params, "cache": cache},
            token[None, None],
            decode=True,
            mutable="cache",
        )
        return logits_11V[0, -1], new["cache"]

    logits_RV, cache_R = jax.vmap(one)({**cache_R, "index": index_R}, last_R)
    return draw_rows(logits_RV, key_R, i_R, opts_R), cache_R


@partial(jax.jit, static_argnames=("apply_fn",))
def window_step(apply_fn: Callable, params, window_RS, pos_R, key_R, i_R, opts_R):
    """No cache: the model re-run on every row's window; each row's next token
    from the logits at its last position pos - 1."""
    logits_RSV = apply_fn({"params": params}, window_RS, deterministic=True)
    logits_RV = jnp.take_along_axis(logits_RSV, (pos_R - 1)[:, None, None], 1)[:, 0]
    return draw_rows(logits_RV, key_R, i_R, opts_R)


def padded_length(n: int, context: int) -> int:
    """A prefill's length for an n-token prompt: the next power of two from 16,
    at most the context (a handful of compiled prefills serve every prompt)."""
    return min(context, max(16, 1 << (n - 1).bit_length()))


PREFILL_BYTES = 1 << 28  # The new caches one prefill call holds, at most,
PREFILL_ROWS = 16  # and its rows (a power of two).


def padded_rows(n: int) -> int:
    """A prefill's row count for n prompts: a power of two up to 8, then a
    multiple of 8 (few compiled prefills; at most 7 rows of padding)."""
    return 1 << (n - 1).bit_length() if n <= 8 else -(-n // 8) * 8


class Decoder:
    """`rows` slots decoding together: start() prefills a row and returns its
    first new token (start_rows: several rows); step() draws the next token of
    every row (free rows' values are to be ignored); free() releases a row."""

    def __init__(self, apply_fn: Callable, params, model_cfg: ModelConfig, rows: int):
        self.apply_fn, self.params, self.rows = apply_fn, params, rows
        self.context = S = model_cfg.block_size
        self.kv_cache = cache_options(model_cfg)["kv_cache"]
        self.last_R = np.zeros(rows, np.int32)  # Each row's newest token.
        self.pos_R = np.full(rows, S, np.int32)  # Its tokens fed (prompt included).
        self.i_R = np.zeros(rows, np.int32)  # Its new tokens so far.
        self.key_R = np.zeros((rows, 2), np.uint32)
        self.opts_R = (
            np.zeros(rows, np.float32),  # temperature (free rows: greedy, fast)
            np.ones(rows, np.float32),  # top_p
            np.zeros(rows, np.int32),  # top_k
        )
        if self.kv_cache:
            ids = jax.ShapeDtypeStruct((1, S), jnp.int32)
            args = (
                ids,
                self.i_R[:1],
                self.key_R[:1],
                tuple(c[:1] for c in self.opts_R),
            )
            _, cache = jax.eval_shape(partial(prefill, apply_fn), params, *args)
            self.cache_R = jax.tree.map(
                lambda x: jnp.zeros((rows, *x.shape[1:]), x.dtype), cache
            )
            row_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
            fit = max(1, min(PREFILL_ROWS, PREFILL_BYTES // row_bytes))
            self.prefill_rows = 1 << (fit.bit_length() - 1)  # GPT-2's shape: 2.
        else:
            self.window_RS = np.zeros((rows, S), np.int32)

    def start(self, row: int, prompt_ids: Sequence[int], opts: RowOptions) -> int:
        """Prefills `row` with the prompt (1 .. context - 1 tokens); returns the
        row's first new token."""
        return self.start_rows([row], [prompt_ids], [opts])[0]

    def start_rows(
        self,
        rows: Sequence[int],
        prompts: Sequence[Sequence[int]],
        opts: Sequence[RowOptions],
    ) -> list[int]:
        """start() of several rows: the prompts of one padded length in one
        prefill of up to prefill_rows rows (their count padded by padded_rows),
        as many as PREFILL_BYTES of new caches allow."""
        S = self.context
        for n in map(len, prompts):
            if not 0 < n < S:
                raise ValueError(f"a prompt of {n} tokens: give 1 to {S - 1} tokens.")
        if not rows:
            return []
        for row, prompt_ids, o in zip(rows, prompts, opts, strict=True):
            self.pos_R[row], self.i_R[row] = len(prompt_ids), 0
            self.key_R[row] = 0, o.seed % 2**32  # PRNGKey's, without a call.
            for column, value in zip(self.opts_R, (o.temperature, o.top_p, o.top_k)):
                column[row] = value
        first = dict.fromkeys(rows, 0)
        if self.kv_cache:
            groups: dict[int, list[int]] = {}  # Padded length -> indices into rows.
            for k, prompt_ids in enumerate(prompts):
                groups.setdefault(padded_length(len(prompt_ids), S), []).append(k)
            calls = [  # At most prefill_rows at once: their caches' memory.
                (W, ks[i : i + self.prefill_rows])
                for W, ks in groups.items()
                for i in range(0, len(ks), self.prefill_rows)
            ]
            for W, ks in calls:
                N = padded_rows(len(ks))  # Padding rows: dropped.
                rows_N = np.full(N, self.rows, np.int32)
                rows_N[: len(ks)] = [rows[k] for k in ks]
                ids_NW, n_N = np.zeros((N, W), np.int32), np.ones(N, np.int32)
                for j, k in enumerate(ks):
                    n_N[j] = len(prompts[k])
                    ids_NW[j, : n_N[j]] = prompts[k]
                at_N = np.minimum(rows_N, self.rows - 1)
                tokens_N, cache_N = prefill(
                    self.apply_fn,
                    self.params,
                    ids_NW,
                    n_N,
                    self.key_R[at_N],
                    tuple(c[at_N] for c in self.opts_R),
                )
                self.cache_R = put_rows(self.cache_R, rows_N, cache_N)
                first.update(
                    zip(rows_N[: len(ks)].tolist(), np.asarray(tokens_N).tolist())
                )
        else:
            for row, prompt_ids in zip(rows, prompts):
                self.window_RS[row] = 0
                self.window_RS[row, : len(prompt_ids)] = prompt_ids
            tokens_R = self._window_step()
            first = {row: int(tokens_R[row]) for row in rows}
        for row in rows:
            self.last_R[row], self.i_R[row] = first[row], 1
        return [first[row] for row in rows]

    def step(self) -> np.ndarray:
        """[rows] int32: every row's next token (each row fed its last one)."""
        fed_R = self.pos_R < self.context  # Full rows: ignored until started again.
        if self.kv_cache:
            tokens_R, self.cache_R = cache_step(
                self.apply_fn,
                self.params,
                self.cache_R,
                np.where(fed_R, self.pos_R, 0),
                self.last_R,  # (numpy: jit copies it in, faster than jnp.asarray)
                self.key_R,
                self.i_R,
                self.opts_R,
            )
            self.pos_R += fed_R
        else:
            rows = np.flatnonzero(fed_R)
            self.window_RS[rows, self.pos_R[rows]] = self.last_R[rows]
            self.pos_R += fed_R
            tokens_R = self._window_step()
        self.last_R, self.i_R = np.array(tokens_R, np.int32), self.i_R + 1
        return self.last_R.copy()

    def free(self, row: int) -> None:
        """Row `row` holds no request (its tokens until started again: ignore)."""
        self.pos_R[row] = self.context
        self.opts_R[0][row] = 0.0  # Greedy: all-greedy steps skip the sampling.
        self.opts_R[1][row], self.opts_R[2][row] = 1.0, 0  # Unfiltered: no sort.

    def room(self, row: int) -> int:
        """New tokens `row` can still draw before prompt and reply fill the context."""
        return max(0, int(self.context - self.pos_R[row] - 1))

    def _window_step(self) -> np.ndarray:
        return np.asarray(
            window_step(
                self.apply_fn,
                self.params,
                self.window_RS,
                np.maximum(self.pos_R, 1),
                self.key_R,
                self.i_R,
                self.opts_R,
            )
        )


def decode(
    apply_fn: Callable,
    params,
    model_cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    opts: RowOptions | Sequence[RowOptions],
    stop_ids: Sequence[int] = (),
    rows: int | None = None,
) -> list[list[int]]:
    """Every prompt's new tokens: up to and including the first of stop_ids,
    or its options' max_tokens, or the context's end. Decoded `rows` at a time
    (default: all at once), a row taking the next prompt as soon as it is free."""
    if isinstance(opts, RowOptions):
        opts = [opts] * len(prompts)
    decoder = Decoder(apply_fn, params, model_cfg, rows or max(1, len(prompts)))
    out: list[list[int]] = [[] for _ in prompts]
    waiting = list(range(len(prompts)))[::-1]
    active: dict[int, int] = {}  # row -> prompt

    def took(row: int, token: int) -> None:
        k = active[row]
        out[k].append(token)
        done = len(out[k]) >= opts[k].max_tokens or not decoder.room(row)
        if token in stop_ids or done:
            del active[row]
            decoder.free(row)

    while waiting or active:
        free = [row for row in range(decoder.rows) if row not in active]
        starting = {row: waiting.pop() for row in free[: len(waiting)]}
        active.update(starting)
        ks = list(starting.values())
        firsts = decoder.start_rows(
            list(starting), [prompts[k] for k in ks], [opts[k] for k in ks]
        )
        for row, token in zip(starting, firsts):
            took(row, token)
        if active:
            tokens_R = decoder.step()
            for row in list(active):
                took(row, int(tokens_R[row]))
    return out

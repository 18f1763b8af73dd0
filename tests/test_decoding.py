"""run/decoding.py: rows that decode together each get what they get alone."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import generate, lecture
from jaxgpt import model as model_lib
from jaxgpt.config import ModelConfig
from jaxgpt.run import decoding
from jaxgpt.run.decoding import RowOptions

GPT = ModelConfig(vocab_size=23, block_size=32, n_layer=2, n_head=2, n_embd=16)
ROPE = ModelConfig(
    vocab_size=23, block_size=32, n_layer=1, n_head=2, n_embd=16, position="rope",
    norm="rmsnorm", mlp="swiglu", n_kv_head=1, scan_layers=True, bias=False,
)  # fmt: skip
LECTURE = ModelConfig(
    vocab_size=23, block_size=16, n_layer=1, n_head=2, n_embd=16,
    model="lecture_heads",
)  # fmt: skip
PROMPTS = [[1, 2, 3], [4] * 11, [5, 6], list(range(1, 18))]


def model(cfg):
    return lecture.apply_of(cfg), lecture.init_params(cfg, jax.random.PRNGKey(1))


@pytest.mark.parametrize("cfg", [GPT, ROPE, LECTURE], ids=["gpt2", "llama", "lecture"])
def test_greedy_rows_equal_generate_alone(cfg):
    """Greedy replies of prompts of different lengths decoded together run to
    the context's end, and equal generate.generate on each prompt alone (one
    program: the prompts padded to one width, each with its prompt_len)."""
    apply_fn, params = model(cfg)
    prompts = [p[: cfg.block_size - 4] for p in PROMPTS]
    out = decoding.decode(apply_fn, params, cfg, prompts, RowOptions(100, 0.0))
    assert [len(new) for new in out] == [cfg.block_size - len(p) for p in prompts]
    P = max(map(len, prompts))
    N = cfg.block_size - P  # Every reply has at least N tokens.
    for prompt, new in zip(prompts, out):
        padded = (
            jnp.zeros((1, P), jnp.int32).at[0, : len(prompt)].set(jnp.asarray(prompt))
        )
        want = generate.generate(
            apply_fn, params, padded, jax.random.PRNGKey(0),
            block_size=cfg.block_size, max_new_tokens=N, temperature=0.0,
            prompt_len=jnp.int32(len(prompt)), **generate.cache_options(cfg),
        )  # fmt: skip
        assert new[:N] == np.asarray(want)[0, len(prompt) : len(prompt) + N].tolist()


def test_sampled_rows_do_not_depend_on_their_neighbours():
    """Each row's seed decides its tokens: alone, beside others, in another row
    of the batch, with fewer rows than prompts; stop ids and max_tokens end rows."""
    apply_fn, params = model(GPT)
    opts = [
        RowOptions(12, 1.0, seed=7),
        RowOptions(9, 0.8, top_p=0.9, seed=8),
        RowOptions(12, 1.3, top_k=3, seed=9),
        RowOptions(5, 0.0),
    ]
    together = decoding.decode(apply_fn, params, GPT, PROMPTS, opts, rows=4)
    alone = [
        decoding.decode(apply_fn, params, GPT, [p], [o], rows=4)[0]
        for p, o in zip(PROMPTS, opts)
    ]
    assert together == alone
    reordered = decoding.decode(
        apply_fn, params, GPT, PROMPTS[::-1], opts[::-1], rows=4
    )
    assert reordered == together[::-1]
    assert [len(t) for t in together] == [12, 9, 12, 5]
    assert len(set(map(tuple, together[:3]))) == 3  # Different seeds, different draws.
    two_rows = decoding.decode(apply_fn, params, GPT, PROMPTS, opts, rows=2)
    assert two_rows == together
    stop = together[0][4]
    stopped = decoding.decode(apply_fn, params, GPT, PROMPTS[:1], opts[:1], [stop])[0]
    assert stopped == together[0][: together[0].index(stop) + 1]


def test_rows_cross_the_caches_chunks_at_their_own_pace(monkeypatch):
    """Chunks of 8 slots in a context of 44: rows decoded together read as many
    chunks as the longest row needs, and still draw what they draw alone; greedy
    rows draw what one chunk of all 44 slots gives."""
    cfg = dataclasses.replace(GPT, block_size=44)
    apply_fn, params = model(cfg)
    greedy = decoding.decode(apply_fn, params, cfg, PROMPTS, RowOptions(20, 0.0))
    whole, traced = model_lib.cached_attention, []

    def in_chunks_of_8(*args):
        traced.append(args[1].shape)
        return whole(*args, C=8)

    with monkeypatch.context() as patch:
        patch.setattr(model_lib, "cached_attention", in_chunks_of_8)
        fresh = partial(apply_fn)  # A new static argument: traced anew, in chunks.
        opts = [RowOptions(20, 1.0, seed=s) for s in range(len(PROMPTS))]
        together = decoding.decode(fresh, params, cfg, PROMPTS, opts, rows=4)
        alone = [
            decoding.decode(fresh, params, cfg, [p], [o], rows=4)[0]
            for p, o in zip(PROMPTS, opts)
        ]
        chunked = decoding.decode(fresh, params, cfg, PROMPTS, RowOptions(20, 0.0))
    assert traced and together == alone
    assert chunked == greedy


def test_top_k_and_top_p_keep_only_the_likeliest():
    """draw_row samples only among top_k tokens, and top_p's nucleus."""
    logits_V = jnp.log(jnp.asarray([0.5, 0.3, 0.15, 0.05]))
    key = jax.random.PRNGKey(0)
    draws = lambda t, p, k: {
        int(decoding.draw_row(logits_V, key, i, t, p, k)) for i in range(200)
    }
    assert draws(1.0, 1.0, 0) == {0, 1, 2, 3}
    assert draws(1.0, 1.0, 2) == {0, 1}
    assert draws(1.0, 0.7, 0) == {0, 1}  # 0.5 < 0.7 <= 0.8.
    assert draws(1.0, 0.5, 0) == {0}
    assert draws(0.0, 1.0, 0) == {0}


def test_rows_draw_the_same_whatever_their_neighbours_ask():
    """draw_rows' three ways (no filter; top_k up to NEAR from the likeliest
    NEAR; a full sort) draw the same token for a row, alone or beside rows that
    need another way, and only among the tokens a sort would keep."""
    V = decoding.NEAR + 300
    logits_RV = 3 * jax.random.normal(jax.random.PRNGKey(1), (5, V))
    opts = [
        (1.0, 1.0, 0),
        (0.7, 0.9, 40),
        (1.0, 0.5, 0),
        (1.2, 1.0, V - 9),
        (0.0, 1.0, 0),
    ]
    cols = tuple(jnp.asarray(c) for c in zip(*opts))
    key_R = jax.vmap(jax.random.PRNGKey)(jnp.arange(5))
    draw = jax.jit(decoding.draw_rows)
    for i in range(3):
        i_R = jnp.full(5, i)
        together = draw(logits_RV, key_R, i_R, cols)
        for r, (t, p, k) in enumerate(opts):
            one = (jnp.asarray([t]), jnp.asarray([p]), jnp.asarray([k]))
            alone = draw(logits_RV[r : r + 1], key_R[r : r + 1], i_R[:1], one)
            assert int(alone[0]) == int(together[r]), (i, r)
            order = np.argsort(-np.asarray(logits_RV[r]), kind="stable")
            probs = np.exp(np.sort(np.asarray(logits_RV[r]) / (t or 1))[::-1])
            probs = probs[: k or V] / probs[: k or V].sum()
            n_kept = max(1, int(np.sum(np.cumsum(probs) - probs < p))) if t else 1
            assert int(together[r]) in order[:n_kept], (i, r)


@pytest.mark.parametrize(
    "T,start",
    [(1, 3), (1, 8), (5, 0), (1, 13)],
    ids=["early", "step", "prefill", "ring"],
)
def test_cached_attention_reads_the_cache_in_chunks(T, start):
    """model.cached_attention over chunks of C slots (the last one overlapping
    the one before when C does not divide S) equals plain softmax attention
    over the slots each query sees; chunks past the slots in use change no bit."""
    B, H, K, D, S = 2, 4, 2, 8, 10
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), s) for i, s in
               enumerate([(B, T, H, D), (B, K, S, D), (B, K, S, D)]))  # fmt: skip
    q_pos_T = start + jnp.arange(T)
    slot_S = jnp.arange(S)  # Slot s holds the last position p < start + T, p % S = s.
    k_pos_S = slot_S + S * ((start + T - 1 - slot_S) // S)
    k_pos_S = jnp.where(k_pos_S >= 0, k_pos_S, jnp.iinfo(jnp.int32).max)
    used = min(start + T, S)
    got = model_lib.cached_attention(q, k, v, q_pos_T, k_pos_S, used, C=4)
    k_BSHD, v_BSHD = (
        jnp.repeat(z, H // K, axis=1).transpose(0, 2, 1, 3) for z in (k, v)
    )
    att_BHTS = jnp.einsum("bthd,bshd->bhts", q, k_BSHD) / np.sqrt(D)
    att_BHTS = jnp.where(q_pos_T[:, None] >= k_pos_S, att_BHTS, -jnp.inf)
    want = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(att_BHTS), v_BSHD)
    np.testing.assert_allclose(got, want, atol=1e-6)
    more = model_lib.cached_attention(q, k, v, q_pos_T, k_pos_S, S, C=4)
    np.testing.assert_array_equal(got, more)


def test_a_rows_key_is_jax_prngkey_of_its_seed():
    apply_fn, params = model(GPT)
    decoder = decoding.Decoder(apply_fn, params, GPT, rows=1)
    for seed in (0, 7, 2**31 + 5, -3, 2**40 + 9):
        decoder.start(0, [1, 2], RowOptions(1, seed=seed))
        want = jax.random.PRNGKey(seed % 2**32)
        np.testing.assert_array_equal(decoder.key_R[0], want)


def test_a_prompt_that_fills_the_context_is_refused():
    apply_fn, params = model(GPT)
    decoder = decoding.Decoder(apply_fn, params, GPT, rows=1)
    with pytest.raises(ValueError, match="give 1 to 31 tokens"):
        decoder.start(0, list(range(32)), RowOptions(1))

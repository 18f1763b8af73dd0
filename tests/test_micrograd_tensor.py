"""The tensor engine, AdamW, the bigram script: against jax/optax (float64), by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt import data
from jaxgpt.micrograd import bigram, gradcheck
from jaxgpt.micrograd import tensor as T
from jaxgpt.micrograd.optim import AdamW
from jaxgpt.micrograd.tensor import Tensor, no_grad, unbroadcast

# ---- every op across broadcasting shapes --------------------------------------------


@pytest.mark.parametrize("case", gradcheck.tensor_cases(), ids=lambda c: c.name)
def test_op_matches_jax(case):
    report = case.run()
    assert report.ok, str(report)


def test_unbroadcast_sums_over_broadcast_axes():
    g = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(unbroadcast(g, (3, 1)), g.sum(1, keepdims=True))
    np.testing.assert_array_equal(unbroadcast(g, (4,)), g.sum(0))
    np.testing.assert_array_equal(unbroadcast(g, ()), g.sum())
    np.testing.assert_array_equal(
        unbroadcast(np.ones((2, 3, 4)), (1, 4)), np.full((1, 4), 6.0)
    )


def test_broadcast_add_by_hand():
    a, b = Tensor(np.zeros((3, 1))), Tensor(np.zeros((1, 4)))
    (a + b).sum().backward()
    np.testing.assert_array_equal(a.grad, np.full((3, 1), 4.0))  # Each a used 4 times.
    np.testing.assert_array_equal(b.grad, np.full((1, 4), 3.0))


def test_tensor_reused_twice_and_backward_accumulates():
    x = Tensor([1.0, -2.0, 3.0])
    y = (x * x + x).sum()  # d/dx = 2x + 1
    y.backward()
    np.testing.assert_array_equal(x.grad, [3.0, -3.0, 7.0])
    y.backward()
    np.testing.assert_array_equal(x.grad, [6.0, -6.0, 14.0])
    x.zero_grad()
    np.testing.assert_array_equal(x.grad, 0.0)


# ---- softmax and cross-entropy -----------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 30.0, 1000.0])
def test_softmax_cross_entropy_against_jax_nn_and_optax(scale):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 5, 7)) * scale
    targets = rng.integers(0, 7, size=(4, 5))
    x = Tensor(logits)
    loss = T.cross_entropy(x, targets)
    loss.backward()
    with jax.enable_x64(True):
        ref = optax.softmax_cross_entropy_with_integer_labels(
            jnp.asarray(logits), targets
        )
        P = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
        ref_loss = float(ref.mean())
    Y = np.eye(7)[targets]
    N = targets.size
    assert np.isfinite(loss.item())
    np.testing.assert_allclose(loss.item(), ref_loss, rtol=1e-12)
    np.testing.assert_allclose(x.grad, (P - Y) / N, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        T.softmax(Tensor(logits)).data, P, rtol=1e-9, atol=1e-300
    )


def test_softmax_rows_sum_to_one_without_overflow():
    s = T.softmax(Tensor([[1e4, 0.0, -1e4], [3.0, 3.0, 3.0]])).data
    np.testing.assert_allclose(s.sum(-1), 1.0)
    np.testing.assert_allclose(s, [[1.0, 0.0, 0.0], [1 / 3] * 3])


def test_cross_entropy_of_uniform_logits_is_log_c():
    loss = T.cross_entropy(Tensor(np.zeros((3, 8))), np.array([0, 5, 7]))
    assert loss.item() == pytest.approx(np.log(8))


# ---- embedding and layer norm ------------------------------------------------------


def test_embedding_gradient_scatters_repeated_rows():
    table = Tensor(np.arange(12.0).reshape(4, 3))
    idx = np.array([[2, 2, 0], [2, 3, 0]])
    out = T.embedding(table, idx)
    np.testing.assert_array_equal(out.data, table.data[idx])
    out.sum().backward()
    counts = np.bincount(idx.ravel(), minlength=4)  # Row r receives one g per use.
    np.testing.assert_array_equal(table.grad, np.repeat(counts[:, None], 3, axis=1))


def test_layer_norm_normalizes():
    x = np.random.default_rng(0).normal(3.0, 5.0, size=(4, 16))
    y = T.layer_norm(Tensor(x), eps=0.0).data
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.std(-1), 1.0, rtol=1e-12)


# ---- no_grad and errors ------------------------------------------------------------


def test_no_grad_builds_no_graph():
    x = Tensor(np.ones((2, 2)))
    with no_grad():
        y = (x @ x).tanh().sum()
    y.backward()
    np.testing.assert_array_equal(x.grad, 0.0)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (
            lambda: Tensor([1.0, 2.0]) @ Tensor([1.0, 2.0]),
            ValueError,
            "reshape a vector",
        ),
        (
            lambda: Tensor(np.ones((2, 3))) @ Tensor(np.ones((2, 3))),
            ValueError,
            "inner",
        ),
        (lambda: Tensor(np.ones((2, 3))).backward(), ValueError, "needs grad="),
        (lambda: Tensor([0.0, 1.0]).log(), ValueError, "non-positive"),
        (lambda: Tensor([1.0]) / Tensor([0.0]), ZeroDivisionError, "epsilon"),
        (lambda: Tensor([-1.0]) ** 0.5, ValueError, "integer exponent"),
        (lambda: Tensor([1.0]) ** Tensor([2.0]), TypeError, "constant"),
        (
            lambda: T.cross_entropy(Tensor(np.ones((2, 3))), np.array([0, 3])),
            ValueError,
            r"\[0, 3\)",
        ),
        (
            lambda: T.cross_entropy(Tensor(np.ones((2, 3))), np.array([0.0, 1.0])),
            TypeError,
            "integers",
        ),
        (
            lambda: T.cross_entropy(Tensor(np.ones((2, 3))), np.array([0])),
            ValueError,
            "shape",
        ),
        (
            lambda: T.embedding(Tensor(np.ones((2, 3))), np.array([2])),
            IndexError,
            r"\[0, 2\)",
        ),
        (lambda: Tensor(np.ones((2, 3))).sum(axis=2), ValueError, "out of range"),
    ],
)
def test_invalid_operations_raise_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


# ---- AdamW against optax -----------------------------------------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_optax(weight_decay):
    rng = np.random.default_rng(0)
    p0, target = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    p = Tensor(p0.copy())
    opt = AdamW([p], lr=0.05, b1=0.9, b2=0.99, eps=1e-8, weight_decay=weight_decay)
    for _ in range(5):
        opt.zero_grad()
        ((p - target) ** 2 * (p * 0.5).tanh()).sum().backward()
        opt.step()
    with jax.enable_x64(True):
        tx = optax.adamw(0.05, b1=0.9, b2=0.99, eps=1e-8, weight_decay=weight_decay)
        q = jnp.asarray(p0)
        state = tx.init(q)

        def loss(q):
            return ((q - target) ** 2 * jnp.tanh(q * 0.5)).sum()

        for _ in range(5):
            updates, state = tx.update(jax.grad(loss)(q), state, q)
            q = optax.apply_updates(q, updates)
        q = np.asarray(q)
    assert not np.allclose(p.data, p0)
    np.testing.assert_allclose(p.data, q, rtol=1e-10, atol=1e-12)


# ---- the bigram script -------------------------------------------------------------


def test_encode_and_batches():
    vocab, tokens = bigram.encode("hello world")
    assert list(vocab) == sorted(set("hello world"))
    assert "".join(vocab[t] for t in tokens) == "hello world"
    rng = np.random.default_rng(0)
    x, y = data.get_batch(np.arange(100), rng, batch_size=5, block_size=7)
    assert x.shape == y.shape == (5, 7)
    np.testing.assert_array_equal(y, x + 1)  # y is x shifted by one token.
    np.testing.assert_array_equal(np.diff(x, axis=1), 1)  # Contiguous windows.
    assert y.max() <= 99


def test_bigram_training_matches_jax_and_optax(corpus_text):
    """Same init and batches: this engine + AdamW ends where jax.grad + optax do."""
    text = corpus_text[:20_000]
    argv = [
        "--steps=25",
        "--batch_size=8",
        "--block_size=6",
        "--learning_rate=3e-2",
        "--weight_decay=0.1",
        "--eval_iters=2",
        "--eval_interval=25",
        "--seed=5",
    ]
    args = bigram.parse_args(argv)
    table, losses = bigram.train(text, args, log=lambda s: None)

    vocab, tokens = bigram.encode(text)
    train_tokens = tokens[: int(0.9 * len(tokens))]
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        q = jnp.asarray(rng.normal(0.0, 0.02, size=(len(vocab), len(vocab))))
        tx = optax.adamw(3e-2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1)
        state = tx.init(q)

        def loss_fn(q, x, y):
            return optax.softmax_cross_entropy_with_integer_labels(q[x], y).mean()

        for _ in range(25):
            x, y = data.get_batch(train_tokens, rng, 8, 6)
            updates, state = tx.update(jax.grad(loss_fn)(q, x, y), state, q)
            q = optax.apply_updates(q, updates)
        q = np.asarray(q)
    np.testing.assert_allclose(table.data, q, rtol=1e-8, atol=1e-12)
    assert set(losses) == {"train", "val"}
    assert losses["train"] < np.log(
        len(vocab)
    )  # Better than the initial ~uniform guess.


def test_bigram_main_on_a_file(tmp_path, capsys, corpus_text):
    path = tmp_path / "input.txt"
    path.write_text(corpus_text[:30_000], encoding="utf-8")
    argv = [
        f"--data_path={path}",
        "--steps=200",
        "--eval_iters=5",
        "--eval_interval=100",
    ]
    assert bigram.main(argv) == 0
    out = capsys.readouterr().out
    evals = [line for line in out.splitlines() if line.startswith("step")]
    assert [int(line.split()[1]) for line in evals] == [0, 100, 200]
    first, last = (float(line.split()[4]) for line in (evals[0], evals[-1]))
    assert last < first - 0.5
    assert "final: train loss" in out


def test_bigram_reports_a_missing_corpus(tmp_path):
    with pytest.raises(SystemExit, match="is not a file"):  # jaxgpt.data's message.
        bigram.load_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(SystemExit):
        bigram.parse_args(["--steps=0"])

"""The scalar engine and nn: against jax.grad (float64), hand computation, formulas."""

from __future__ import annotations

import itertools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from jaxgpt.micrograd import demo, gradcheck
from jaxgpt.micrograd.engine import Value, no_grad, value_sum
from jaxgpt.micrograd.nn import MLP, SGD, Neuron

# ---- every op at several points, edges included -------------------------------------


@pytest.mark.parametrize("case", gradcheck.scalar_cases(), ids=lambda c: c.name)
def test_op_matches_jax(case):
    report = case.run()
    assert report.ok, str(report)


def test_hand_computed_gradients():
    a, b = Value(2.0), Value(-3.0)
    c = a * b + a  # dc/da = b + 1, dc/db = a
    d = c / b - (a**2).log()  # dd/da = (b + 1)/b - 2/a, dd/db = -a/b^2 ... via c/b
    d.backward()
    assert d.data == pytest.approx((-6 + 2) / -3 - math.log(4))
    assert a.grad == pytest.approx((-3 + 1) / -3 - 2 / 2)
    assert b.grad == pytest.approx(2 / -3 - (-6 + 2) / 9)


def test_kink_conventions():
    """relu'(0) = 0 and leaky_relu'(0) = 1, as the module docstring and jax.nn say."""
    for fn, expected in [(Value.relu, 0.0), (lambda v: v.leaky_relu(0.3), 1.0)]:
        x = Value(0.0)
        fn(x).backward()
        assert x.grad == expected
    x = Value(-2.0)
    x.leaky_relu(0.3).backward()
    assert x.grad == 0.3


# ---- graph structure ---------------------------------------------------------------


def test_node_used_twice_gets_both_contributions():
    x = Value(3.0)
    (x * x).backward()  # d(x^2)/dx = 2x
    assert x.grad == 6.0
    x = Value(3.0)
    y = x + x
    z = y * y  # (2x)^2 = 4x^2 -> 8x; y reused twice as well
    z.backward()
    assert x.grad == 24.0
    assert y.grad == 12.0


def test_diamond_graph():
    x = Value(0.5)
    a, b = x.tanh(), x.exp()
    out = a * b + a
    out.backward()
    t, e = math.tanh(0.5), math.exp(0.5)
    assert x.grad == pytest.approx((1 - t * t) * e + t * e + (1 - t * t))


def test_backward_accumulates_and_zero_grad_resets():
    x = Value(2.0)
    y = x * x * x
    y.backward()
    y.backward()
    assert x.grad == pytest.approx(2 * 12.0)  # Exactly twice, interior nodes too.
    y.zero_grad()
    assert x.grad == 0.0 and y.grad == 0.0
    y.backward()
    assert x.grad == pytest.approx(12.0)


def test_chain_of_100k_operations_is_iterative():
    assert sys.getrecursionlimit() < 100_000  # Recursion would fail on this chain.
    x = Value(0.25)
    y = x
    for i in range(100_000):
        y = y + x if i % 2 else y * 1.0
    y.backward()
    assert y.data == pytest.approx(0.25 * 50_001)
    assert x.grad == 50_001.0


def test_no_grad_builds_no_graph():
    x = Value(2.0)
    with no_grad():
        y = (x * 3).tanh() + x
    assert y._parents == ()
    y.backward()
    assert x.grad == 0.0 and y.grad == 1.0
    with pytest.raises(RuntimeError), no_grad():
        raise RuntimeError("the flag must be restored on the way out")
    z = x * 3
    z.backward()
    assert x.grad == 3.0


def test_value_sum():
    xs = [Value(float(i)) for i in range(4)]
    s = value_sum(xs)
    s.backward()
    assert s.data == 6.0 and [v.grad for v in xs] == [1.0] * 4
    assert value_sum([]).data == 0.0


# ---- errors a user can act on ------------------------------------------------------


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: Value(0.0).log(), ValueError, "non-positive"),
        (lambda: Value(-1.0).log(), ValueError, "non-positive"),
        (lambda: Value(2.0) ** Value(2.0), TypeError, "constant"),
        (lambda: 2.0 ** Value(2.0), TypeError, "constant"),
        (lambda: Value(1.0) / 0, ZeroDivisionError, "epsilon"),
        (lambda: Value(1.0) / Value(0.0), ZeroDivisionError, "epsilon"),
        (lambda: 1 / Value(0.0), ZeroDivisionError, "epsilon"),
        (lambda: Value(-2.0) ** 0.5, ValueError, "integer exponent"),
        (lambda: Value(0.0) ** -1, ZeroDivisionError, "negative power"),
        (lambda: Value(1000.0).exp(), OverflowError, "overflows"),
        (lambda: Value("1"), TypeError, "real number"),
        (lambda: Value(1.0) + "a", TypeError, "cannot combine"),
    ],
)
def test_invalid_operations_raise_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


# ---- random expression graphs ------------------------------------------------------

UNARY = {
    "neg": (lambda v: -v, lambda x: -x),
    "tanh": (Value.tanh, jnp.tanh),
    "sigmoid": (Value.sigmoid, jax.nn.sigmoid),
    "relu": (Value.relu, jax.nn.relu),
    "leaky_relu": (lambda v: v.leaky_relu(0.2), lambda x: jax.nn.leaky_relu(x, 0.2)),
    "gelu": (Value.gelu, jax.nn.gelu),
    "exp": (Value.exp, jnp.exp),
    "square": (lambda v: v**2, lambda x: x**2),
    "cube": (lambda v: v**3, lambda x: x**3),
    "log(1+x^2)": (lambda v: (v * v + 1).log(), lambda x: jnp.log(x * x + 1)),
    "sqrt(1+x^2)": (lambda v: (1 + v * v) ** 0.5, lambda x: (1 + x * x) ** 0.5),
    "affine": (lambda v: 0.5 - 1.5 * v / 2, lambda x: 0.5 - 1.5 * x / 2),
}
BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / (b * b + 1),
}

step = st.tuples(
    st.sampled_from(sorted(UNARY) + sorted(BINARY)),
    st.integers(0, 99),
    st.integers(0, 99),
)


def run_program(inputs, program, unary_of, binary):
    """Nodes = inputs, then one node per step on earlier nodes (reuse allowed)."""
    nodes = list(inputs)
    for op, i, j in program:
        a, b = nodes[i % len(nodes)], nodes[j % len(nodes)]
        nodes.append(unary_of(op)(a) if op in UNARY else binary[op](a, b))
    return nodes


TINY = sys.float_info.min  # The smallest normal float64.


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.filter_too_much]
)
@given(
    # No subnormal inputs: XLA on a CPU flushes them to zero (-1e-308 is 0 to
    # jax, so leaky_relu's slope there is 1, and Python's 0.2).
    inputs=st.lists(st.floats(-2, 2, allow_subnormal=False), min_size=1, max_size=3),
    program=st.lists(step, min_size=1, max_size=8),
)
def test_random_expression_graphs_match_jax(inputs, program):
    def f_value(*xs):
        nodes = run_program(xs, program, lambda op: UNARY[op][0], BINARY)
        # Nor subnormal intermediates, for the same reason.
        assume(all(abs(n.data) < 1e3 and not 0 < abs(n.data) < TINY for n in nodes))
        return value_sum(nodes[len(xs) :]) + nodes[-1] * nodes[0]

    def f_jax(*xs):
        nodes = run_program(xs, program, lambda op: UNARY[op][1], BINARY)
        return sum(nodes[len(xs) :]) + nodes[-1] * nodes[0]

    try:
        report = gradcheck.check_scalar(f_value, f_jax, inputs, floor=1e-6)
    except OverflowError:
        assume(False)
    assert report.ok, str(report)


# ---- nn: the MLP's gradient against the same MLP in JAX ----------------------------


def jax_mlp_loss(flat, sizes, activation, X, y):
    """The MLP of nn.py written in jax.numpy, parameters in `parameters()` order."""
    act = {"tanh": jnp.tanh, "relu": jax.nn.relu, "gelu": jax.nn.gelu}[activation]
    h, k = X, 0
    for layer, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        # Per neuron: n_in weights then its bias.
        block = flat[k : k + n_out * (n_in + 1)].reshape(n_out, n_in + 1)
        k += n_out * (n_in + 1)
        h = h @ block[:, :-1].T + block[:, -1]
        if layer < len(sizes) - 2:
            h = act(h)
    return jnp.mean((h[:, 0] - y) ** 2)


@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu"])
def test_mlp_loss_gradient_matches_jax(activation):
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(6, 3)), rng.normal(size=6)
    model = MLP(3, [5, 4, 1], activation=activation, seed=2)
    params = model.parameters()
    for p in params:  # Random biases too, so that every gradient is exercised.
        p.data = float(rng.normal())
    loss = value_sum((model(list(x)) - t) ** 2 for x, t in zip(X, y)) * (1 / len(y))
    loss.backward()
    flat = np.array([p.data for p in params])
    with jax.enable_x64(True):
        val, grad = jax.value_and_grad(jax_mlp_loss)(
            jnp.asarray(flat), (3, 5, 4, 1), activation, jnp.asarray(X), jnp.asarray(y)
        )
        val, grad = float(val), np.asarray(grad)
    report = gradcheck.compare(
        "mlp", (loss.data, val), [([p.grad for p in params], grad)], tol=1e-6
    )
    assert report.ok, str(report)
    assert np.abs(grad).max() > 0


def test_mlp_structure_and_zero_grad():
    model = MLP(3, [4, 4, 1], activation="relu", seed=0)
    assert len(model.parameters()) == (3 * 4 + 4) + (4 * 4 + 4) + (4 + 1)
    assert isinstance(model([1.0, 2.0, 3.0]), Value)
    assert len(MLP(2, [3, 2])([1.0, 2.0])) == 2
    model([1.0, 2.0, 3.0]).backward()
    assert any(p.grad != 0 for p in model.parameters())
    model.zero_grad()
    assert all(p.grad == 0 for p in model.parameters())
    # Same seed, same weights; the output layer is linear.
    again = MLP(3, [4, 4, 1], activation="relu", seed=0)
    assert [p.data for p in again.parameters()] == [p.data for p in model.parameters()]
    assert model.layers[-1].neurons[0].activation == "linear"
    with pytest.raises(ValueError, match="unknown activation"):
        MLP(2, [2, 1], activation="swish")
    with pytest.raises(ValueError, match="expects 3 inputs"):
        Neuron(3, rng=np.random.default_rng(0))([1.0])


def test_sgd_with_momentum_by_hand():
    p = Value(1.0)
    opt = SGD([p], lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        (2 * p).backward()  # grad = 2 each step
        opt.step()
    # v1 = 2, p = 1 - 0.2 = 0.8; v2 = 0.9 * 2 + 2 = 3.8, p = 0.8 - 0.38 = 0.42.
    assert p.data == pytest.approx(0.42)
    with pytest.raises(ValueError, match="momentum"):
        SGD([p], lr=0.1, momentum=1.0)


# ---- the demo ----------------------------------------------------------------------


def test_make_moons():
    X, y = demo.make_moons(50, noise=0.0, seed=3)
    assert X.shape == (50, 2) and sorted(set(y)) == [-1.0, 1.0]
    assert (y == 1).sum() == 25
    up, down = X[y < 0], X[y > 0]
    np.testing.assert_allclose(np.hypot(up[:, 0], up[:, 1]), 1.0)  # On the unit circle.
    np.testing.assert_allclose(np.hypot(down[:, 0] - 1, down[:, 1] - 0.5), 1.0)
    np.testing.assert_array_equal(demo.make_moons(50, seed=3)[1], y)


def test_demo_reaches_full_training_accuracy():
    lines = []
    acc = demo.train(n_points=30, hidden=(8,), epochs=200, seed=0, log=lines.append)
    assert acc == 1.0
    assert "100.0%" in lines[-2]

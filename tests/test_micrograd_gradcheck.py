"""The gradient checker itself: it must catch wrong values and gradients, and where."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.micrograd import gradcheck
from jaxgpt.micrograd.engine import Value
from jaxgpt.micrograd.tensor import Tensor, unbroadcast


def wrong_square(v: Value) -> Value:
    """v**2 with the local derivative 3v instead of 2v."""
    return Value(v.data**2, "bad", (v,), (3 * v.data,))


def test_scalar_check_passes_a_correct_gradient():
    report = gradcheck.check_scalar(lambda a: a**2, lambda a: a**2, [1.5])
    assert report.ok and report.max_error == 0.0


def test_scalar_check_catches_a_wrong_gradient_and_names_the_input():
    report = gradcheck.check_scalar(wrong_square, lambda a: a**2, [2.0], name="square")
    assert not report.ok
    assert report.value_error == 0.0
    assert report.grad_error == pytest.approx(abs(6.0 - 4.0) / 6.0)
    assert "d/dx0 at x=(2.0)" in report.worst and "ours=6.0" in report.worst
    assert "FAILED" in str(report) and "square" in str(report)


def test_scalar_check_catches_a_wrong_value():
    report = gradcheck.check_scalar(lambda a: a * 1.001, lambda a: a, [3.0])
    assert not report.ok and report.value_error == pytest.approx(0.001 * 3 / 3.003)
    assert report.worst.startswith("value")


def test_scalar_check_tolerance_is_relative():
    """An error of 1e-7 relative passes at 1e-6, whatever the magnitude."""
    for scale in (1e-3, 1.0, 1e6):

        def exact(a, s=scale):
            return a * s

        def off_by(rel, s=scale):
            return lambda a: a * (s * (1 + rel))

        assert gradcheck.check_scalar(off_by(1e-7), exact, [1.0]).ok
        assert not gradcheck.check_scalar(off_by(1e-5), exact, [1.0]).ok


def test_tensor_check_catches_a_missing_unbroadcast():
    def add_forgetting_unbroadcast(a, b):
        return Tensor(
            a.data + b.data,
            "bad+",
            (a, b),
            lambda g: (unbroadcast(g, a.shape), g.sum(0)),
        )

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4)), rng.normal(size=(3, 1))
    assert gradcheck.check_tensor(lambda a, b: a + b, lambda a, b: a + b, [a, b]).ok
    with pytest.raises(ValueError, match="gradient 1 has shape"):
        gradcheck.check_tensor(add_forgetting_unbroadcast, lambda a, b: a + b, [a, b])


def test_tensor_check_reports_the_worst_element():
    def scaled_exp(x):  # Gradient wrong in one element only.
        e = np.exp(x.data)

        def vjp(g):
            grad = g * e
            grad[1, 2] *= 2
            return (grad,)

        return Tensor(e, "bad exp", (x,), vjp)

    x = np.random.default_rng(1).normal(size=(2, 3))
    report = gradcheck.check_tensor(scaled_exp, jnp.exp, [x])
    assert not report.ok and report.grad_error == pytest.approx(0.5)
    assert "input 0[1, 2]" in report.worst


def test_errors_relative_with_floor_and_nonfinite():
    e = gradcheck.errors(
        [1.0, 1e-12, np.inf, np.nan, 1.0, 0.0],
        [1.1, 0.0, np.inf, np.nan, np.nan, 1e-9],
        floor=1e-8,
    )
    np.testing.assert_allclose(e[:4], [0.1 / 1.1, 1e-4, 0.0, 0.0])
    assert e[4] == np.inf and e[5] == pytest.approx(0.1)


def test_merge_keeps_the_worst():
    good = gradcheck.Report("op", 0.0, 1e-9, 1e-6, "a")
    bad = gradcheck.Report("op", 1e-8, 1e-3, 1e-6, "b")
    merged = gradcheck.merge([good, bad])
    assert (merged.value_error, merged.grad_error, merged.worst, merged.points) == (
        1e-8,
        1e-3,
        "b",
        2,
    )
    assert not merged.ok


def test_x64_does_not_leak():
    before = jax.config.jax_enable_x64
    gradcheck.check_scalar(lambda a: a.exp(), jnp.exp, [0.3])
    gradcheck.check_tensor(lambda a: a.exp(), jnp.exp, [np.ones(3)])
    assert jax.config.jax_enable_x64 == before
    if not before:
        assert jnp.zeros(2).dtype == jnp.float32


def test_battery_covers_every_op():
    names = {c.name for c in gradcheck.battery()}
    for op in [
        "exp",
        "log (near 0)",
        "tanh",
        "sigmoid",
        "relu (0 -> 0)",
        "leaky_relu (0 -> 1)",
        "gelu tanh",
        "pow 3 (neg. base)",
        "div",
        "neg",
    ]:
        assert op in names
    for op in [
        "add",
        "matmul",
        "sum axis",
        "mean axis",
        "reshape",
        "transpose",
        "softmax",
        "cross_entropy (B,T,C)",
        "layer_norm",
        "embedding",
        "gelu",
        "relu (0 -> 0)",
    ]:
        assert any(c.engine == "tensor" and c.name == op for c in gradcheck.battery())


def test_command_line_prints_a_table(capsys):
    assert gradcheck.main(["--only=softmax"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "softmax" in line]
    assert len(rows) == 3 and all(line.endswith("yes") for line in rows)
    assert "3/3 ops agree with jax." in out
    with pytest.raises(SystemExit):
        gradcheck.main(["--only=no such op"])

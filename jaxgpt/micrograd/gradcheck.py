"""Checks both engines against jax: same function, same inputs, same numbers?

`check_scalar(f_value, f_jax, xs)` runs `f_value` on `Value`s and `f_jax` on
jax float64 scalars; `check_tensor(f_tensor, f_jax, arrays)` does the same
for `Tensor`s and jax arrays (a non-scalar output is contracted with a fixed
random cotangent, so its whole vector-Jacobian product is compared). Both
return a `Report`: the largest error in the value and in the gradients, where

    error(ours, jax) = |ours - jax| / max(|ours|, |jax|, floor)

(relative, except for numbers below `floor`), and the worst input if any.
JAX runs in float64 inside `jax.enable_x64(True)`, so the rest of the
process keeps its float32 default.

    python -m jaxgpt.micrograd.gradcheck            # the battery, as a table
    python -m jaxgpt.micrograd.gradcheck --only=softmax
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgpt.micrograd import tensor as T
from jaxgpt.micrograd.engine import Value
from jaxgpt.micrograd.tensor import Tensor

SCALAR_TOL = 1e-6
TENSOR_TOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Report:
    """Largest value and gradient errors of one check (or of several, merged)."""

    name: str
    value_error: float
    grad_error: float
    tol: float
    worst: str  # Where the largest error occurred, with both numbers.
    points: int = 1

    @property
    def ok(self) -> bool:
        return self.value_error <= self.tol and self.grad_error <= self.tol

    @property
    def max_error(self) -> float:
        return max(self.value_error, self.grad_error)

    def __str__(self) -> str:
        status = "ok" if self.ok else "FAILED"
        return (
            f"{self.name}: {status} (value error {self.value_error:.2e}, gradient"
            f" error {self.grad_error:.2e}, tolerance {self.tol:.0e});"
            f" worst: {self.worst}"
        )


def errors(ours, ref, floor: float) -> np.ndarray:
    """Elementwise |ours - ref| / max(|ours|, |ref|, floor); inf and nan must match."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    same = (ours == ref) | (np.isnan(ours) & np.isnan(ref))
    with np.errstate(invalid="ignore", over="ignore"):
        scale = np.maximum(np.maximum(np.abs(ours), np.abs(ref)), floor)
        err = np.abs(ours - ref) / scale
    return np.where(same, 0.0, np.where(np.isfinite(err), err, np.inf))


def compare(
    name: str,
    value: tuple,
    grads: Sequence[tuple],
    *,
    tol: float,
    floor: float = 1e-8,
    describe_input: Callable[[int, tuple], str] = lambda i, idx: f"input {i}",
) -> Report:
    """Builds a Report from (ours, jax) pairs: `value` and one pair per input."""
    v_err = errors(*value, floor)
    worst_err, worst = float(v_err.max(initial=0.0)), "value"
    if worst_err > 0:
        j = np.unravel_index(np.argmax(v_err), v_err.shape)
        ours_v, ref_v = np.asarray(value[0])[j], np.asarray(value[1])[j]
        worst = f"value{_index(j)}: ours={float(ours_v)!r}, jax={float(ref_v)!r}"
    g_max = 0.0
    for i, (ours, ref) in enumerate(grads):
        ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
        if ours.shape != ref.shape:
            raise ValueError(
                f"{name}: gradient {i} has shape {ours.shape}, jax's {ref.shape}."
            )
        e = errors(ours, ref, floor)
        if e.size and e.max() > g_max:
            g_max = float(e.max())
            j = np.unravel_index(np.argmax(e), e.shape)
            if g_max > worst_err:
                worst_err = g_max
                worst = (
                    f"d/d{describe_input(i, j)}: ours={float(ours[j])!r},"
                    f" jax={float(ref[j])!r}"
                )
    return Report(name, float(v_err.max(initial=0.0)), g_max, tol, worst)


def _index(j: tuple) -> str:
    return f"[{', '.join(map(str, j))}]" if j else ""


def merge(reports: Sequence[Report], name: str | None = None) -> Report:
    """One Report for several checks of the same op: the worst of each error."""
    worst = max(reports, key=lambda r: r.max_error / r.tol)
    return Report(
        name or worst.name,
        max(r.value_error for r in reports),
        max(r.grad_error for r in reports),
        max(r.tol for r in reports),
        worst.worst,
        sum(r.points for r in reports),
    )


# ---- the two checkers ---------------------------------------------------------


def check_scalar(
    f_value: Callable[..., Value],
    f_jax: Callable,
    xs: Sequence[float],
    *,
    name: str = "f",
    tol: float = SCALAR_TOL,
    floor: float = 1e-8,
) -> Report:
    """Value and gradient of f at xs: the scalar engine against jax.grad (float64)."""
    leaves = [Value(float(x)) for x in xs]
    out = f_value(*leaves)
    out.backward()
    with jax.enable_x64(True):
        args = [jnp.float64(x) for x in xs]
        val, grads = jax.value_and_grad(f_jax, argnums=tuple(range(len(xs))))(*args)
        val, grads = float(val), [float(g) for g in grads]
    at = ", ".join(f"{float(x)!r}" for x in xs)
    return compare(
        name,
        (out.data, val),
        [(leaf.grad, g) for leaf, g in zip(leaves, grads)],
        tol=tol,
        floor=floor,
        describe_input=lambda i, j: f"x{i} at x=({at})",
    )


def check_tensor(
    f_tensor: Callable[..., Tensor],
    f_jax: Callable,
    arrays: Sequence[np.ndarray],
    *,
    name: str = "f",
    tol: float = TENSOR_TOL,
    floor: float = 1e-8,
    seed: int = 0,
) -> Report:
    """Output and vector-Jacobian product of f: the tensor engine against jax.vjp."""
    arrays = [np.asarray(a, np.float64) for a in arrays]
    leaves = [Tensor(a.copy()) for a in arrays]
    out = f_tensor(*leaves)
    # A scalar output is differentiated as is, others contracted with a fixed cotangent.
    cot = (
        np.ones(out.shape)
        if out.size == 1
        else np.random.default_rng(seed).normal(size=out.shape)
    )
    out.backward(cot)
    with jax.enable_x64(True):
        val, vjp = jax.vjp(f_jax, *[jnp.asarray(a) for a in arrays])
        grads = vjp(jnp.asarray(cot))
        val, grads = np.asarray(val), [np.asarray(g) for g in grads]
    if val.shape != out.shape:
        raise ValueError(f"{name}: output shape {out.shape}, jax's {val.shape}.")
    shapes = " and ".join(str(a.shape) for a in arrays)
    return compare(
        name,
        (out.data, val),
        [(leaf.grad, g) for leaf, g in zip(leaves, grads)],
        tol=tol,
        floor=floor,
        describe_input=lambda i, j: f"input {i}{_index(j)} (inputs of shapes {shapes})",
    )


# ---- the battery ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    engine: str  # "scalar" or "tensor"
    name: str
    checks: tuple[Callable[[], Report], ...]

    def run(self) -> Report:
        return merge([check() for check in self.checks], self.name)


def _scalar(name: str, f_value, f_jax, points) -> Case:
    return Case(
        "scalar",
        name,
        tuple(lambda p=p: check_scalar(f_value, f_jax, p, name=name) for p in points),
    )


def _tensor(name: str, f_tensor, f_jax, *input_sets) -> Case:
    return Case(
        "tensor",
        name,
        tuple(
            lambda a=a: check_tensor(f_tensor, f_jax, a, name=name) for a in input_sets
        ),
    )


def scalar_cases() -> list[Case]:
    """Every scalar op at several points, edges included: kinks, saturation, log(~0)."""
    pairs = [(1.5, -2.0), (0.0, 0.0), (1e3, -1e-3), (-0.7, 0.3)]
    nonzero = [(1.5, -2.0), (-0.7, 0.3), (1e3, 1e-3)]
    return [
        _scalar("add", lambda a, b: a + b, lambda a, b: a + b, pairs),
        _scalar(
            "add const", lambda a: 2.5 + a + 1, lambda a: 2.5 + a + 1, [(0.0,), (-3.0,)]
        ),
        _scalar(
            "sub",
            lambda a, b: a - b - 3 + (1 - a),
            lambda a, b: a - b - 3 + (1 - a),
            pairs,
        ),
        _scalar("mul", lambda a, b: a * b * 2, lambda a, b: a * b * 2, pairs),
        _scalar(
            "mul reuse",
            lambda a: a * a * a,
            lambda a: a * a * a,
            [(0.0,), (-1.3,), (2.0,)],
        ),
        _scalar("div", lambda a, b: a / b, lambda a, b: a / b, nonzero),
        _scalar(
            "rdiv", lambda a: 3 / a + a / 4, lambda a: 3 / a + a / 4, [(-2.0,), (1e-3,)]
        ),
        _scalar("neg", lambda a: -a, lambda a: -a, [(0.0,), (-2.0,)]),
        _scalar("pow 2", lambda a: a**2, lambda a: a**2, [(0.0,), (-3.0,), (1.5,)]),
        _scalar(
            "pow 3 (neg. base)",
            lambda a: a**3,
            lambda a: a**3,
            [(-2.0,), (-0.5,), (2.0,)],
        ),
        _scalar("pow -1.5", lambda a: a**-1.5, lambda a: a**-1.5, [(0.1,), (4.0,)]),
        _scalar("pow 0.5", lambda a: a**0.5, lambda a: a**0.5, [(1e-10,), (2.0,)]),
        _scalar(
            "pow -2 (neg. base)", lambda a: a**-2, lambda a: a**-2, [(-0.5,), (3.0,)]
        ),
        _scalar("exp", Value.exp, jnp.exp, [(-30.0,), (0.0,), (1.0,), (50.0,)]),
        _scalar(
            "log (near 0)", Value.log, jnp.log, [(1e-300,), (1e-12,), (0.5,), (1e6,)]
        ),
        _scalar(
            "tanh", Value.tanh, jnp.tanh, [(-20.0,), (-1.0,), (0.0,), (0.5,), (20.0,)]
        ),
        _scalar(
            "sigmoid",
            Value.sigmoid,
            jax.nn.sigmoid,
            [(-40.0,), (-1.0,), (0.0,), (2.0,), (40.0,)],
        ),
        _scalar("relu (0 -> 0)", Value.relu, jax.nn.relu, [(-1.0,), (0.0,), (2.0,)]),
        _scalar(
            "leaky_relu (0 -> 1)",
            lambda a: a.leaky_relu(0.1),
            lambda a: jax.nn.leaky_relu(a, 0.1),
            [(-2.0,), (0.0,), (3.0,)],
        ),
        _scalar(
            "gelu tanh",
            Value.gelu,
            jax.nn.gelu,
            [(-3.0,), (-0.5,), (0.0,), (1.0,), (4.0,)],
        ),
        _scalar(
            "gelu erf",
            lambda a: a.gelu(approximate=False),
            lambda a: jax.nn.gelu(a, approximate=False),
            [(-3.0,), (-0.5,), (0.0,), (1.0,), (4.0,)],
        ),
        _scalar(
            "expression",
            lambda a, b: (
                a * b + a.tanh() * a - (a / b).exp() + (b**2 + 1).log()
            ).sigmoid(),
            lambda a, b: jax.nn.sigmoid(
                a * b + jnp.tanh(a) * a - jnp.exp(a / b) + jnp.log(b**2 + 1)
            ),
            [(1.5, -2.0), (-0.7, 0.3), (0.0, 2.0)],
        ),
    ]


def tensor_cases(seed: int = 0) -> list[Case]:
    """Every tensor op across broadcasting: (3,1)+(1,4), (2,3,4)+(4,), scalars."""
    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.normal(size=shape)

    def pos(*shape):
        return rng.uniform(0.2, 3.0, size=shape)

    def with_zero(x):
        x.flat[0] = 0.0
        return x

    bcast = [(r(3, 1), r(1, 4)), (r(2, 3, 4), r(4)), (r(), r(2, 3)), (r(2, 3), r())]
    bcast_pos = [(r(3, 1), pos(1, 4)), (r(2, 3, 4), pos(4)), (r(), pos(2, 3))]
    ce_idx_2d = rng.integers(0, 5, size=7)
    ce_idx_3d = rng.integers(0, 6, size=(2, 3))
    emb_idx = np.array([[0, 3, 3], [1, 0, 4]])  # Repeats: gradients must add up.

    def ce_jax(targets):
        return lambda x: optax.softmax_cross_entropy_with_integer_labels(
            x, targets
        ).mean()

    def ln_jax(x, w, b, eps=1e-5):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + eps) * w + b

    return [
        _tensor("add", lambda a, b: a + b, lambda a, b: a + b, *bcast),
        _tensor("sub", lambda a, b: a - b, lambda a, b: a - b, *bcast),
        _tensor("mul", lambda a, b: a * b, lambda a, b: a * b, *bcast),
        _tensor("div", lambda a, b: a / b, lambda a, b: a / b, *bcast_pos),
        _tensor(
            "const ops",
            lambda a: 2.0 - a * 3 + 1 / (a * a + 1),
            lambda a: 2.0 - a * 3 + 1 / (a * a + 1),
            (r(2, 3),),
        ),
        _tensor("neg", lambda a: -a, lambda a: -a, (r(2, 3),)),
        _tensor("pow 2, 3", lambda a: a**2 + a**3, lambda a: a**2 + a**3, (r(3, 4),)),
        _tensor("pow -0.5", lambda a: a**-0.5, lambda a: a**-0.5, (pos(3, 4),)),
        _tensor(
            "matmul",
            lambda a, b: a @ b,
            lambda a, b: a @ b,
            (r(3, 4), r(4, 5)),
            (r(2, 3, 4), r(4, 5)),
            (r(2, 1, 3, 4), r(5, 4, 2)),
        ),
        _tensor("sum", lambda a: a.sum(), jnp.sum, (r(2, 3, 4),), (r(),)),
        _tensor(
            "sum axis", lambda a: a.sum(axis=1), lambda a: a.sum(axis=1), (r(2, 3, 4),)
        ),
        _tensor(
            "sum axes keepdims",
            lambda a: a.sum(axis=(0, -1), keepdims=True),
            lambda a: a.sum(axis=(0, -1), keepdims=True),
            (r(2, 3, 4),),
        ),
        _tensor(
            "mean axis",
            lambda a: a.mean(axis=-1),
            lambda a: a.mean(axis=-1),
            (r(2, 3, 4),),
        ),
        _tensor(
            "reshape",
            lambda a: a.reshape(4, 6),
            lambda a: a.reshape(4, 6),
            (r(2, 3, 4),),
        ),
        _tensor(
            "transpose",
            lambda a: a.transpose(1, 2, 0),
            lambda a: a.transpose(1, 2, 0),
            (r(2, 3, 4),),
        ),
        _tensor("exp", Tensor.exp, jnp.exp, (r(3, 4),)),
        _tensor(
            "log", Tensor.log, jnp.log, (pos(3, 4),), (np.array([1e-12, 1e-300, 5.0]),)
        ),
        _tensor(
            "tanh",
            Tensor.tanh,
            jnp.tanh,
            (r(3, 4) * 5,),
            (np.array([-20.0, 0.0, 20.0]),),
        ),
        _tensor(
            "sigmoid",
            Tensor.sigmoid,
            jax.nn.sigmoid,
            (r(3, 4) * 5,),
            (np.array([-40.0, 0, 40.0]),),
        ),
        _tensor("relu (0 -> 0)", Tensor.relu, jax.nn.relu, (with_zero(r(3, 4)),)),
        _tensor("gelu", Tensor.gelu, jax.nn.gelu, (with_zero(r(3, 4)) * 3,)),
        _tensor(
            "softmax",
            T.softmax,
            jax.nn.softmax,
            (r(4, 5) * 3,),
            (np.array([[1000.0, 0.0, -1000.0]]),),
        ),
        _tensor(
            "softmax axis 0",
            lambda a: T.softmax(a, axis=0),
            lambda a: jax.nn.softmax(a, axis=0),
            (r(4, 5),),
        ),
        _tensor("log_softmax", T.log_softmax, jax.nn.log_softmax, (r(4, 5) * 3,)),
        _tensor(
            "cross_entropy (N,C)",
            lambda x: T.cross_entropy(x, ce_idx_2d),
            ce_jax(ce_idx_2d),
            (r(7, 5) * 3,),
        ),
        _tensor(
            "cross_entropy (B,T,C)",
            lambda x: T.cross_entropy(x, ce_idx_3d),
            ce_jax(ce_idx_3d),
            (r(2, 3, 6),),
            (r(2, 3, 6) * 100,),
        ),
        _tensor(
            "layer_norm",
            T.layer_norm,
            ln_jax,
            (r(2, 3, 8), r(8), r(8)),
            (r(5, 4) * 10 + 3, r(4), r(4)),
        ),
        _tensor(
            "embedding",
            lambda t: T.embedding(t, emb_idx),
            lambda t: jnp.take(t, emb_idx, axis=0),
            (r(5, 3),),
        ),
        _tensor(
            "mlp layer",
            lambda x, w, b: (x @ w + b).tanh().mean(),
            lambda x, w, b: jnp.tanh(x @ w + b).mean(),
            (r(6, 4), r(4, 3), r(3)),
        ),
    ]


def battery() -> list[Case]:
    return scalar_cases() + tensor_cases()


def format_table(rows: Sequence[tuple[Case, Report]]) -> str:
    header = (
        f"{'engine':<7} {'op':<22} {'points':>6} {'value err':>10} {'grad err':>10}"
        f" {'tol':>6}  ok"
    )
    lines = [header, "-" * 70]
    for case, rep in rows:
        lines.append(
            f"{case.engine:<7} {case.name:<22} {rep.points:>6} {rep.value_error:>10.1e}"
            f" {rep.grad_error:>10.1e} {rep.tol:>6.0e}  {'yes' if rep.ok else 'NO'}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxgpt.micrograd.gradcheck",
        description="Compare both micrograd engines with jax (float64), op by op.",
    )
    parser.add_argument(
        "--only", default="", help="Run the ops whose name contains this."
    )
    args = parser.parse_args(argv)
    cases = [c for c in battery() if args.only in c.name]
    if not cases:
        parser.error(f"no op name contains {args.only!r}.")
    rows = [(c, c.run()) for c in cases]
    print(format_table(rows))
    failed = [rep for _, rep in rows if not rep.ok]
    for rep in failed:
        print(rep)
    print(f"{len(rows) - len(failed)}/{len(rows)} ops agree with jax.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

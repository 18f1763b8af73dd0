"""A scalar autograd engine: `Value` and reverse-mode backpropagation.

Every arithmetic operation on `Value`s returns a new `Value` that remembers
its inputs ("parents") and the local derivative d(out)/d(parent) of each.
`out.backward()` walks the graph from `out` back to the leaves in reverse
topological order and applies the chain rule:

    parent.grad += d(out)/d(parent) * out.grad

Both the topological sort and the backward pass are loops over an explicit
stack, never recursion, so a chain of 100,000 operations works under Python's
default recursion limit.

Conventions at kinks (the same as `jax.nn`): relu'(0) = 0, and
leaky_relu'(0) = 1 (0 belongs to the positive branch, x >= 0).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from collections.abc import Callable, Iterable, Iterator

Number = numbers.Real  # int, float, numpy scalars (not complex)

_GRAD_ENABLED = contextvars.ContextVar("micrograd_grad_enabled", default=True)


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Inside this block, operations build no graph (for evaluation and updates).

    Shared by the scalar and the tensor engine.
    """
    token = _GRAD_ENABLED.set(False)
    try:
        yield
    finally:
        _GRAD_ENABLED.reset(token)


def is_grad_enabled() -> bool:
    return _GRAD_ENABLED.get()


def topological_order(root, parents_of: Callable) -> list:
    """Nodes reachable from `root`, each after all of its parents (iterative DFS).

    The stack holds (node, expanded) pairs: a node is expanded (its parents
    pushed) when first popped, and emitted when popped the second time, after
    everything pushed above it. Nodes hash by identity (no __eq__ is defined).
    """
    order, seen = [], set()
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
        elif node not in seen:
            seen.add(node)
            stack.append((node, True))
            stack.extend((p, False) for p in parents_of(node) if p not in seen)
    return order


class Value:
    """A scalar `data`, its gradient `grad`, and how it was made (`op`, parents)."""

    __slots__ = ("_local_grads", "_parents", "data", "grad", "op")

    def __init__(self, data: Number, op: str = "", _parents=(), _local_grads=()):
        if type(data) is not float:  # The fast path first: ops pass floats.
            if isinstance(data, Value) or not isinstance(data, Number):
                raise TypeError(
                    f"Value holds a real number, got {type(data).__name__}."
                )
            data = float(data)
        self.data = data
        self.grad = 0.0
        self.op = op
        # Under no_grad() the result forgets its inputs: no graph is built.
        keep = bool(_parents) and _GRAD_ENABLED.get()
        self._parents = tuple(_parents) if keep else ()
        self._local_grads = tuple(_local_grads) if keep else ()

    def __repr__(self) -> str:
        return f"Value(data={self.data:.6g}, grad={self.grad:.6g})"

    # ---- building blocks -------------------------------------------------

    @staticmethod
    def _lift(other: Value | Number) -> Value:
        if isinstance(other, Value):
            return other
        if isinstance(other, Number):
            return Value(other)
        raise TypeError(f"cannot combine a Value with {type(other).__name__}.")

    def _unary(self, data: float, local_grad: float, op: str) -> Value:
        return Value(data, op, (self,), (local_grad,))

    # ---- arithmetic ------------------------------------------------------

    def __add__(self, other: Value | Number) -> Value:
        other = self._lift(other)
        return Value(self.data + other.data, "+", (self, other), (1.0, 1.0))

    def __mul__(self, other: Value | Number) -> Value:
        other = self._lift(other)
        return Value(
            self.data * other.data, "*", (self, other), (other.data, self.data)
        )

    def __truediv__(self, other: Value | Number) -> Value:
        other = self._lift(other)
        if other.data == 0.0:
            raise ZeroDivisionError(
                f"division of {self.data:g} by a Value equal to 0 (add a small"
                " epsilon to the denominator if it can vanish)."
            )
        a, b = self.data, other.data
        return Value(a / b, "/", (self, other), (1.0 / b, -a / (b * b)))

    def __pow__(self, exponent: Number) -> Value:
        if isinstance(exponent, Value) or not isinstance(exponent, Number):
            raise TypeError(
                "the exponent of ** must be a constant int or float, got"
                f" {type(exponent).__name__}; for x ** y with y a Value,"
                " write (y * x.log()).exp()."
            )
        x, p = self.data, float(exponent)
        if x < 0 and not p.is_integer():
            raise ValueError(
                f"({x:g}) ** {p:g}: a negative base needs an integer exponent"
                " (the result would be complex)."
            )
        if x == 0 and p < 0:
            raise ZeroDivisionError(f"0 ** {p:g}: zero to a negative power.")
        if p == 0:
            local = 0.0
        elif x == 0 and p < 1:
            local = math.inf  # d/dx x**p at 0 for 0 < p < 1, as jax gives.
        else:
            local = p * x ** (p - 1)
        return self._unary(x**p, local, f"**{p:g}")

    def __neg__(self) -> Value:
        return self._unary(-self.data, -1.0, "neg")

    def __radd__(self, other: Number) -> Value:
        return self + other

    def __rmul__(self, other: Number) -> Value:
        return self * other

    def __sub__(self, other: Value | Number) -> Value:
        return self + (-self._lift(other))

    def __rsub__(self, other: Number) -> Value:
        return self._lift(other) + (-self)

    def __rtruediv__(self, other: Number) -> Value:
        return self._lift(other) / self

    def __rpow__(self, base: Number):
        raise TypeError(
            "the exponent of ** must be a constant, not a Value; for b ** x"
            " write (x * math.log(b)).exp()."
        )

    # ---- elementary functions ---------------------------------------------

    def exp(self) -> Value:
        try:
            e = math.exp(self.data)
        except OverflowError:
            raise OverflowError(f"exp({self.data:g}) overflows a float.") from None
        return self._unary(e, e, "exp")

    def log(self) -> Value:
        if self.data <= 0:
            raise ValueError(
                f"log of a non-positive number ({self.data:g}); clamp or shift"
                " the input, e.g. (x + 1e-12).log() for x >= 0."
            )
        return self._unary(math.log(self.data), 1.0 / self.data, "log")

    def tanh(self) -> Value:
        t = math.tanh(self.data)
        return self._unary(t, 1.0 - t * t, "tanh")

    def sigmoid(self) -> Value:
        x = self.data
        if x >= 0:  # Two forms so that exp never overflows.
            s = 1.0 / (1.0 + math.exp(-x))
        else:
            e = math.exp(x)
            s = e / (1.0 + e)
        return self._unary(s, s * (1.0 - s), "sigmoid")

    def relu(self) -> Value:
        x = self.data
        return self._unary(max(x, 0.0), 1.0 if x > 0 else 0.0, "relu")

    def leaky_relu(self, slope: float = 0.01) -> Value:
        x = self.data
        if x >= 0:
            return self._unary(x, 1.0, "leaky_relu")
        return self._unary(slope * x, slope, "leaky_relu")

    def gelu(self, approximate: bool = True) -> Value:
        """GELU x * Phi(x); `approximate` uses GPT-2's tanh form (as jax.nn.gelu)."""
        x = self.data
        if approximate:
            c = math.sqrt(2.0 / math.pi)
            u = c * (x + 0.044715 * x**3)
            t = math.tanh(u)
            du = c * (1.0 + 3 * 0.044715 * x * x)
            return self._unary(
                0.5 * x * (1.0 + t),
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du,
                "gelu",
            )
        cdf = 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))
        pdf = math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        return self._unary(x * cdf, cdf + x * pdf, "gelu")

    # ---- backpropagation ---------------------------------------------------

    def backward(self, grad: float = 1.0) -> None:
        """Adds d(self)/d(node) * grad to `node.grad` for every node of the graph.

        Gradients accumulate (call `zero_grad` between steps). Upstream
        gradients of this pass are kept apart from `.grad`, so calling
        backward twice adds exactly twice the gradient to every node.
        """
        upstream = {self: float(grad)}
        for node in reversed(topological_order(self, lambda v: v._parents)):
            g = upstream.pop(node)
            node.grad += g
            for parent, local in zip(node._parents, node._local_grads):
                upstream[parent] = upstream.get(parent, 0.0) + local * g

    def zero_grad(self) -> None:
        """Sets `grad` to 0 on every node of the graph that produced this value."""
        for node in topological_order(self, lambda v: v._parents):
            node.grad = 0.0


def value_sum(values: Iterable[Value | Number]) -> Value:
    """Sum of many values (like built-in sum, but starts from the first element)."""
    values = iter(values)
    try:
        total = Value._lift(next(values))
    except StopIteration:
        return Value(0.0)
    for v in values:
        total = total + v
    return total

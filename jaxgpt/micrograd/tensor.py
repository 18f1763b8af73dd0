"""A numpy tensor engine: the scalar engine's idea applied to whole arrays.

A `Tensor` holds an array `data`, its gradient `grad` (same shape), and how
it was made. Where a scalar op stored a local derivative, an array op stores
a vector-Jacobian product `vjp(g) -> grads of the inputs`: given the gradient
`g` of the loss with respect to the output, it returns the gradient with
respect to each input. `backward()` calls them in reverse topological order.

Broadcasting: `a + b` may broadcast `a` of shape (3, 1) to (3, 4). Each of
the 4 copies influences the loss, so the gradient of `a` is the sum over the
broadcast axes: `unbroadcast(g, a.shape)`.

The same kink conventions as the scalar engine (and jax.nn): relu'(0) = 0.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import numpy as np

from jaxgpt.micrograd.engine import is_grad_enabled, no_grad, topological_order

__all__ = [
    "Tensor",
    "cross_entropy",
    "embedding",
    "layer_norm",
    "log_softmax",
    "matmul",
    "no_grad",
    "softmax",
    "unbroadcast",
]

ArrayLike = np.ndarray | float | int | Sequence


def unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sums `grad` over the axes that broadcasting added or stretched from `shape`."""
    lead = grad.ndim - len(shape)
    grad = grad.sum(axis=tuple(range(lead))) if lead else grad
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(axis=stretched, keepdims=True) if stretched else grad


class Tensor:
    """A float array with reverse-mode autodiff."""

    __slots__ = ("_parents", "_vjp", "data", "grad", "op")
    __array_ufunc__ = None  # `ndarray + Tensor` calls Tensor.__radd__, not numpy.

    def __init__(self, data: ArrayLike, op: str = "", _parents=(), _vjp=None):
        data = np.asarray(data)
        if not np.issubdtype(data.dtype, np.floating):
            data = data.astype(np.float64)
        self.data = data
        self.grad = np.zeros_like(data)
        self.op = op
        keep = bool(_parents) and is_grad_enabled()
        self._parents = tuple(_parents) if keep else ()
        self._vjp: Callable | None = _vjp if keep else None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    def item(self) -> float:
        return self.data.item()

    def __repr__(self) -> str:
        return f"Tensor(shape={self.shape}, op={self.op!r})"

    def _lift(self, other: Tensor | ArrayLike) -> Tensor:
        if isinstance(other, Tensor):
            return other
        return Tensor(np.asarray(other, dtype=self.data.dtype))

    # ---- elementwise arithmetic (with broadcasting) -----------------------

    def __add__(self, other) -> Tensor:
        a, b = self, self._lift(other)
        return Tensor(
            a.data + b.data,
            "+",
            (a, b),
            lambda g: (unbroadcast(g, a.shape), unbroadcast(g, b.shape)),
        )

    def __mul__(self, other) -> Tensor:
        a, b = self, self._lift(other)
        return Tensor(
            a.data * b.data,
            "*",
            (a, b),
            lambda g: (
                unbroadcast(g * b.data, a.shape),
                unbroadcast(g * a.data, b.shape),
            ),
        )

    def __truediv__(self, other) -> Tensor:
        a, b = self, self._lift(other)
        if np.any(b.data == 0):
            raise ZeroDivisionError(
                "division by a tensor with zero entries (add a small epsilon to"
                " the denominator if it can vanish)."
            )
        return Tensor(
            a.data / b.data,
            "/",
            (a, b),
            lambda g: (
                unbroadcast(g / b.data, a.shape),
                unbroadcast(-g * a.data / (b.data * b.data), b.shape),
            ),
        )

    def __pow__(self, exponent: float) -> Tensor:
        if isinstance(exponent, Tensor) or not isinstance(exponent, numbers.Real):
            raise TypeError(
                "the exponent of ** must be a constant int or float, got"
                f" {type(exponent).__name__}; for x ** y write (y * x.log()).exp()."
            )
        x, p = self.data, float(exponent)
        if not p.is_integer() and np.any(x < 0):
            raise ValueError(
                f"x ** {p:g} with negative entries in x needs an integer exponent."
            )
        if p < 0 and np.any(x == 0):
            raise ZeroDivisionError(f"x ** {p:g} with zero entries in x.")

        def vjp(g):
            return (g * p * x ** (p - 1) if p != 0 else np.zeros_like(g),)

        return Tensor(x**p, f"**{p:g}", (self,), vjp)

    def __neg__(self) -> Tensor:
        return Tensor(-self.data, "neg", (self,), lambda g: (-g,))

    def __sub__(self, other) -> Tensor:
        return self + (-self._lift(other))

    def __radd__(self, other) -> Tensor:
        return self + other

    def __rmul__(self, other) -> Tensor:
        return self * other

    def __rsub__(self, other) -> Tensor:
        return self._lift(other) - self

    def __rtruediv__(self, other) -> Tensor:
        return self._lift(other) / self

    def __matmul__(self, other) -> Tensor:
        return matmul(self, self._lift(other))

    def __rmatmul__(self, other) -> Tensor:
        return matmul(self._lift(other), self)

    # ---- elementwise functions ----------------------------------------------

    def exp(self) -> Tensor:
        e = np.exp(self.data)
        return Tensor(e, "exp", (self,), lambda g: (g * e,))

    def log(self) -> Tensor:
        x = self.data
        if np.any(x <= 0):
            raise ValueError(
                f"log of non-positive entries (min {x.min():g}); clamp or shift"
                " the input."
            )
        return Tensor(np.log(x), "log", (self,), lambda g: (g / x,))

    def tanh(self) -> Tensor:
        t = np.tanh(self.data)
        return Tensor(t, "tanh", (self,), lambda g: (g * (1 - t * t),))

    def sigmoid(self) -> Tensor:
        x = self.data
        e = np.exp(-np.abs(x))  # Never overflows: sigmoid(x) from exp(-|x|).
        s = np.where(x >= 0, 1 / (1 + e), e / (1 + e))
        return Tensor(s, "sigmoid", (self,), lambda g: (g * s * (1 - s),))

    def relu(self) -> Tensor:
        x = self.data
        return Tensor(np.maximum(x, 0), "relu", (self,), lambda g: (g * (x > 0),))

    def gelu(self) -> Tensor:
        """GELU, tanh approximation (GPT-2, jax.nn.gelu's default)."""
        x = self.data
        c = math.sqrt(2 / math.pi)
        t = np.tanh(c * (x + 0.044715 * x**3))
        dt = (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
        return Tensor(
            0.5 * x * (1 + t),
            "gelu",
            (self,),
            lambda g: (g * (0.5 * (1 + t) + 0.5 * x * dt),),
        )

    # ---- reductions and shapes ----------------------------------------------

    def sum(
        self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False
    ) -> Tensor:
        shape = self.shape
        axes = _normalize_axes(axis, self.ndim)

        def vjp(g):
            if not keepdims:
                g = np.expand_dims(g, axes)
            return (np.broadcast_to(g, shape).copy(),)

        return Tensor(self.data.sum(axis=axes, keepdims=keepdims), "sum", (self,), vjp)

    def mean(
        self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False
    ) -> Tensor:
        axes = _normalize_axes(axis, self.ndim)
        count = math.prod(self.shape[i] for i in axes)
        return self.sum(axes, keepdims) * (1.0 / count)

    def reshape(self, *shape: int) -> Tensor:
        if len(shape) == 1 and isinstance(shape[0], tuple | list):
            shape = tuple(shape[0])
        old = self.shape
        return Tensor(
            self.data.reshape(shape), "reshape", (self,), lambda g: (g.reshape(old),)
        )

    def transpose(self, *axes: int) -> Tensor:
        if len(axes) == 1 and isinstance(axes[0], tuple | list):
            axes = tuple(axes[0])
        axes = axes or tuple(reversed(range(self.ndim)))
        inverse = tuple(np.argsort(axes))
        return Tensor(
            self.data.transpose(axes),
            "transpose",
            (self,),
            lambda g: (g.transpose(inverse),),
        )

    @property
    def T(self) -> Tensor:
        return self.transpose()

    # ---- backpropagation --------------------------------------------------------

    def backward(self, grad: ArrayLike | None = None) -> None:
        """Adds d(self)/d(node) to `node.grad` for every node of the graph.

        A non-scalar output needs `grad`, the gradient of some scalar loss with
        respect to it (same shape). Gradients accumulate across calls.
        """
        if grad is None:
            if self.size != 1:
                raise ValueError(
                    f"backward() of a tensor of shape {self.shape} needs grad= of the"
                    " same shape; call it on a scalar loss instead."
                )
            grad = np.ones_like(self.data)
        grad = np.asarray(grad, dtype=self.data.dtype)
        if grad.shape != self.shape:
            raise ValueError(f"grad has shape {grad.shape}, expected {self.shape}.")
        upstream = {self: grad}
        for node in reversed(topological_order(self, lambda t: t._parents)):
            g = upstream.pop(node)
            node.grad = node.grad + g
            if node._vjp is not None:
                for parent, pg in zip(node._parents, node._vjp(g)):
                    upstream[parent] = (
                        pg if parent not in upstream else upstream[parent] + pg
                    )

    def zero_grad(self) -> None:
        self.grad = np.zeros_like(self.data)


def _normalize_axes(axis, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dims.")
    return tuple(sorted(a % ndim for a in axes))


# ---- matrix product ----------------------------------------------------------


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for (..., n, k) @ (..., k, m); leading (batch) axes broadcast."""
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(
            f"matmul needs at least 2-D operands, got shapes {a.shape} and {b.shape};"
            " reshape a vector v to (1, n) or (n, 1)."
        )
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul shapes {a.shape} @ {b.shape}: inner dims differ.")

    def vjp(g):
        ga = g @ np.swapaxes(b.data, -1, -2)
        gb = np.swapaxes(a.data, -1, -2) @ g
        return unbroadcast(ga, a.shape), unbroadcast(gb, b.shape)

    return Tensor(a.data @ b.data, "matmul", (a, b), vjp)


# ---- probabilities and losses ---------------------------------------------------


def _stable_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))  # exp(<= 0): no overflow.
    return e / e.sum(axis=axis, keepdims=True)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """exp(x) / sum(exp(x)) along `axis`, after subtracting the max (stable).

    Backward: for s = softmax(x), ds/dx applied to g is s * (g - sum(g * s)).
    """
    s = _stable_softmax(x.data, axis)
    return Tensor(
        s, "softmax", (x,), lambda g: (s * (g - (g * s).sum(axis=axis, keepdims=True)),)
    )


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """x - logsumexp(x) along `axis`; backward g - softmax(x) * sum(g)."""
    m = x.data.max(axis=axis, keepdims=True)
    lse = m + np.log(np.exp(x.data - m).sum(axis=axis, keepdims=True))
    s = np.exp(x.data - lse)
    return Tensor(
        x.data - lse,
        "log_softmax",
        (x,),
        lambda g: (g - s * g.sum(axis=axis, keepdims=True),),
    )


def cross_entropy(logits: Tensor, targets: np.ndarray) -> Tensor:
    """Mean of -log softmax(logits)[target] over all positions.

    logits: (..., C); targets: integers of shape (...). With N positions,
    P the softmax and Y the one-hot targets, the gradient is (P - Y) / N.
    """
    targets = np.asarray(targets)
    if not np.issubdtype(targets.dtype, np.integer):
        raise TypeError(
            f"targets must be integers (class indices), got {targets.dtype}."
        )
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {logits.shape} need targets of shape {logits.shape[:-1]},"
            f" got {targets.shape}."
        )
    C = logits.shape[-1]
    if targets.size and (targets.min() < 0 or targets.max() >= C):
        raise ValueError(
            f"targets must lie in [0, {C}), got [{targets.min()}, {targets.max()}]."
        )
    x_NC = logits.data.reshape(-1, C)
    t_N = targets.reshape(-1)
    N = x_NC.shape[0]
    rows = np.arange(N)
    m_N1 = x_NC.max(axis=1, keepdims=True)
    lse_N = (m_N1 + np.log(np.exp(x_NC - m_N1).sum(axis=1, keepdims=True)))[:, 0]
    loss = (lse_N - x_NC[rows, t_N]).mean()

    def vjp(g):
        dx_NC = np.exp(x_NC - lse_N[:, None])  # P
        dx_NC[rows, t_N] -= 1.0  # P - Y
        return ((g / N) * dx_NC.reshape(logits.shape),)

    return Tensor(np.asarray(loss), "cross_entropy", (logits,), vjp)


# ---- layers ------------------------------------------------------------------


def layer_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Normalizes the last axis to mean 0, variance 1, then scales and shifts.

    y = (x - mean) / sqrt(var + eps) * weight + bias. The normalization is one
    node whose backward, for g the gradient reaching xhat = (x - mean) / std,
    is dx = (g - mean(g) - xhat * mean(g * xhat)) / sqrt(var + eps).
    """
    mu = x.data.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(x.data.var(axis=-1, keepdims=True) + eps)
    xhat = (x.data - mu) * rstd

    def vjp(g):
        return (
            rstd
            * (
                g
                - g.mean(-1, keepdims=True)
                - xhat * (g * xhat).mean(-1, keepdims=True)
            ),
        )

    y = Tensor(xhat, "layer_norm", (x,), vjp)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def embedding(table: Tensor, idx: np.ndarray) -> Tensor:
    """Rows of `table` (V, C) at integer `idx` (any shape): shape idx.shape + (C,).

    A row used k times gets the sum of k gradients: np.add.at scatters them
    (plain fancy-index assignment would keep only the last).
    """
    idx = np.asarray(idx)
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"embedding indices must be integers, got {idx.dtype}.")
    V = table.shape[0]
    if idx.size and (idx.min() < 0 or idx.max() >= V):
        raise IndexError(
            f"embedding indices must lie in [0, {V}), got [{idx.min()}, {idx.max()}]."
        )

    def vjp(g):
        grad = np.zeros_like(table.data)
        np.add.at(grad, idx, g)
        return (grad,)

    return Tensor(table.data[idx], "embedding", (table,), vjp)

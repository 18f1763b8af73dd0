"""Neural networks out of `Value`s: Neuron, Layer, MLP, and an SGD optimizer.

A neuron computes act(w . x + b). Weights start uniform in +-1/sqrt(n_in), so
pre-activations stay of order 1 whatever the width; biases start at 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxgpt.micrograd.engine import Value, no_grad, value_sum

ACTIVATIONS = {
    "tanh": Value.tanh,
    "relu": Value.relu,
    "leaky_relu": Value.leaky_relu,
    "sigmoid": Value.sigmoid,
    "gelu": Value.gelu,
    "linear": lambda v: v,
}


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}."
        )
    return ACTIVATIONS[name]


class Module:
    """Anything with parameters: lists them and zeroes their gradients."""

    def parameters(self) -> list[Value]:
        return []

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = 0.0


class Neuron(Module):
    def __init__(
        self, n_in: int, activation: str = "tanh", *, rng: np.random.Generator
    ):
        bound = 1.0 / np.sqrt(n_in)
        self.w = [Value(float(x)) for x in rng.uniform(-bound, bound, n_in)]
        self.b = Value(0.0)
        self.activation = activation
        self._act = _activation(activation)

    def __call__(self, x: Sequence[Value | float]) -> Value:
        if len(x) != len(self.w):
            raise ValueError(f"neuron expects {len(self.w)} inputs, got {len(x)}.")
        return self._act(value_sum(wi * xi for wi, xi in zip(self.w, x)) + self.b)

    def parameters(self) -> list[Value]:
        return self.w + [self.b]

    def __repr__(self) -> str:
        return f"{self.activation}Neuron({len(self.w)})"


class Layer(Module):
    def __init__(
        self,
        n_in: int,
        n_out: int,
        activation: str = "tanh",
        *,
        rng: np.random.Generator,
    ):
        self.neurons = [Neuron(n_in, activation, rng=rng) for _ in range(n_out)]

    def __call__(self, x: Sequence[Value | float]) -> list[Value]:
        return [n(x) for n in self.neurons]

    def parameters(self) -> list[Value]:
        return [p for n in self.neurons for p in n.parameters()]

    def __repr__(self) -> str:
        return f"Layer([{', '.join(map(repr, self.neurons))}])"


class MLP(Module):
    """Fully connected layers n_in -> sizes[0] -> ... -> sizes[-1].

    Hidden layers use `activation`; the last layer is linear (raw scores).
    A single output is returned as a Value, several as a list.
    """

    def __init__(
        self,
        n_in: int,
        sizes: Sequence[int],
        activation: str = "tanh",
        *,
        seed: int = 0,
    ):
        rng = np.random.default_rng(seed)
        dims = [n_in, *sizes]
        self.layers = [
            Layer(
                dims[i],
                dims[i + 1],
                activation if i < len(sizes) - 1 else "linear",
                rng=rng,
            )
            for i in range(len(sizes))
        ]

    def __call__(self, x: Sequence[Value | float]) -> Value | list[Value]:
        for layer in self.layers:
            x = layer(x)
        return x[0] if len(x) == 1 else x

    def parameters(self) -> list[Value]:
        return [p for layer in self.layers for p in layer.parameters()]

    def __repr__(self) -> str:
        return f"MLP of [{', '.join(map(repr, self.layers))}]"


class SGD:
    """Stochastic gradient descent, with optional (heavy-ball) momentum.

    velocity = momentum * velocity + grad;  p = p - lr * velocity
    """

    def __init__(self, params: Sequence[Value], lr: float, momentum: float = 0.0):
        if lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(
                f"need lr > 0 and 0 <= momentum < 1, got lr={lr}, momentum={momentum}."
            )
        self.params = list(params)
        self.lr = lr
        self.momentum = momentum
        self.velocity = [0.0] * len(self.params)

    def step(self) -> None:
        with no_grad():
            for i, p in enumerate(self.params):
                self.velocity[i] = self.momentum * self.velocity[i] + p.grad
                p.data -= self.lr * self.velocity[i]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = 0.0

"""Adam(W) for `Tensor` parameters, in numpy.

The same update as optax.adamw (and the core's optimizer), step t = 1, 2, ...:

    m = b1 m + (1 - b1) g          v = b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^t)         v_hat = v / (1 - b2^t)
    p = p - lr (m_hat / (sqrt(v_hat) + eps) + weight_decay p)

Weight decay is decoupled (AdamW): it shrinks p directly rather than adding
to the gradient, so Adam's per-coordinate scaling does not touch it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxgpt.micrograd.tensor import Tensor


class AdamW:
    """Adam with decoupled weight decay over a list of Tensors (see the module doc)."""

    def __init__(
        self,
        params: Sequence[Tensor],
        lr: float,
        b1: float = 0.9,
        b2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if lr <= 0 or not (0 <= b1 < 1 and 0 <= b2 < 1) or weight_decay < 0:
            raise ValueError(
                f"AdamW needs lr > 0, b1 and b2 in [0, 1), weight_decay >= 0; got"
                f" lr={lr}, b1={b1}, b2={b2}, weight_decay={weight_decay}."
            )
        self.params = list(params)
        self.lr, self.eps, self.weight_decay = lr, eps, weight_decay
        self.b1, self.b2 = b1, b2
        self.m = [np.zeros_like(p.data) for p in self.params]
        self.v = [np.zeros_like(p.data) for p in self.params]
        self.t = 0

    def step(self) -> None:
        self.t += 1
        b1, b2, t = self.b1, self.b2, self.t
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            update = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + self.eps)
            # A new array, not an in-place update: p.data may be the caller's array.
            p.data = p.data - self.lr * (update + self.weight_decay * p.data)

    def zero_grad(self) -> None:
        for p in self.params:
            p.zero_grad()

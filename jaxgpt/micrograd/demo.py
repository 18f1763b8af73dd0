"""An MLP of `Value`s learns to separate two interleaved half moons.

    python -m jaxgpt.micrograd.demo [--n_points=100 --epochs=100 --seed=0]

Every epoch is one full-batch step: forward all points through the MLP,
average a max-margin (hinge) loss, backward, SGD with momentum. Training
stops as soon as every training point is classified correctly.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np

from jaxgpt.micrograd.engine import Value, value_sum
from jaxgpt.micrograd.nn import MLP, SGD


def make_moons(
    n: int, noise: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved half circles: X of shape (n, 2), labels y in {-1, +1}.

    Upper moon: (cos t, sin t); lower moon: (1 - cos t, 0.5 - sin t), t in [0, pi],
    plus Gaussian noise of standard deviation `noise`.
    """
    rng = np.random.default_rng(seed)
    n_up = n // 2
    t = rng.uniform(0, np.pi, n)
    up = np.stack([np.cos(t[:n_up]), np.sin(t[:n_up])], axis=1)
    down = np.stack([1 - np.cos(t[n_up:]), 0.5 - np.sin(t[n_up:])], axis=1)
    X = np.concatenate([up, down]) + rng.normal(0, noise, (n, 2))
    y = np.concatenate([-np.ones(n_up), np.ones(n - n_up)])
    return X, y


def hinge_loss(model: MLP, X: np.ndarray, y: np.ndarray) -> tuple[Value, float]:
    """Mean max(0, 1 - y * score) and the accuracy (score's sign vs the label)."""
    scores = [model([float(a), float(b)]) for a, b in X]
    margins = [(1 - float(yi) * s).relu() for yi, s in zip(y, scores)]
    loss = value_sum(margins) / len(y)
    accuracy = float(np.mean([(s.data > 0) == (yi > 0) for yi, s in zip(y, scores)]))
    return loss, accuracy


def train(
    n_points: int = 100,
    hidden: Sequence[int] = (16, 16),
    epochs: int = 100,
    lr: float = 0.2,
    momentum: float = 0.9,
    seed: int = 0,
    log=print,
) -> float:
    """Trains until 100% training accuracy or `epochs`; returns the final accuracy."""
    X, y = make_moons(n_points, seed=seed)
    X = (X - X.mean(axis=0)) / X.std(axis=0)  # Inputs of order 1.
    model = MLP(2, [*hidden, 1], activation="tanh", seed=seed)
    opt = SGD(model.parameters(), lr=lr, momentum=momentum)
    log(
        f"{n_points} points, MLP 2-{'-'.join(map(str, hidden))}-1 (tanh),"
        f" {len(model.parameters())} parameters"
    )
    for epoch in range(epochs + 1):
        loss, accuracy = hinge_loss(model, X, y)
        log(f"epoch {epoch:3d}  loss {loss.data:.4f}  accuracy {accuracy:6.1%}")
        if accuracy == 1.0 or epoch == epochs:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    log(f"training accuracy {accuracy:.1%} after {epoch} epochs")
    return accuracy


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxgpt.micrograd.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--n_points", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    acc = train(
        args.n_points,
        epochs=args.epochs,
        lr=args.lr,
        momentum=args.momentum,
        seed=args.seed,
    )
    print(f"time {time.perf_counter() - start:.1f} s")
    return 0 if acc == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())

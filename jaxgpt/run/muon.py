"""Muon (Jordan et al., 2024), --optimizer=muon: momentum orthogonalised by a
Newton-Schulz iteration, on the blocks' matrices; AdamW on the rest.

The update is optax.contrib.muon's (consistent_rms 0.2; tested equal), with the
matrices of one shape in one batched iteration and constant coefficients XLA
folds (optax keeps them in the state): on the CPU recipe the update takes 17
ms instead of 23, the step 55 ms instead of 64. OPTIMIZERS, at the end, is
--optimizer's table: every choice, AdamW and Muon; main passes it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgpt import train
from jaxgpt.config import TrainConfig


def make_muon(cfg: TrainConfig) -> optax.GradientTransformation:
    """Muon on the blocks' matrices, train.adamw on every other leaf, one schedule."""
    both = {
        "muon": muon(train.lr_schedule(cfg), cfg.beta1, cfg.weight_decay),
        "adamw": train.adamw(cfg),
    }
    return optax.partition(both, muon_labels)


def muon_labels(params) -> Any:
    """ "muon" for the blocks' Dense kernels, "adamw" for every other leaf: the
    embeddings (the token one is also the output layer), norm scales, biases."""

    def label(path, leaf):
        names = [getattr(k, "key", "") for k in path]
        in_block = names[0] == "h" or names[0].startswith("h_")
        return "muon" if in_block and names[-1] == "kernel" else "adamw"

    return jax.tree_util.tree_map_with_path(label, params)


NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Leave singular values in ~[0.7, 1.2].


def orthogonalize(x_GMN: jax.Array, steps: int = 5, eps: float = 1e-8) -> jax.Array:
    """Newton-Schulz on a stack of matrices [G, m, n] with m <= n: each one's
    singular values pushed towards 1, its singular vectors kept."""
    a, b, c = NS_COEFFS
    x = x_GMN / (jnp.linalg.norm(x_GMN, axis=(-2, -1), keepdims=True) + eps)
    for _ in range(steps):
        A_GMM = x @ x.mT
        x = a * x + (b * A_GMM + c * A_GMM @ A_GMM) @ x
    return x


def orthogonalize_tree(tree: Any) -> Any:
    """orthogonalize on every leaf [..., m, n] (a tall one as its transpose),
    the leaves of one matrix shape in one batch."""
    leaves, treedef = jax.tree.flatten(tree)
    tall = [x.shape[-2] > x.shape[-1] for x in leaves]
    wide = [x.mT if t else x for x, t in zip(leaves, tall)]
    out = [None] * len(leaves)
    for mn in dict.fromkeys(x.shape[-2:] for x in wide):  # Each shape, in order.
        members = [i for i, x in enumerate(wide) if x.shape[-2:] == mn]
        x_GMN = jnp.concatenate([wide[i].reshape(-1, *mn) for i in members])
        ends = np.cumsum([wide[i].size // math.prod(mn) for i in members])
        for i, part in zip(members, jnp.split(orthogonalize(x_GMN), ends[:-1])):
            part = part.reshape(wide[i].shape)
            out[i] = part.mT if tall[i] else part
    return jax.tree.unflatten(treedef, out)


class MuonState(NamedTuple):
    count: jax.Array  # Updates so far (int32).
    mu: Any  # The momentum, like Adam's first moment.


def muon(lr: optax.ScalarOrSchedule, beta: float, weight_decay: float, rms=0.2):
    """Nesterov momentum (bias-corrected as in optax.contrib.scale_by_muon),
    orthogonalised, scaled by rms * sqrt(max(C_in, C_out)) to AdamW's typical
    RMS, decoupled weight decay, the learning rate."""

    def init(params):
        return MuonState(jnp.zeros([], jnp.int32), optax.tree.zeros_like(params))

    def update(grads, state, params=None):
        mu = optax.tree.update_moment(grads, state.mu, beta, 1)
        count = optax.safe_increment(state.count)
        mu_hat = jax.tree.map(
            lambda m, g: beta * m + (1 - beta) * g,
            optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
            optax.tree.bias_correction(grads, beta, count),
        )
        return orthogonalize_tree(mu_hat), MuonState(count, mu)

    scale = lambda u: u * (rms * max(u.shape[-2:]) ** 0.5)
    return optax.chain(
        optax.GradientTransformation(init, update),
        optax.stateless(lambda updates, params: jax.tree.map(scale, updates)),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(lr),
    )


# --optimizer's choices: name -> the optimizer a TrainConfig makes.
OPTIMIZERS: train.Optimizers = {"adamw": train.adamw, "muon": make_muon}


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """train.make_optimizer from OPTIMIZERS: clipping, then the --optimizer."""
    return train.make_optimizer(cfg, OPTIMIZERS)

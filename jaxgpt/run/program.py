"""The core's training program laid on the run's mesh, with --optimizer's table.

train.py's step, state, batches and evaluation run on one device; here each
is compiled for the mesh (layout.jit_on_mesh, with the shardings of its
arguments and results), each process drawing only its own devices' rows,
with the optimizer --optimizer names (muon.OPTIMIZERS). main.py, the tests
and the benchmarks run these.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxgpt import sharding, train
from jaxgpt.config import ModelConfig, TrainConfig
from jaxgpt.lecture import init_params, make_model
from jaxgpt.model import cross_entropy
from jaxgpt.run import layout, muon


@functools.lru_cache(maxsize=8)
def param_shapes(model_cfg: ModelConfig):
    """The parameters' shapes and dtypes, computing nothing (cached: tracing
    the model's init is a noticeable part of start-up)."""
    return jax.eval_shape(lambda: init_params(model_cfg, train.root_key(0)))


@functools.lru_cache(maxsize=8)
def state_shapes(model_cfg: ModelConfig, train_cfg: TrainConfig):
    """The TrainState's shapes and dtypes, with --optimizer's state."""
    tx = muon.make_optimizer(train_cfg)
    create = lambda p: train.create_state(
        model_cfg, train_cfg, train.root_key(0), p, tx
    )
    return jax.eval_shape(create, param_shapes(model_cfg))


def abstract_params(model_cfg: ModelConfig, mesh: Mesh):
    """The parameters' shapes, dtypes and shardings on `mesh` (to restore into)."""
    return layout.on_mesh(param_shapes(model_cfg), mesh)


def abstract_state(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh):
    """The TrainState's shapes, dtypes and shardings on `mesh`: a target to
    create or restore a run's state into."""
    return layout.on_mesh(state_shapes(model_cfg, train_cfg), mesh)


def create_state(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    root: jax.Array,
    mesh: Mesh,
    params: Any = None,
):
    """train.create_state on `mesh`: each device creates (or receives, of
    `params`) only its shards."""
    tx = muon.make_optimizer(train_cfg)
    create = functools.partial(train.create_state, model_cfg, train_cfg, root, tx=tx)
    shardings = layout.state_shardings(state_shapes(model_cfg, train_cfg), mesh)
    return jax.jit(create, out_shardings=shardings)(params)


def make_train_step(
    model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh, packed: bool = False
):
    """train.make_train_step with --optimizer, compiled for `mesh`:
    step(state, x_BT, y_BT, root) -> (state, metrics), the state laid out by
    layout.state_shardings (and donated), the batch's rows split over the
    devices, the key and the metrics whole on each. With `packed`:
    step(state, x_BT, y_BT, root, packed) on rows of packed conversations."""
    layout.check_batch(train_cfg.batch_size, train_cfg.grad_accum_steps, mesh)
    step = train.make_train_step(model_cfg, train_cfg, muon.make_optimizer(train_cfg))
    state = layout.state_shardings(state_shapes(model_cfg, train_cfg), mesh)
    rows, rep = layout.batch_sharding(mesh), layout.replicated(mesh)
    return layout.jit_on_mesh(
        step,
        mesh,
        in_shardings=(state, rows, rows, rep, *([rows] if packed else [])),
        out_shardings=(state, rep),
        donate_argnums=0,  # The old state's buffers hold the new one.
    )


def make_eval_loss(model_cfg: ModelConfig, mesh: Mesh):
    """train.make_eval_loss compiled for `mesh`: add_losses(params, total,
    x_KbT, y_KbT), the rows of each of the K batches split over the devices."""
    params = layout.state_shardings(param_shapes(model_cfg), mesh)
    rows, rep = layout.batch_sharding(mesh, 1), layout.replicated(mesh)
    add_losses = train.make_eval_loss(model_cfg)
    shardings = (params, rep, rows, rows)
    return layout.jit_on_mesh(
        add_losses, mesh, in_shardings=shardings, out_shardings=rep
    )


def make_packed_eval_loss(model_cfg: ModelConfig, mesh: Mesh):
    """add_losses(params, total_2, x_KbT, y_KbT, packed_K) -> total_2 plus
    [the sum of the losses weighted by w_BT, the sum of w_BT] of K batches of
    rows of packed conversations (train.loss_and_grads' `packed`), without
    dropout; the rows of each batch split over the devices."""
    apply_fn = make_model(model_cfg).apply

    def add_losses(params, total_2, x_KbT, y_KbT, packed_K):
        params = sharding.gather(params)

        def add(total_2, batch):
            x_bT, y_bT, packed = sharding.split_batch(batch)
            rows = dict(packed)  # seg_BT and pos_BT go to the model, w_BT to the loss.
            w_bT = rows.pop("w_BT")
            logits = apply_fn({"params": params}, x_bT, deterministic=True, **rows)
            losses = jnp.stack([cross_entropy(logits, y_bT, w_bT), w_bT.sum()])
            return total_2 + losses, None

        return jax.lax.scan(add, total_2, (x_KbT, y_KbT, packed_K))[0]

    params = layout.state_shardings(param_shapes(model_cfg), mesh)
    rows, rep = layout.batch_sharding(mesh, 1), layout.replicated(mesh)
    return layout.jit_on_mesh(
        add_losses,
        mesh,
        in_shardings=(params, rep, rows, rows, rows),
        out_shardings=rep,
    )


def make_batches(
    tokens: np.ndarray, root: jax.Array, batch_size: int, block_size: int, mesh: Mesh
) -> Callable[[int], tuple[jax.Array, jax.Array]]:
    """train.make_batches on `mesh`: batch(step) -> (x_BT, y_BT) split by rows
    over the devices, each process drawing only its own rows."""
    rows, shape = layout.process_rows(mesh, batch_size), (batch_size, block_size)
    batch = train.make_batches(tokens, root, batch_size, block_size, rows)
    return lambda step: tuple(layout.put_batch(z, shape, mesh) for z in batch(step))


def make_evaluate(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    splits: dict[str, np.ndarray],
    root: jax.Array,
    mesh: Mesh,
    token_bytes: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None,
) -> Callable[[Any], dict[str, float]]:
    """train.make_evaluate on `mesh`: evaluate(params) -> {"<split>_loss": the
    same batches' mean loss, and with token_bytes (each token's length in
    UTF-8 bytes) "<split>_bpb": bits per byte}.

    Bits per byte, loss x tokens / (bytes x ln 2), compare models whatever
    their tokenizer. With `progress`, the batches go in about 20 pieces (at
    most two sizes: two compiled programs), progress(k) after each.
    """
    n = train_cfg.eval_iters * train_cfg.grad_accum_steps
    b, T = train_cfg.batch_size // train_cfg.grad_accum_steps, model_cfg.block_size
    bounds = np.linspace(0, n, min(n, 20) + 1 if progress else 2).astype(int)
    rows = layout.process_rows(mesh, b)

    def piece(tokens, a: int, z: int):  # Batches a .. z - 1, rows split.
        xy = train.eval_batches(tokens, root, z - a, b, T, a, rows)
        return tuple(layout.put_batch(w, (z - a, b, T), mesh, 1) for w in xy)

    batches = {
        name: [piece(t, a, z) for a, z in pairwise(bounds)]
        for name, t in splits.items()
    }
    add_losses = make_eval_loss(model_cfg, mesh)
    bytes_per_token = {}  # Of each split's evaluation windows.
    if token_bytes is not None:
        count = jax.jit(lambda y: jnp.sum(jnp.take(jnp.asarray(token_bytes), y)))
        for name, pieces in batches.items():
            total_bytes = sum(float(count(y_KbT)) for _, y_KbT in pieces)
            bytes_per_token[name] = total_bytes / (n * b * T)

    def evaluate(params) -> dict[str, float]:
        out = {}
        for name, pieces in batches.items():
            total = np.float32(0.0)
            for x_KbT, y_KbT in pieces:
                total = add_losses(params, total, x_KbT, y_KbT)
                if progress is not None:
                    progress(x_KbT.shape[0])
            loss = out[f"{name}_loss"] = float(total) / n
            if name in bytes_per_token:
                out[f"{name}_bpb"] = loss / (bytes_per_token[name] * math.log(2))
        return out

    return evaluate

"""Training: the random streams, the optimizer, the one compiled step, evaluation.

A run is a function of (configs, tokens, seed): step s trains on the batch the
batch stream draws at s, with the dropout stream's key at s, so a run resumed
from its checkpoint at step N reproduces the uninterrupted run bit for bit.
One program runs on one device or a mesh of many (sharding.py lays out the
state and the batch). loop.py runs these steps with checkpoints and guards.
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
import optax
from flax import struct
from jax.sharding import Mesh

from jaxgpt import data, sharding
from jaxgpt.config import ModelConfig, TrainConfig
from jaxgpt.lecture import init_params, make_model
from jaxgpt.model import cross_entropy

# --- Random streams: every key of a run from one root ----------------------------
#
#     root_key(seed)            = PRNGKey(seed)
#     stream(root, name)        = fold_in(root, TAGS[name])     one key per stream
#     stream_key(root, name, i) = fold_in(stream(root, name), i)  draw i of it
#
# i counts steps for batch and dropout, batches for eval, tokens for sample
# (params uses the stream key itself; batches are drawn on the host by numpy).
# Each stream hangs off the root under its own tag, so no two streams ever
# share a key (tests/test_streams.py).

TAGS = {"params": 1, "batch": 2, "dropout": 3, "eval": 4, "sample": 5}


def root_key(seed: int) -> jax.Array:
    """The run's root key: the only place the seed enters."""
    return jax.random.PRNGKey(seed)


def stream(root: jax.Array, name: str) -> jax.Array:
    """The key of the stream `name` (one of TAGS)."""
    return jax.random.fold_in(root, TAGS[name])


def stream_key(root: jax.Array, name: str, i) -> jax.Array:
    """Draw `i` of stream `name`; `i` may be traced (the step inside jit)."""
    return jax.random.fold_in(stream(root, name), i)


def host_rng(stream_of: jax.Array, i: int) -> np.random.Generator:
    """numpy's generator for draw `i` of a stream (no JAX work)."""
    words = np.asarray(stream_of, dtype=np.uint32).tolist()
    return np.random.default_rng([*words, i])


# --- The optimizer -----------------------------------------------------------------


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate, cosine decay to min_lr, then flat."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_iters,
        decay_steps=cfg.lr_decay_iters,
        end_value=cfg.min_lr,
    )


def decay_mask(params: dict[str, Any]) -> dict[str, Any]:
    """True for the weight matrices (AdamW decays those), False for biases and
    scales. The leading L axis of scan_layers' stacked blocks doesn't count."""
    return {
        name: jax.tree.map(lambda p, L=int(name == "h"): p.ndim - L >= 2, tree)
        for name, tree in params.items()
    }


def adamw(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW on lr_schedule, with weight decay on the matrices only."""
    lr, decay = lr_schedule(cfg), cfg.weight_decay
    return optax.adamw(lr, cfg.beta1, cfg.beta2, weight_decay=decay, mask=decay_mask)


# --optimizer's choices: name -> the optimizer a TrainConfig makes. Another one
# registers here from its own module, which the engine imports (muon.py: "muon").
OPTIMIZERS: dict[str, Callable[[TrainConfig], optax.GradientTransformation]] = {
    "adamw": adamw
}


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping (--grad_clip), then the --optimizer."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"--optimizer={cfg.optimizer} is not registered: import the module that"
            f" registers it first (import jaxgpt.{cfg.optimizer})."
        )
    # identity() keeps the state's structure the same whether or not we clip.
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else None
    return optax.chain(clip or optax.identity(), OPTIMIZERS[cfg.optimizer](cfg))


# --- The state and the compiled training step ----------------------------------------


@struct.dataclass
class TrainState:
    """What training changes, as arrays only (the model and the optimizer live
    in the compiled step), so shardings and checkpoints describe data alone."""

    step: jax.Array  # The number of updates so far: the next batch's step.
    params: Any
    opt_state: Any


def create_state(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    root: jax.Array,
    mesh: Mesh | None = None,
    params: Any = None,
) -> TrainState:
    """A fresh TrainState at step 0: parameters from the params stream (or
    `params`, e.g. GPT-2's), the optimizer's moments at 0; on a mesh, each
    device creates (or receives) only its shards."""

    def create(params):
        if params is None:
            params = init_params(model_cfg, stream(root, "params"))
        opt_state = make_optimizer(train_cfg).init(params)
        return TrainState(jnp.array(0, jnp.int32), params, opt_state)

    if mesh is None:
        return create(params)
    shapes = abstract_state(model_cfg, train_cfg, mesh)  # Traced once per run.
    return jax.jit(create, out_shardings=sharding.state_shardings(shapes, mesh))(params)


@functools.lru_cache(maxsize=8)
def abstract_state(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh):
    """The state's shapes, dtypes and shardings on `mesh`: a target to restore
    into (cached: tracing the model's init is a noticeable part of start-up)."""
    params = abstract_params(model_cfg, mesh)
    create = lambda p: create_state(model_cfg, train_cfg, root_key(0), params=p)
    return sharding.on_mesh(jax.eval_shape(create, params), mesh)


@functools.lru_cache(maxsize=8)
def abstract_params(model_cfg: ModelConfig, mesh: Mesh):
    """The parameters' shapes, dtypes and shardings on `mesh` (for sampling)."""
    init = lambda: init_params(model_cfg, root_key(0))
    return sharding.on_mesh(jax.eval_shape(init), mesh)


def loss_and_grads(apply_fn, params, x_BT, y_BT, key, mesh: Mesh | None = None):
    """Mean cross-entropy of the batch (with dropout from `key`) and its gradient.
    On a mesh the forward pass gathers whole parameters (FSDP), activations
    are split by rows, and gradients are summed onto their parameter's shards."""
    x_BT, y_BT = sharding.split_batch((x_BT, y_BT), mesh)

    def loss_fn(params):
        variables = {"params": sharding.gather(params, mesh)}
        logits_BTV = apply_fn(
            variables, x_BT, deterministic=False, rngs={"dropout": key}
        )
        return cross_entropy(logits_BTV, y_BT)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return loss, sharding.shard_like_params(grads, mesh)


def accumulate(
    apply_fn, params, x_BT, y_BT, key, n_micro: int, mesh: Mesh | None = None
):
    """loss_and_grads of the batch, from `n_micro` micro-batches in turn (a
    lax.scan: one's activations alive at a time); the mean of their means is
    the batch's. Micro-batch a holds rows a, a + n_micro, ... (each device
    keeps its own rows) and draws its dropout from fold_in(key, a)."""
    if n_micro == 1:
        return loss_and_grads(apply_fn, params, x_BT, y_BT, key, mesh)
    B, T = x_BT.shape
    # [B, T] -> [n_micro, b, T], b = B / n_micro: row i goes to micro-batch i % n_micro.
    micro = lambda z_BT: z_BT.reshape(B // n_micro, n_micro, T).swapaxes(0, 1)

    def add(total, xs):
        a, x_bT, y_bT = xs
        key_a = jax.random.fold_in(key, a)
        loss_grads = loss_and_grads(apply_fn, params, x_bT, y_bT, key_a, mesh)
        return jax.tree.map(jnp.add, total, loss_grads), None

    zeros = jax.tree.map(jnp.zeros_like, (jnp.float32(0.0), params))
    xs = (jnp.arange(n_micro), micro(x_BT), micro(y_BT))
    total, _ = jax.lax.scan(add, zeros, xs)
    return jax.tree.map(lambda t: t / n_micro, total)


def make_train_step(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh):
    """The compiled training step: step(state, x_BT, y_BT, root) -> (state, metrics).

    One optimizer update on the batch, with dropout from stream_key(root,
    "dropout", state.step). The batch is split by rows over the devices; the
    old state is donated (its buffers hold the new one).
    """
    sharding.check_batch(train_cfg.batch_size, train_cfg.grad_accum_steps, mesh)
    apply_fn, tx = make_model(model_cfg).apply, make_optimizer(train_cfg)
    n_micro = train_cfg.grad_accum_steps

    def step(state: TrainState, x_BT, y_BT, root):
        dropout_key = stream_key(root, "dropout", state.step)
        loss, grads = accumulate(
            apply_fn, state.params, x_BT, y_BT, dropout_key, n_micro, mesh
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return TrainState(state.step + 1, params, opt_state), metrics

    state_shardings = sharding.state_shardings(
        abstract_state(model_cfg, train_cfg, mesh), mesh
    )
    batch, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch, batch, rep),
        out_shardings=(state_shardings, rep),
        donate_argnums=0,
    )


# --- Batches and evaluation ----------------------------------------------------


def make_batches(
    tokens: np.ndarray, root: jax.Array, batch_size: int, block_size: int, mesh: Mesh
) -> Callable[[int], tuple[jax.Array, jax.Array]]:
    """batch(step) -> (x_BT, y_BT) of training step `step`, split over the mesh:
    drawn on the host from the batch stream (no JAX work per step), each
    process reading only its own devices' rows."""
    batch_stream = np.asarray(stream(root, "batch"))
    rows = sharding.process_rows(mesh, batch_size)
    shape = (batch_size, block_size)

    def batch(step: int):
        rng = host_rng(batch_stream, step)
        xy = data.get_batch(tokens, rng, batch_size, block_size, rows)
        return tuple(sharding.put_batch(z_bT, shape, mesh) for z_bT in xy)

    return batch


def eval_batches(
    tokens: np.ndarray,
    root: jax.Array,
    n: int,
    b: int,
    T: int,
    mesh: Mesh,
    start: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """x_NbT, y_NbT: the run's fixed evaluation batches start .. start + n - 1,
    of `b` rows from `tokens`, drawn from the eval stream, rows split over the
    mesh."""
    eval_stream, rows = np.asarray(stream(root, "eval")), sharding.process_rows(mesh, b)
    pairs = [
        data.get_batch(tokens, host_rng(eval_stream, i), b, T, rows)
        for i in range(start, start + n)
    ]
    x_NbT, y_NbT = (np.stack(arrays) for arrays in zip(*pairs))
    return tuple(
        sharding.put_batch(z, (n, b, T), mesh, row_axis=1) for z in (x_NbT, y_NbT)
    )


def make_eval_loss(model_cfg: ModelConfig, mesh: Mesh):
    """The compiled evaluation: add_losses(params, total, x_KbT, y_KbT) -> total
    plus the losses, without dropout, of K batches of b rows (one lax.scan),
    laid out as in training."""
    apply_fn = make_model(model_cfg).apply

    def add_losses(params, total, x_KbT, y_KbT):
        params = sharding.gather(params, mesh)

        def add(total, xy):
            x_bT, y_bT = sharding.split_batch(xy, mesh)
            logits_bTV = apply_fn({"params": params}, x_bT, deterministic=True)
            return total + cross_entropy(logits_bTV, y_bT), None

        return jax.lax.scan(add, total, (x_KbT, y_KbT))[0]

    params = sharding.state_shardings(abstract_params(model_cfg, mesh), mesh)
    rows, rep = sharding.batch_sharding(mesh, row_axis=1), sharding.replicated(mesh)
    shardings = (params, rep, rows, rows)
    return jax.jit(add_losses, in_shardings=shardings, out_shardings=rep)


def make_evaluate(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    splits: dict[str, np.ndarray],
    root: jax.Array,
    mesh: Mesh,
    token_bytes: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None,
) -> Callable[[Any], dict[str, float]]:
    """evaluate(params) -> {"<split>_loss": mean loss without dropout, and with
    token_bytes (each token's length in UTF-8 bytes) "<split>_bpb": bits per byte}.

    Every evaluation of a run sees the same eval_iters batches per split (as
    grad_accum_steps micro-batches each, as in training). Bits per byte, loss
    x tokens / (bytes x ln 2), compare models whatever their tokenizer. With
    `progress`, the batches go in about 20 pieces, progress(k) after each.
    """
    n = train_cfg.eval_iters * train_cfg.grad_accum_steps
    b, T = train_cfg.batch_size // train_cfg.grad_accum_steps, model_cfg.block_size
    bounds = np.linspace(0, n, min(n, 20) + 1 if progress else 2).astype(int)
    batches = {  # Pieces of at most two sizes: at most two compiled programs.
        name: [eval_batches(t, root, z - a, b, T, mesh, a) for a, z in pairwise(bounds)]
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

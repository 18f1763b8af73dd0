"""Training: the random streams, the optimizer, the one compiled step, evaluation.

A run is a function of (configs, tokens, seed): step s trains on the batch the
batch stream draws at s, with the dropout stream's key at s, so a run resumed
from its checkpoint at step N reproduces the uninterrupted run bit for bit.
Everything here runs on one device as it is; the engine lays the same step
and evaluation on a mesh of many (run/program.py, with run/layout.py)
and runs the steps with checkpoints and guards (run/loop.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

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


Optimizers = Mapping[str, Callable[[TrainConfig], optax.GradientTransformation]]
# The core's optimizer. The engine's table, jaxgpt.run.muon.OPTIMIZERS, holds
# every --optimizer (AdamW and Muon): main passes it.
OPTIMIZERS: Optimizers = {"adamw": adamw}


def make_optimizer(
    cfg: TrainConfig, optimizers: Optimizers = OPTIMIZERS
) -> optax.GradientTransformation:
    """Global-norm clipping (--grad_clip), then optimizers[--optimizer]."""
    if cfg.optimizer not in optimizers:
        raise ValueError(
            f"--optimizer={cfg.optimizer} is not in this table ({', '.join(optimizers)}):"
            " jaxgpt.run.muon.make_optimizer(cfg) builds every --optimizer (its"
            " OPTIMIZERS); pass what it returns as tx."
        )
    # identity() keeps the state's structure the same whether or not we clip.
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else None
    return optax.chain(clip or optax.identity(), optimizers[cfg.optimizer](cfg))


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
    params: Any = None,
    tx: optax.GradientTransformation | None = None,
) -> TrainState:
    """A fresh TrainState at step 0: parameters from the params stream (or
    `params`, e.g. GPT-2's), the optimizer's moments at 0. `tx`: the optimizer
    (make_optimizer(train_cfg) unless given)."""
    if params is None:
        params = init_params(model_cfg, stream(root, "params"))
    tx = tx or make_optimizer(train_cfg)
    return TrainState(jnp.array(0, jnp.int32), params, tx.init(params))


def loss_and_grads(apply_fn, params, x_BT, y_BT, key, packed=None):
    """Mean cross-entropy of the batch (with dropout from `key`) and its gradient;
    of rows of packed conversations, packed = {"w_BT", "seg_BT", "pos_BT"}: the
    sum of the losses weighted by w_BT (the loss mask). On a mesh the forward
    pass gathers whole parameters (FSDP), activations are split by rows, and
    gradients are summed onto their parameter's shards."""
    x_BT, y_BT, packed = sharding.split_batch((x_BT, y_BT, packed))
    rows = dict(packed or {})  # seg_BT and pos_BT go to the model, w_BT to the loss.
    w_BT = rows.pop("w_BT", None)

    def loss_fn(params):
        variables = {"params": sharding.gather(params)}
        logits_BTV = apply_fn(
            variables, x_BT, deterministic=False, rngs={"dropout": key}, **rows
        )
        return cross_entropy(logits_BTV, y_BT, w_BT)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return loss, sharding.shard_like_params(grads)


def accumulate(apply_fn, params, x_BT, y_BT, key, n_micro: int, packed=None):
    """loss_and_grads of the batch, from `n_micro` micro-batches in turn (a
    lax.scan: one's activations alive at a time); the mean of their means is
    the batch's, and with `packed` rows sum(ce * w) / max(sum(w), 1), summed
    over the micro-batches before dividing (each learned token weighs the
    same). Micro-batch a holds rows a, a + n_micro, ... (each device keeps its
    own rows) and draws its dropout from fold_in(key, a)."""
    if n_micro == 1 and packed is None:
        return loss_and_grads(apply_fn, params, x_BT, y_BT, key)
    B, T = x_BT.shape
    # [B, T] -> [n_micro, b, T], b = B / n_micro: row i goes to micro-batch i % n_micro.
    micro = lambda z_BT: z_BT.reshape(B // n_micro, n_micro, T).swapaxes(0, 1)

    def add(total, xs):
        a, x_bT, y_bT, packed_b = xs
        key_a = jax.random.fold_in(key, a) if n_micro > 1 else key
        loss_grads = loss_and_grads(apply_fn, params, x_bT, y_bT, key_a, packed_b)
        return jax.tree.map(jnp.add, total, loss_grads), None

    zeros = jax.tree.map(jnp.zeros_like, (jnp.float32(0.0), params))
    xs = (jnp.arange(n_micro), *jax.tree.map(micro, (x_BT, y_BT, packed)))
    total, _ = jax.lax.scan(add, zeros, xs)
    n = n_micro if packed is None else jnp.maximum(packed["w_BT"].sum(), 1.0)
    return jax.tree.map(lambda t: t / n, total)


def make_train_step(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    tx: optax.GradientTransformation | None = None,
):
    """The compiled training step: step(state, x_BT, y_BT, root) -> (state, metrics);
    step(state, x_BT, y_BT, root, packed) on rows of packed conversations.

    One update of `tx` (make_optimizer(train_cfg) unless given) on the batch,
    with dropout from stream_key(root, "dropout", state.step). The old state
    is donated (its buffers hold the new one).
    """
    apply_fn, tx = make_model(model_cfg).apply, tx or make_optimizer(train_cfg)
    n_micro = train_cfg.grad_accum_steps

    def step(state: TrainState, x_BT, y_BT, root, packed=None):
        dropout_key = stream_key(root, "dropout", state.step)
        loss, grads = accumulate(
            apply_fn, state.params, x_BT, y_BT, dropout_key, n_micro, packed
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return jax.jit(step, donate_argnums=0)


# --- Batches and evaluation ----------------------------------------------------


def make_batches(
    tokens: np.ndarray,
    root: jax.Array,
    batch_size: int,
    block_size: int,
    rows: slice = slice(None),
) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
    """batch(step) -> (x_BT, y_BT) of training step `step`, drawn on the host
    from the batch stream (no JAX work per step); `rows` of it only (a
    process's share on a mesh: run/program.make_batches)."""
    batch_stream = np.asarray(stream(root, "batch"))
    return lambda step: data.get_batch(
        tokens, host_rng(batch_stream, step), batch_size, block_size, rows
    )


def eval_batches(
    tokens: np.ndarray,
    root: jax.Array,
    n: int,
    b: int,
    T: int,
    start: int = 0,
    rows: slice = slice(None),
) -> tuple[np.ndarray, np.ndarray]:
    """x_NbT, y_NbT: the run's fixed evaluation batches start .. start + n - 1,
    of `b` rows from `tokens`, drawn from the eval stream (`rows` of each)."""
    eval_stream = np.asarray(stream(root, "eval"))
    pairs = [
        data.get_batch(tokens, host_rng(eval_stream, i), b, T, rows)
        for i in range(start, start + n)
    ]
    return tuple(np.stack(arrays) for arrays in zip(*pairs))


def make_eval_loss(model_cfg: ModelConfig):
    """The compiled evaluation: add_losses(params, total, x_KbT, y_KbT) -> total
    plus the losses, without dropout, of K batches of b rows (one lax.scan)."""
    apply_fn = make_model(model_cfg).apply

    def add_losses(params, total, x_KbT, y_KbT):
        params = sharding.gather(params)

        def add(total, xy):
            x_bT, y_bT = sharding.split_batch(xy)
            logits_bTV = apply_fn({"params": params}, x_bT, deterministic=True)
            return total + cross_entropy(logits_bTV, y_bT), None

        return jax.lax.scan(add, total, (x_KbT, y_KbT))[0]

    return jax.jit(add_losses)


def make_evaluate(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    splits: dict[str, np.ndarray],
    root: jax.Array,
) -> Callable[[Any], dict[str, float]]:
    """evaluate(params) -> {"<split>_loss": its mean loss without dropout}: the
    lecture's estimate_loss. Every evaluation of a run sees the same
    eval_iters batches per split (as grad_accum_steps micro-batches each, as
    in training)."""
    n = train_cfg.eval_iters * train_cfg.grad_accum_steps
    b, T = train_cfg.batch_size // train_cfg.grad_accum_steps, model_cfg.block_size
    batches = {name: eval_batches(t, root, n, b, T) for name, t in splits.items()}
    add_losses = make_eval_loss(model_cfg)

    def evaluate(params) -> dict[str, float]:
        return {
            f"{name}_loss": float(add_losses(params, np.float32(0.0), x, y)) / n
            for name, (x, y) in batches.items()
        }

    return evaluate

"""Training: the optimizer, the one compiled train step, evaluation, and the loop.

A run is a function of (configs, tokens, seed): step s trains on the batch
drawn by the batch stream at s and drops out with the dropout stream's key at
s (see streams.py), so a run stopped at step N and resumed from its checkpoint
reproduces the uninterrupted run bit for bit.

The same program runs on one device or a mesh of many (see sharding.py): the
state and the batch are laid out on the mesh, and jit compiles one program for
all its devices. Every process of a multi-host run executes the loop; process
0 alone writes the log and metrics, and all of them write the checkpoint together.

The loop saves only states that are finite and whose losses have not diverged,
stops at a step boundary on SIGINT/SIGTERM (all processes at the same step),
and also saves every --save_every_minutes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct
from jax.sharding import Mesh

from jaxgpt import data, muon, sharding, streams
from jaxgpt.checkpoint import Checkpointer, on_host
from jaxgpt.config import ConfigError, ModelConfig, TrainConfig
from jaxgpt.model import cross_entropy, decay_mask, init_params, make_model
from jaxgpt.stops import StopRequest

# --- The optimizer and the state ---------------------------------------------


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate, cosine decay to min_lr, then flat."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_iters,
        decay_steps=cfg.lr_decay_iters,
        end_value=cfg.min_lr,
    )


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """After global-norm clipping: AdamW with weight decay on the matrices only,
    or (--optimizer=muon) Muon on the blocks' matrices and that AdamW on the rest."""
    adamw = optax.adamw(
        lr_schedule(cfg),
        b1=cfg.beta1,
        b2=cfg.beta2,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    # identity() keeps the state's structure the same whether or not we clip.
    clip = (
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity()
    )
    if cfg.optimizer == "muon":
        return optax.chain(
            clip, optax.partition({"muon": make_muon(cfg), "adamw": adamw}, muon_labels)
        )
    return optax.chain(clip, adamw)


def muon_labels(params) -> Any:
    """ "muon" for the blocks' Dense kernels, "adamw" for every other leaf: the
    embeddings (the token one is also the output layer), LayerNorm scales, biases."""

    def label(path, leaf):
        names = [getattr(k, "key", "") for k in path]
        in_block = names[0] == "h" or names[0].startswith("h_")
        return "muon" if in_block and names[-1] == "kernel" else "adamw"

    return jax.tree_util.tree_map_with_path(label, params)


def make_muon(cfg: TrainConfig) -> optax.GradientTransformation:
    """Muon (muon.py: optax.contrib.muon's update, batched) for the blocks'
    kernels ([C_in, C_out], or stacked [L, C_in, C_out] with scan_layers),
    momentum beta1, decoupled weight decay. Its updates are scaled to AdamW's
    RMS (0.2), so the one learning-rate schedule serves both halves."""
    return muon.muon(lr_schedule(cfg), beta=cfg.beta1, weight_decay=cfg.weight_decay)


@struct.dataclass
class TrainState:
    """What training changes, and nothing else: arrays only (the model and the
    optimizer live in the compiled step), so shardings and checkpoints describe
    data alone."""

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
    """A fresh TrainState: parameters from the params stream (or `params`, e.g.
    imported GPT-2 weights), AdamW's moments at 0, step 0.

    With a mesh, each device creates (or receives) only its shards of the state.
    """

    def create(params):
        if params is None:
            params = init_params(model_cfg, streams.stream(root, "params"))
        opt_state = make_optimizer(train_cfg).init(params)
        step = jnp.array(0, jnp.int32)
        return TrainState(step=step, params=params, opt_state=opt_state)

    if mesh is None:
        return create(params)
    shapes = abstract_state(model_cfg, train_cfg, mesh)  # Traced once per run.
    shardings = sharding.state_shardings(shapes, mesh)
    return jax.jit(create, out_shardings=shardings)(params)


@functools.lru_cache(maxsize=8)
def abstract_state(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh):
    """The state's shapes, dtypes and shardings on `mesh`: a target to restore into.

    Cached, and built on abstract_params: tracing the model's init takes a
    noticeable part of start-up, and is done once."""
    params = abstract_params(model_cfg, mesh)
    create = lambda p: create_state(model_cfg, train_cfg, streams.root(0), params=p)
    return sharding.on_mesh(jax.eval_shape(create, params), mesh)


@functools.lru_cache(maxsize=8)
def abstract_params(model_cfg: ModelConfig, mesh: Mesh):
    """The parameters' shapes, dtypes and shardings on `mesh` (for sampling)."""
    init = lambda: init_params(model_cfg, streams.root(0))
    return sharding.on_mesh(jax.eval_shape(init), mesh)


# --- The compiled training step ------------------------------------------------


def loss_and_grads(apply_fn, params, x_BT, y_BT, key, mesh: Mesh | None = None):
    """Mean cross-entropy of the batch (with dropout from `key`) and its gradient.

    On a mesh, the model runs on whole parameters (FSDP gathers their shards)
    and on activations split by batch rows; each gradient is then summed over
    the devices onto its parameter's shards.
    """
    x_BT, y_BT = sharding.split_batch((x_BT, y_BT), mesh)

    def loss_fn(params):
        logits_BTV = apply_fn(
            {"params": sharding.gather(params, mesh)},
            x_BT,
            deterministic=False,
            rngs={"dropout": key},
        )
        return cross_entropy(logits_BTV, y_BT)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return loss, sharding.shard_like_params(grads, mesh)


def accumulate(
    apply_fn, params, x_BT, y_BT, key, n_micro: int, mesh: Mesh | None = None
):
    """loss_and_grads of the batch, computed on `n_micro` micro-batches in turn.

    Only one micro-batch's activations are alive at a time (a lax.scan). The
    mean of the micro-batch means is the mean over the batch, so the result
    equals one pass over the whole batch, dropout aside: micro-batch a holds
    rows a, a + n_micro, a + 2 * n_micro, ... (so each device keeps its own
    rows) and draws its dropout from fold_in(key, a).
    """
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

    One AdamW update on the batch; its dropout key is derived inside, from the
    step number: streams.key(root, "dropout", state.step). The state is laid out
    by sharding.state_shardings, the batch split by rows over the devices, the
    root key and the metrics (loss, gradient norm) replicated;
    the old state is donated: its buffers hold the new one.
    """
    sharding.check_batch(train_cfg.batch_size, train_cfg.grad_accum_steps, mesh)
    apply_fn, tx = make_model(model_cfg).apply, make_optimizer(train_cfg)
    n_micro = train_cfg.grad_accum_steps

    def step(state: TrainState, x_BT, y_BT, root):
        key = streams.key(root, "dropout", state.step)
        loss, grads = accumulate(apply_fn, state.params, x_BT, y_BT, key, n_micro, mesh)
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
    """batch(step) -> (x_BT, y_BT) of training step `step`, split over the mesh.

    Drawn on the host from the batch stream (numpy: no JAX work per step); each
    process reads only its own devices' rows.
    """
    stream = np.asarray(streams.stream(root, "batch"))
    rows = sharding.process_rows(mesh, batch_size)
    shape = (batch_size, block_size)

    def batch(step: int):
        rng = streams.host_rng(stream, step)
        x_bT, y_bT = data.get_batch(tokens, rng, batch_size, block_size, rows)
        return sharding.put_batch(x_bT, shape, mesh), sharding.put_batch(
            y_bT, shape, mesh
        )

    return batch


def eval_batches(
    tokens: np.ndarray, root: jax.Array, n: int, b: int, T: int, mesh: Mesh
) -> tuple[jax.Array, jax.Array]:
    """x_NbT, y_NbT: the run's `n` fixed evaluation batches of `b` rows from
    `tokens`, drawn from the eval stream, rows split over the mesh."""
    stream, rows = (
        np.asarray(streams.stream(root, "eval")),
        sharding.process_rows(mesh, b),
    )
    pairs = [
        data.get_batch(tokens, streams.host_rng(stream, i), b, T, rows)
        for i in range(n)
    ]
    x_NbT, y_NbT = (np.stack(arrays) for arrays in zip(*pairs))
    return tuple(
        sharding.put_batch(z, (n, b, T), mesh, row_axis=1) for z in (x_NbT, y_NbT)
    )


def make_evaluate(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    splits: dict[str, np.ndarray],
    root: jax.Array,
    mesh: Mesh,
    token_bytes: np.ndarray | None = None,
) -> Callable[[Any], dict[str, float]]:
    """evaluate(params) -> {"<split>_loss": mean loss without dropout, and with
    token_bytes (each token's length in UTF-8 bytes) "<split>_bpb": bits per byte}.

    Every evaluation of a run sees the same batches: eval_iters of them per
    split, each as grad_accum_steps micro-batches as in training. One compiled
    scan over them gives a split's mean. Bits per byte, loss x tokens / (bytes
    x ln 2) over the same windows, compare models whatever their tokenizer.
    """
    n = train_cfg.eval_iters * train_cfg.grad_accum_steps
    b, T = train_cfg.batch_size // train_cfg.grad_accum_steps, model_cfg.block_size
    batches = {name: eval_batches(t, root, n, b, T, mesh) for name, t in splits.items()}
    apply_fn = make_model(model_cfg).apply

    def mean_loss(params, x_NbT, y_NbT):
        params = sharding.gather(params, mesh)

        def add(total, xy):
            x_bT, y_bT = sharding.split_batch(xy, mesh)
            logits_bTV = apply_fn({"params": params}, x_bT, deterministic=True)
            return total + cross_entropy(logits_bTV, y_bT), None

        total, _ = jax.lax.scan(add, jnp.float32(0.0), (x_NbT, y_NbT))
        return total / n

    params = sharding.state_shardings(abstract_params(model_cfg, mesh), mesh)
    rows = sharding.batch_sharding(mesh, row_axis=1)
    mean_loss = jax.jit(
        mean_loss,
        in_shardings=(params, rows, rows),
        out_shardings=sharding.replicated(mesh),
    )
    bytes_per_token = {}
    if token_bytes is not None:
        count = jax.jit(lambda y: jnp.sum(jnp.take(jnp.asarray(token_bytes), y)))
        bytes_per_token = {
            name: float(count(y_NbT)) / y_NbT.size
            for name, (_, y_NbT) in batches.items()
        }

    def evaluate(params) -> dict[str, float]:
        out = {}
        for name, xy in batches.items():
            out[f"{name}_loss"] = float(mean_loss(params, *xy))
            if name in bytes_per_token:
                out[f"{name}_bpb"] = out[f"{name}_loss"] / (
                    bytes_per_token[name] * math.log(2)
                )
        return out

    return evaluate


# --- The loop --------------------------------------------------------------------


class Diverged(FloatingPointError):
    """A loss or the state is not finite, or a loss is far above the run's best:
    nothing of it is saved, and the last good checkpoint stays."""


def check_loss(
    losses: dict[str, Any], step: int, cfg: TrainConfig, checkpointer: Checkpointer
) -> None:
    """Raises Diverged if a loss is not finite or exceeds max_loss_ratio x the
    best val loss so far."""
    values = {name: float(value) for name, value in losses.items()}
    best = checkpointer.best_val_loss
    bound = cfg.max_loss_ratio * best if cfg.max_loss_ratio else math.inf
    bad = {k: v for k, v in values.items() if not math.isfinite(v) or v > bound}
    if not bad:
        return
    shown = ", ".join(f"{k} {v:.4g}" for k, v in bad.items())
    if any(math.isfinite(v) for v in bad.values()):
        shown += f" > {cfg.max_loss_ratio:g} x the best val loss {best:.4f}"
    raise diverged(shown, step, checkpointer)


def diverged(what: str, step: int, checkpointer: Checkpointer) -> Diverged:
    kept = checkpointer.latest_step()
    return Diverged(
        f"training diverged by step {step} ({what}), so it is not saved; the"
        f" checkpoint of step {kept} in {checkpointer.workdir} is the last good one."
        " Lower --learning_rate or raise --warmup_iters, and add --allow_changes"
        " to resume from it (or --overwrite to start afresh)."
    )


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def all_finite(tree) -> bool:
    """Whether every element of `tree` is finite (in numpy for CPU arrays)."""
    leaves = jax.tree.leaves(tree)
    if on_host(leaves):
        return all(np.isfinite(np.asarray(x)).all() for x in leaves)
    return bool(_all_finite(tree))


def save_checked(
    step: int, state: TrainState, checkpointer: Checkpointer, val_loss=None
) -> None:
    """Saves `state` unless a parameter or optimizer moment is not finite."""
    if not all_finite((state.params, state.opt_state)):
        raise diverged("parameters not finite", step, checkpointer)
    checkpointer.save(step, state, val_loss=val_loss)


def evaluate_and_save(
    step: int, state, evaluate, checkpointer, log, cfg: TrainConfig
) -> None:
    """Evaluates, checks, logs, and saves the latest checkpoint (and the best, if
    it is)."""
    losses = evaluate(state.params)
    check_loss(losses, step, cfg, checkpointer)
    log.evaluation(step, losses)
    save_checked(step, state, checkpointer, val_loss=losses["val_loss"])


# Settings that do not change what is trained: free to differ on resume.
FREE_ON_RESUME = frozenset(
    {
        "stop_at",
        "eval_interval",
        "eval_iters",
        "log_interval",
        "save_every_minutes",
        "max_loss_ratio",
    }
)


def trained_settings(cfg: TrainConfig, seed: int) -> dict[str, Any]:
    """The settings that determine the trained parameters (recorded in the meta)."""
    fields = dataclasses.asdict(cfg)
    return {"seed": seed} | {k: v for k, v in fields.items() if k not in FREE_ON_RESUME}


def settings_history(
    saved: dict[str, Any], current: dict[str, Any], step: int, allow: bool
) -> list[dict[str, Any]]:
    """The meta's "settings": [{"from_step": s, **settings}, ...], one entry per
    step range, with `current` from `step` on if it differs.

    A change is refused with one line unless `allow` (--allow_changes); then it
    is logged. `saved` is the restored checkpoint's meta.
    """
    legacy = {"seed": saved.get("seed"), **saved.get("train", {})}  # No history.
    history = saved.get("settings") or [
        {"from_step": 0} | {k: legacy[k] for k in current if k in legacy}
    ]
    last = history[-1]
    changed = {
        k: (last[k], v) for k, v in current.items() if k in last and last[k] != v
    }
    if not changed:
        return history
    shown = ", ".join(f"--{k}={a} (now {b})" for k, (a, b) in changed.items())
    if not allow:
        raise ConfigError(
            f"the checkpoint of step {step} was trained with {shown}. Run with the"
            " recorded values to resume it exactly, pass --allow_changes to continue"
            f" from step {step} with the new ones (recorded in the checkpoint), or"
            " choose another --workdir."
        )
    logging.warning("resuming from step %d with changed settings: %s", step, shown)
    return [*history, {"from_step": step, **current}]


def agreed_requests(stop: StopRequest, save_due: bool, at_sync: bool):
    """(signal number or 0, whether to save now), the same on every process.

    With several processes they agree only at `at_sync` steps (a small
    all-gather): a stop reaching any of them stops all at the same step.
    """
    if jax.process_count() > 1 and not at_sync:
        return 0, False
    signum, due = sharding.process_max(np.array([stop.signum, int(save_due)]))
    return int(signum), bool(due)


def run_steps(
    state: TrainState,
    cfg: TrainConfig,
    step_fn,
    next_batch,
    evaluate,
    checkpointer,
    log,
    stop: StopRequest,
    clock: Callable[[], float],
):
    """The steps from state.step to cfg.end_step, until a stop is requested:
    (state, the last step's metrics, the stop signal's number or 0)."""
    start, end = int(state.step), cfg.end_step
    saved_at, metrics, signum = clock(), None, 0
    for step in range(start, end):
        state, metrics = step_fn(state, *next_batch(step))
        done = step + 1
        at_sync = done % cfg.log_interval == 0 or done == end
        if at_sync:  # Waits for the step.
            check_loss({"train_loss": metrics["loss"]}, done, cfg, checkpointer)
            checkpointer.check()
        log.step(done, metrics)
        evaluated = done % cfg.eval_interval == 0 or done == cfg.max_iters
        if evaluated:
            evaluate_and_save(done, state, evaluate, checkpointer, log, cfg)
            saved_at = clock()
        minutes = (clock() - saved_at) / 60
        every = cfg.save_every_minutes
        due = not evaluated and bool(every) and minutes >= every
        signum, due = agreed_requests(stop, due, at_sync)
        if due:
            check_loss({"train_loss": metrics["loss"]}, done, cfg, checkpointer)
            save_checked(done, state, checkpointer)
            log.say(f"step {done}: saved ({minutes:.1f} minutes since the last save)")
            saved_at = clock()
        if signum:
            break
    return state, metrics, signum


def train(
    state: TrainState,
    cfg: TrainConfig,
    step_fn: Callable,
    next_batch: Callable[[int], tuple[jax.Array, jax.Array]],
    evaluate: Callable[[Any], dict[str, float]],
    checkpointer: Checkpointer,
    log,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[TrainState, str | None]:
    """Trains from state.step to cfg.end_step, evaluating and checkpointing every
    eval_interval steps, and every save_every_minutes (by `clock`, in seconds).
    `step_fn(state, x_BT, y_BT)` is the compiled step with its root key; `log`
    is a metrics.TrainLog. Returns the final state and what stopped the run
    early: None, "stop_at", "SIGINT" or "SIGTERM".

    Only finite states whose losses stay within max_loss_ratio of the best are
    saved (else Diverged); a failed asynchronous save is reported (SaveError)
    at the next log line.
    """
    with StopRequest() as stop:
        if int(state.step) == 0:
            evaluate_and_save(0, state, evaluate, checkpointer, log, cfg)
        signum, _ = agreed_requests(stop, False, at_sync=True)  # Stopped already?
        metrics = None
        if not signum:
            state, metrics, signum = run_steps(
                state,
                cfg,
                step_fn,
                next_batch,
                evaluate,
                checkpointer,
                log,
                stop,
                clock,
            )
        if metrics is not None:  # The last step's loss, if not checked yet.
            loss = {"train_loss": metrics["loss"]}
            check_loss(loss, int(state.step), cfg, checkpointer)
        save_checked(int(state.step), state, checkpointer)  # No-op if just saved.
        checkpointer.wait()
    stopped_by = signal.Signals(signum).name if signum else None
    if stopped_by is None and int(state.step) < cfg.max_iters:
        stopped_by = "stop_at"
    log.close(int(state.step), stopped_by)
    return state, stopped_by

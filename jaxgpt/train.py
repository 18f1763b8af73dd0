"""Training: the optimizer, the jitted train/eval steps, and the loop.

The loop is a function of (configs, tokens, seed): step s trains on the batch
`get_batch(batch_key(seed, s))` with dropout key `fold_in(dropout_key, s)`, so
a run stopped at step N and resumed from its checkpoint reproduces the
uninterrupted run bit for bit.

The same loop runs on one device or a mesh of many (see sharding.py): the
state, the batch and the step are laid out on the mesh, and jit compiles one
program for all its devices. Every process of a multi-host run executes the
loop; process 0 alone writes the log, metrics.jsonl and samples, and all of
them write the checkpoint together.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.training import train_state
from jax.sharding import Mesh
from tqdm import tqdm

from jaxgpt import checkpoint as ckpt
from jaxgpt import sharding
from jaxgpt.config import ModelConfig, TrainConfig
from jaxgpt.data import batch_key, get_batch
from jaxgpt.model import cross_entropy, init_params, make_model
from jaxgpt.model import decay_mask as model_decay_mask


class TrainState(train_state.TrainState):
    """step, params, opt_state (+ the static apply_fn and tx)."""


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate, cosine decay to min_lr, then flat."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_iters,
        decay_steps=cfg.lr_decay_iters,
        end_value=cfg.min_lr,
    )


def decay_mask(params):
    """Weight decay applies to matrices: not to biases or LayerNorm scales.

    (model.decay_mask: the leading layer axis of --scan_layers doesn't count.)
    """
    return model_decay_mask(params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
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
    return optax.chain(clip, adamw)


def create_state(
    model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh | None = None
) -> TrainState:
    """A fresh TrainState; parameters come from PRNGKey(seed).

    With a mesh, each device creates only its shards of the state.
    """

    def create():
        key = jax.random.fold_in(jax.random.PRNGKey(train_cfg.seed), 0)
        return TrainState.create(
            apply_fn=make_model(model_cfg).apply,
            params=init_params(model_cfg, key),
            tx=make_optimizer(train_cfg),
        )

    if mesh is None:
        return create()
    shardings = sharding.state_shardings(jax.eval_shape(create), mesh)
    return jax.jit(create, out_shardings=shardings)()


def abstract_state(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh):
    """The state's shapes, dtypes and shardings on `mesh`: a target to restore into."""
    shapes = jax.eval_shape(lambda: create_state(model_cfg, train_cfg))
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        shapes,
        sharding.state_shardings(shapes, mesh),
    )


def dropout_key(seed: int, step) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), 2), step)


def loss_and_grads(state: TrainState, x_BT, y_BT, key, mesh: Mesh | None = None):
    """Mean cross-entropy of the batch (with dropout from `key`) and its gradient.

    On a mesh, the model runs on whole parameters (FSDP gathers their shards)
    and on activations split by batch rows; each gradient is then summed over
    the devices onto its parameter's shards.
    """
    x_BT, y_BT = sharding.split_batch((x_BT, y_BT), mesh)

    def loss_fn(params):
        logits_BTV = state.apply_fn(
            {"params": sharding.gather(params, mesh)},
            x_BT,
            deterministic=False,
            rngs={"dropout": key},
        )
        return cross_entropy(logits_BTV, y_BT)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return loss, sharding.shard_like_params(grads, mesh)


def accumulate(
    state: TrainState, x_BT, y_BT, key, steps: int, mesh: Mesh | None = None
):
    """loss_and_grads of the batch, computed on `steps` micro-batches in turn.

    Only one micro-batch's activations are alive at a time (a lax.scan). The
    mean of the micro-batch means is the mean over the batch, so the result
    equals one pass over the whole batch, dropout aside: micro-batch a holds
    rows a, a + steps, a + 2 * steps, ... (so each device keeps its own rows)
    and draws its dropout from fold_in(key, a).
    """
    if steps == 1:
        return loss_and_grads(state, x_BT, y_BT, key, mesh)
    B, T = x_BT.shape
    # [B, T] -> [steps, b, T] with b = B / steps: row i goes to micro-batch i % steps.
    micro = lambda z_BT: z_BT.reshape(B // steps, steps, T).swapaxes(0, 1)

    def add(total, xs):
        a, x_bT, y_bT = xs
        key_a = jax.random.fold_in(key, a)
        loss_grads = loss_and_grads(state, x_bT, y_bT, key_a, mesh)
        return jax.tree.map(jnp.add, total, loss_grads), None

    zeros = jax.tree.map(jnp.zeros_like, (jnp.float32(0.0), state.params))
    total, _ = jax.lax.scan(add, zeros, (jnp.arange(steps), micro(x_BT), micro(y_BT)))
    return jax.tree.map(lambda t: t / steps, total)


def update(
    state: TrainState,
    x_BT,
    y_BT,
    key,
    grad_accum_steps: int = 1,
    mesh: Mesh | None = None,
):
    """One AdamW update on the batch (x_BT, y_BT); returns the new state and metrics."""
    loss, grads = accumulate(state, x_BT, y_BT, key, grad_accum_steps, mesh)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return state.apply_gradients(grads=grads), metrics


# `update` compiled for wherever its inputs are (e.g. one device); the old state
# is donated: its buffers hold the new one.
train_step = jax.jit(update, donate_argnums=0, static_argnames="grad_accum_steps")


def make_train_step(mesh: Mesh, state_shardings, grad_accum_steps: int = 1):
    """`update` compiled for the mesh: state laid out by `state_shardings`, the
    batch split over the devices, key and metrics replicated; state donated."""
    batch, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    return jax.jit(
        partial(update, grad_accum_steps=grad_accum_steps, mesh=mesh),
        in_shardings=(state_shardings, batch, batch, rep),
        out_shardings=(state_shardings, rep),
        donate_argnums=0,
    )


def make_get_batch(mesh: Mesh, batch_size: int, block_size: int):
    """get_batch(key, tokens) whose x_BT, y_BT come out split over the devices."""
    batch = sharding.batch_sharding(mesh)
    return jax.jit(
        partial(get_batch, batch_size=batch_size, block_size=block_size),
        out_shardings=(batch, batch),
    )


def make_eval_loss(mesh: Mesh, state_shardings, batch_size: int, block_size: int):
    """eval_loss(state, tokens, keys): mean loss without dropout, one batch per key
    (one compiled scan; batches split over the devices as in training)."""
    rep = sharding.replicated(mesh)

    def eval_loss(state: TrainState, tokens, keys):
        params = sharding.gather(state.params, mesh)

        def one(total, key):
            x_BT, y_BT = get_batch(key, tokens, batch_size, block_size)
            x_BT, y_BT = sharding.split_batch((x_BT, y_BT), mesh)
            logits_BTV = state.apply_fn({"params": params}, x_BT, deterministic=True)
            return total + cross_entropy(logits_BTV, y_BT), None

        total, _ = jax.lax.scan(one, jnp.float32(0.0), keys)
        return total / keys.shape[0]

    return jax.jit(
        eval_loss, in_shardings=(state_shardings, rep, rep), out_shardings=rep
    )


def eval_keys(train_cfg: TrainConfig) -> jax.Array:
    """The fixed keys of the evaluation batches: eval_iters * grad_accum_steps of
    them, since each holds batch_size / grad_accum_steps rows (a micro-batch)."""
    base = jax.random.fold_in(jax.random.PRNGKey(train_cfg.seed), 3)
    return jax.random.split(base, train_cfg.eval_iters * train_cfg.grad_accum_steps)


def estimate_loss(eval_loss, state, splits: dict[str, jax.Array], train_cfg) -> dict:
    """Average loss of the same fixed batches of each split (see `eval_keys`)."""
    keys = eval_keys(train_cfg)
    return {
        f"{name}_loss": float(eval_loss(state, tokens, keys))
        for name, tokens in splits.items()
    }


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a request to save and stop; a second one kills."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # Not the main thread: signals stay as they are.
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(
    state: TrainState,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    checkpointer: ckpt.Checkpointer,
    meta: dict[str, Any],
    flops_per_token: float | None = None,
    peak_flops: float | None = None,
    on_step: Callable[[int, TrainState], None] | None = None,
    mesh: Mesh | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """Trains from `state.step` to max_iters (or stop_at), evaluating and checkpointing.

    Runs on `mesh` (default: all devices, data parallel); `state` is moved onto
    it if it is not there yet. With `flops_per_token` the log shows the model's
    FLOP/s, and with `peak_flops` (per device) its MFU too. Returns the final state and a history: per-step
    `losses` and the `evals` written to <workdir>/metrics.jsonl, plus
    `stopped_by` (None, "stop_at", or the signal's name).
    """
    cfg = train_cfg
    mesh = sharding.make_mesh() if mesh is None else mesh
    sharding.check_batch(cfg.batch_size, cfg.grad_accum_steps, mesh)
    state_shardings = sharding.state_shardings(state, mesh)
    state = jax.device_put(state, state_shardings)
    step_fn = make_train_step(mesh, state_shardings, cfg.grad_accum_steps)
    next_batch = make_get_batch(mesh, cfg.batch_size, model_cfg.block_size)
    micro_batch = cfg.batch_size // cfg.grad_accum_steps
    eval_loss = make_eval_loss(mesh, state_shardings, micro_batch, model_cfg.block_size)
    splits = {  # A whole copy of the tokens on every device.
        name: jax.device_put(jnp.asarray(tokens), sharding.replicated(mesh))
        for name, tokens in (("train", train_tokens), ("val", val_tokens))
    }
    is_main = sharding.is_main_process()

    def say(text: str) -> None:
        if is_main:
            tqdm.write(text, file=sys.stderr)

    schedule = lr_schedule(cfg)
    metrics_path = Path(cfg.workdir) / "metrics.jsonl"
    tokens_per_step = cfg.batch_size * model_cfg.block_size
    start = int(state.step)
    end = min(cfg.max_iters, cfg.stop_at or cfg.max_iters)
    history = {"losses": [], "evals": [], "stopped_by": None}
    best = meta.get("best_val_loss", math.inf)

    def evaluate_and_save(step: int, state: TrainState) -> None:
        nonlocal best
        losses = estimate_loss(eval_loss, state, splits, cfg)
        record = {"step": step, **losses, "lr": float(schedule(step))}
        if not all(math.isfinite(v) for v in losses.values()):
            raise FloatingPointError(
                f"loss is not finite at step {step} ({losses}); the last good"
                f" checkpoint in {cfg.workdir} is kept. Lower --learning_rate or"
                " raise --warmup_iters."
            )
        history["evals"].append(record)
        if is_main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        say(
            f"step {step}: train loss {losses['train_loss']:.4f},"
            f" val loss {losses['val_loss']:.4f}"
        )
        improved = losses["val_loss"] < best
        best = min(best, losses["val_loss"])
        meta["best_val_loss"] = best
        checkpointer.save(step, state, meta)  # All processes save together.
        if improved:
            checkpointer.save(step, state, meta, which=ckpt.BEST)

    if start == 0:
        evaluate_and_save(0, state)
    step_losses = []
    t_last, step_last = time.perf_counter(), start
    bar = tqdm(
        total=end,
        initial=start,
        desc="train",
        unit="step",
        disable=None if is_main else True,
        dynamic_ncols=True,
    )
    with StopRequest() as stop:
        for step in range(start, end):
            x_BT, y_BT = next_batch(batch_key(cfg.seed, step), splits["train"])
            state, metrics = step_fn(state, x_BT, y_BT, dropout_key(cfg.seed, step))
            step_losses.append(metrics["loss"])
            done = step + 1
            bar.update(1)
            if done % cfg.log_interval == 0 or done == end:
                loss = float(metrics["loss"])  # Waits for the step to finish.
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"training loss is {loss} at step {done}; the last good"
                        f" checkpoint in {cfg.workdir} is kept. Lower --learning_rate."
                    )
                dt = (time.perf_counter() - t_last) / (done - step_last)
                t_last, step_last = time.perf_counter(), done
                line = (
                    f"step {done}: loss {loss:.4f}, lr {float(schedule(step)):.2e},"
                    f" {1e3 * dt:.1f} ms/step, {tokens_per_step / dt:,.0f} tok/s"
                )
                if flops_per_token:
                    flops = flops_per_token * tokens_per_step / dt  # All devices.
                    line += f", {flops / 1e9:.1f} GFLOP/s"
                    if peak_flops:
                        line += f", MFU {100 * flops / (peak_flops * mesh.size):.1f}%"
                bar.set_postfix(loss=f"{loss:.4f}")
                say(line)
            if done % cfg.eval_interval == 0 or done == cfg.max_iters:
                evaluate_and_save(done, state)
                t_last, step_last = time.perf_counter(), done  # Evals aren't steps.
            if on_step is not None:
                on_step(done, state)
            if stop.signum is not None:
                history["stopped_by"] = signal.Signals(stop.signum).name
                break
    bar.close()
    final = int(state.step)
    if history["stopped_by"] is None and final < cfg.max_iters:
        history["stopped_by"] = "stop_at"
    checkpointer.save(final, state, meta)  # No-op if this step was just saved.
    checkpointer.wait()
    if history["stopped_by"] and is_main:
        logging.info(
            "stopped at step %d (%s); checkpoint saved in %s: run the same"
            " command again to resume.",
            final,
            history["stopped_by"],
            cfg.workdir,
        )
    history["losses"] = [float(x) for x in step_losses]
    return state, history

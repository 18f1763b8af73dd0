"""Training: the optimizer, the jitted train/eval steps, and the loop.

The loop is a function of (configs, tokens, seed): step s trains on the batch
`get_batch(batch_key(seed, s))` with dropout key `fold_in(dropout_key, s)`, so
a run stopped at step N and resumed from its checkpoint reproduces the
uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from functools import partial
from pathlib import Path
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.training import train_state
from tqdm import tqdm

from jaxgpt import checkpoint as ckpt
from jaxgpt.config import ModelConfig, TrainConfig
from jaxgpt.data import batch_key, get_batch
from jaxgpt.model import cross_entropy, init_params, make_model


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
    """Weight decay applies to matrices (ndim >= 2): not to biases or LayerNorm."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


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


def create_state(model_cfg: ModelConfig, train_cfg: TrainConfig) -> TrainState:
    """A fresh TrainState; parameters come from PRNGKey(seed)."""
    key = jax.random.fold_in(jax.random.PRNGKey(train_cfg.seed), 0)
    return TrainState.create(
        apply_fn=make_model(model_cfg).apply,
        params=init_params(model_cfg, key),
        tx=make_optimizer(train_cfg),
    )


def dropout_key(seed: int, step) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), 2), step)


@partial(jax.jit, donate_argnums=0)
def train_step(state: TrainState, x_BT, y_BT, key) -> tuple[TrainState, dict]:
    """One AdamW update on the batch (x_BT, y_BT); returns the new state and metrics."""

    def loss_fn(params):
        logits_BTV = state.apply_fn(
            {"params": params}, x_BT, deterministic=False, rngs={"dropout": key}
        )
        return cross_entropy(logits_BTV, y_BT)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return state.apply_gradients(grads=grads), metrics


@partial(jax.jit, static_argnames=("batch_size", "block_size"))
def eval_loss(state: TrainState, tokens, keys, batch_size: int, block_size: int):
    """Mean loss without dropout over one batch per key (one compiled scan)."""

    def one(total, key):
        x_BT, y_BT = get_batch(key, tokens, batch_size, block_size)
        logits_BTV = state.apply_fn({"params": state.params}, x_BT, deterministic=True)
        return total + cross_entropy(logits_BTV, y_BT), None

    total, _ = jax.lax.scan(one, jnp.float32(0.0), keys)
    return total / keys.shape[0]


def estimate_loss(state, splits: dict[str, jax.Array], model_cfg, train_cfg) -> dict:
    """Average loss of `eval_iters` fixed batches of each split (same batches each time)."""
    base = jax.random.fold_in(jax.random.PRNGKey(train_cfg.seed), 3)
    keys = jax.random.split(base, train_cfg.eval_iters)
    return {
        f"{name}_loss": float(
            eval_loss(state, tokens, keys, train_cfg.batch_size, model_cfg.block_size)
        )
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
    on_step: Callable[[int, TrainState], None] | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """Trains from `state.step` to max_iters (or stop_at), evaluating and checkpointing.

    Returns the final state and a history: per-step `losses` and the `evals`
    written to <workdir>/metrics.jsonl, plus `stopped_by` (None, "stop_at", or
    the signal's name).
    """
    cfg = train_cfg
    splits = {"train": jnp.asarray(train_tokens), "val": jnp.asarray(val_tokens)}
    schedule = lr_schedule(cfg)
    metrics_path = Path(cfg.workdir) / "metrics.jsonl"
    tokens_per_step = cfg.batch_size * model_cfg.block_size
    start = int(state.step)
    end = min(cfg.max_iters, cfg.stop_at or cfg.max_iters)
    history = {"losses": [], "evals": [], "stopped_by": None}
    best = meta.get("best_val_loss", math.inf)

    def evaluate_and_save(step: int, state: TrainState) -> None:
        nonlocal best
        losses = estimate_loss(state, splits, model_cfg, cfg)
        record = {"step": step, **losses, "lr": float(schedule(step))}
        if not all(math.isfinite(v) for v in losses.values()):
            raise FloatingPointError(
                f"loss is not finite at step {step} ({losses}); the last good"
                f" checkpoint in {cfg.workdir} is kept. Lower --learning_rate or"
                " raise --warmup_iters."
            )
        history["evals"].append(record)
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        tqdm.write(
            f"step {step}: train loss {losses['train_loss']:.4f},"
            f" val loss {losses['val_loss']:.4f}",
            file=sys.stderr,
        )
        improved = losses["val_loss"] < best
        best = min(best, losses["val_loss"])
        meta["best_val_loss"] = best
        checkpointer.save(step, state, meta)
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
        disable=None,
        dynamic_ncols=True,
    )
    with StopRequest() as stop:
        for step in range(start, end):
            x_BT, y_BT = get_batch(
                batch_key(cfg.seed, step),
                splits["train"],
                cfg.batch_size,
                model_cfg.block_size,
            )
            state, metrics = train_step(state, x_BT, y_BT, dropout_key(cfg.seed, step))
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
                    line += (
                        f", {flops_per_token * tokens_per_step / dt / 1e9:.1f} GFLOP/s"
                    )
                bar.set_postfix(loss=f"{loss:.4f}")
                tqdm.write(line, file=sys.stderr)
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
    if history["stopped_by"]:
        logging.info(
            "stopped at step %d (%s); checkpoint saved in %s: run the same"
            " command again to resume.",
            final,
            history["stopped_by"],
            cfg.workdir,
        )
    history["losses"] = [float(x) for x in step_losses]
    return state, history

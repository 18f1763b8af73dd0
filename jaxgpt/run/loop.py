"""The training loop, and the guards that plug into it as hooks.

The loop's body is the step: batch, step, log, hooks, evaluate and save. A
hook is `hook(step, state, metrics) -> bool`, called once per step at one
place, after the step's log line; it may raise (a diverged loss, a failed save) or
return True to stop the run after this step. The run's own hooks:

- LossGuard: at each log_interval, a non-finite train loss, or one above
  max_loss_ratio x the best val loss, stops the run (Diverged); a failed
  asynchronous save is reported (SaveError).
- Requests: SIGINT/SIGTERM (all processes of a multi-host run agree on the
  step) and a save every save_every_minutes.

Pass more with `train(..., hooks=[...])`. Only finite states whose losses have
not diverged are ever saved, so the last good checkpoint always stays.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxgpt.config import ConfigError, TrainConfig
from jaxgpt.run import hosts
from jaxgpt.run.checkpoint import Checkpointer, on_host
from jaxgpt.run.configs import LoopConfig, free_on_resume
from jaxgpt.run.stops import StopRequest
from jaxgpt.train import TrainState

Hook = Callable[[int, TrainState, dict], bool]


def train(
    state: TrainState,
    cfg: LoopConfig,
    step_fn: Callable,
    next_batch: Callable[[int], tuple],
    evaluate: Callable[[Any], dict[str, float]],
    checkpointer: Checkpointer,
    log,
    clock: Callable[[], float] = time.monotonic,
    hooks: Sequence[Hook] = (),
) -> tuple[TrainState, str | None]:
    """Trains from state.step to cfg.end_step, evaluating and saving every
    eval_interval steps, until a hook asks to stop. `step_fn(state, *batch)`
    is the compiled step with its root key, on the batch next_batch(step)
    gives; `log` a metrics.TrainLog, `clock` (seconds) times the timed saves. Returns the final state and what stopped
    the run early: None, "stop_at", "SIGINT" or "SIGTERM"."""

    def evaluate_and_save(step: int, state) -> None:
        losses = evaluate(state.params)
        check_loss(losses, step, cfg, checkpointer)
        log.evaluation(step, losses)
        save_checked(step, state, checkpointer, val_loss=losses["val_loss"])

    with StopRequest() as signals:
        requests = Requests(signals, cfg, checkpointer, log, clock)
        hooks = [LossGuard(cfg, checkpointer), requests, *hooks]
        if int(state.step) == 0:
            evaluate_and_save(0, state)
        stopped = requests.agree(int(state.step), at_sync=True)  # Already?
        metrics = None
        for step in range(int(state.step), 0 if stopped else cfg.end_step):
            batch = next_batch(step)  # (x_BT, y_BT), or with rows' packed.
            state, metrics = step_fn(state, *batch)
            log.step(step + 1, metrics)
            stops = [hook(step + 1, state, metrics) for hook in hooks]  # All run.
            if (step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.max_iters:
                evaluate_and_save(step + 1, state)
            if any(stops):
                break
        if metrics is not None:  # The last step's loss, if not checked yet.
            loss = {"train_loss": metrics["loss"]}
            check_loss(loss, int(state.step), cfg, checkpointer)
        save_checked(int(state.step), state, checkpointer)  # No-op if just saved.
        checkpointer.wait()
    stopped_by = signal.Signals(requests.signum).name if requests.signum else None
    if stopped_by is None and int(state.step) < cfg.max_iters:
        stopped_by = "stop_at"
    log.close(int(state.step), stopped_by)
    return state, stopped_by


# --- The guards ----------------------------------------------------------------------


def at_sync(step: int, cfg: LoopConfig) -> bool:
    """The steps where the host waits for the device: every log_interval, the end."""
    return step % cfg.log_interval == 0 or step == cfg.end_step


@dataclasses.dataclass
class LossGuard:
    """Checks the train loss and the checkpointer's saves at each sync step."""

    cfg: LoopConfig
    checkpointer: Checkpointer

    def __call__(self, step: int, state, metrics) -> bool:
        if at_sync(step, self.cfg):  # Waits for the step.
            check_loss(
                {"train_loss": metrics["loss"]}, step, self.cfg, self.checkpointer
            )
            self.checkpointer.check()
        return False


class Requests:
    """A stop signal and the timed saves, agreed by every process at sync steps."""

    def __init__(self, stop: StopRequest, cfg, checkpointer, log, clock):
        self.stop, self.cfg, self.checkpointer, self.log = stop, cfg, checkpointer, log
        self.clock, self.saved_at, self.signum = clock, clock(), 0

    def agree(self, step: int, at_sync: bool, save_due: bool = False) -> bool:
        """Whether to stop (and with save_due, to save), the same on every process.

        With several processes they agree only at `at_sync` steps (a small
        all-gather): a stop reaching any of them stops all at the same step."""
        self.save_now = False
        if jax.process_count() > 1 and not at_sync:
            return False
        signum, due = hosts.process_max(np.array([self.stop.signum, int(save_due)]))
        self.signum, self.save_now = int(signum), bool(due)
        return bool(self.signum)

    def __call__(self, step: int, state, metrics) -> bool:
        evaluated = step % self.cfg.eval_interval == 0 or step == self.cfg.max_iters
        if evaluated:  # The loop saves this step after its evaluation.
            self.saved_at = self.clock()
        minutes, every = (
            (self.clock() - self.saved_at) / 60,
            self.cfg.save_every_minutes,
        )
        due = not evaluated and bool(every) and minutes >= every
        stop = self.agree(step, at_sync(step, self.cfg), due)
        if self.save_now:
            check_loss(
                {"train_loss": metrics["loss"]}, step, self.cfg, self.checkpointer
            )
            save_checked(step, state, self.checkpointer)
            self.log.say(
                f"step {step}: saved ({minutes:.1f} minutes since the last save)"
            )
            self.saved_at = self.clock()
        return stop


class Diverged(FloatingPointError):
    """A loss or the state is not finite, or a loss is far above the run's best:
    nothing of it is saved, and the last good checkpoint stays."""


def check_loss(
    losses: dict[str, Any], step: int, cfg: LoopConfig, checkpointer: Checkpointer
) -> None:
    """Raises Diverged if a loss is not finite or exceeds max_loss_ratio x the
    best val loss so far (accuracies are not losses: they are not checked)."""
    values = {
        name: float(value)
        for name, value in losses.items()
        if not name.endswith(("_acc", "_acc_norm"))
    }
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


# --- What a resume may change --------------------------------------------------------


def trained_settings(cfg: TrainConfig, seed: int) -> dict[str, Any]:
    """The settings that determine the trained parameters (recorded in the meta)."""
    fields = dataclasses.asdict(cfg)
    free = free_on_resume(TrainConfig)
    return {"seed": seed} | {k: v for k, v in fields.items() if k not in free}


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

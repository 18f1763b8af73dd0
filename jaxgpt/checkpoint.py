"""Orbax checkpoints in a workdir: the latest, and the best by validation loss.

Layout (one folder per saved step):
  <workdir>/checkpoints/<step>/{params, opt_state, meta}   the latest two saves
  <workdir>/best/<step>/{params, opt_state, meta}          the lowest val loss so far
`params` alone is enough to sample; `opt_state` holds the step and AdamW's
moments; `meta` is JSON: the run's description (model config, training
config, vocabulary) and the best val loss so far, so a checkpoint can be
sampled from without the corpus or the flags.
Orbax writes to a temporary folder and renames it on success, so a run that
fails or is killed keeps its last good checkpoint. Arrays are saved and
restored sharded: in a multi-process run every process calls save and restore
on the same (shared) workdir, each writes and reads its own shards, and orbax
has process 0 write the metadata and commit the folder.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxgpt import sharding
from jaxgpt.config import ConfigError, ModelConfig

LATEST, BEST = "latest", "best"
FOLDERS = {LATEST: "checkpoints", BEST: "best"}  # Under the workdir.
KEEP = {LATEST: 2, BEST: 1}  # Saves kept of each.


class Checkpointer:
    """The latest and best checkpoints of one run; it alone decides what is kept.

    `meta` describes the run and is saved, with the best val loss so far, beside
    every checkpoint (a copy is kept: the caller's dict is never changed).
    """

    def __init__(self, workdir: str | Path, meta: Mapping[str, Any] | None = None):
        self.workdir = Path(workdir).absolute()
        self._meta = dict(meta or {})
        self._managers = {
            which: manager(self.workdir / FOLDERS[which], which)
            for which in (LATEST, BEST)
        }
        has_latest = self.latest_step() is not None
        self.best_val_loss = (
            self.read_meta().get("best_val_loss", math.inf) if has_latest else math.inf
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def latest_step(self, which: str = LATEST) -> int | None:
        return self._managers[which].latest_step()

    def save(self, step: int, state, val_loss: float | None = None) -> None:
        """Saves `state` as the latest checkpoint, and as the best if `val_loss`
        is lower than every earlier one. Asynchronous: see `wait`."""
        improved = val_loss is not None and val_loss < self.best_val_loss
        if improved:
            self.best_val_loss = val_loss
        meta = {**self._meta, "best_val_loss": self.best_val_loss}
        for which in (LATEST, BEST) if improved else (LATEST,):
            manager = self._managers[which]
            if manager.latest_step() == step:
                continue  # Already saved (e.g. an evaluation step that is also the last).
            manager.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(state.params),
                    opt_state=ocp.args.StandardSave(
                        {"step": state.step, "opt_state": state.opt_state}
                    ),
                    meta=ocp.args.JsonSave(meta),
                ),
            )

    def read_meta(self, which: str = LATEST) -> dict[str, Any]:
        manager = self._managers[which]
        step = manager.latest_step()
        restored = manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )
        return restored["meta"]

    def restore(self, target_state, which: str = LATEST):
        """The whole training state, in the structure and shardings of `target_state`.

        `target_state` may be abstract (jax.ShapeDtypeStruct leaves with their
        shardings, see train.abstract_state): each device reads only its shards.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        restored = self._restore(
            which,
            params=ocp.args.StandardRestore(abstract.params),
            opt_state=ocp.args.StandardRestore(
                {"step": abstract.step, "opt_state": abstract.opt_state}
            ),
        )
        return target_state.replace(
            step=restored["opt_state"]["step"],
            params=restored["params"],
            opt_state=restored["opt_state"]["opt_state"],
        )

    def restore_params(self, target_params, which: str = LATEST):
        """The parameters alone (enough to sample), without the optimizer state."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_params)
        return self._restore(which, params=ocp.args.StandardRestore(abstract))["params"]

    def _restore(self, which: str, **items) -> dict[str, Any]:
        manager = self._managers[which]
        step = manager.latest_step()
        folder = self.workdir / FOLDERS[which] / str(step)
        missing = [name for name in items if not (folder / name).is_dir()]
        if missing:
            raise ConfigError(
                f"the checkpoint {folder} has no {', '.join(missing)}: it was written"
                " by an older jaxgpt, whose layout this version cannot read. Train it"
                " again in another --workdir (or pass --overwrite to replace it)."
            )
        return manager.restore(step, args=ocp.args.Composite(**items))

    def wait(self) -> None:
        """Blocks until every asynchronous save has been written."""
        for manager in self._managers.values():
            manager.wait_until_finished()

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()


def manager(folder: Path, which: str) -> ocp.CheckpointManager:
    """An orbax manager for one of the two kinds of checkpoint."""
    # Both managers may save the same step at once; their own barrier names
    # keep the processes' synchronisation of the two apart.
    multiprocessing = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=which)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=KEEP[which], create=True, multiprocessing_options=multiprocessing
    )
    return ocp.CheckpointManager(folder, options=options)


def read_meta(workdir: str | Path, which: str = LATEST) -> dict[str, Any] | None:
    """The meta of the workdir's `which` checkpoint, or None if it has none."""
    with Checkpointer(workdir) as checkpointer:
        if checkpointer.latest_step(which) is None:
            return None
        return checkpointer.read_meta(which)


def clear(workdir: str | Path) -> None:
    """Deletes the checkpoints and metrics of a workdir (for --overwrite).

    Process 0 deletes them; the others wait until it has.
    """
    workdir = Path(workdir)
    if sharding.is_main_process():
        for folder in FOLDERS.values():
            shutil.rmtree(workdir / folder, ignore_errors=True)
        (workdir / "metrics.jsonl").unlink(missing_ok=True)
    sharding.sync("jaxgpt.checkpoint.clear")


def check_compatible(saved: dict[str, Any], config: ModelConfig, workdir) -> None:
    """Refuses to resume a checkpoint whose parameter shapes differ from `config`."""
    current = config.architecture()
    saved_arch = ModelConfig(**saved).architecture()  # Defaults fill newer fields.
    diff = {
        k: (saved_arch.get(k), v) for k, v in current.items() if saved_arch.get(k) != v
    }
    if diff:
        shown = ", ".join(
            f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items()
        )
        if "scan_layers" in diff:  # Same network, differently laid out parameters.
            was = str(saved_arch["scan_layers"]).lower()
            shown += (
                "; --scan_layers stacks the blocks' parameters along a layer axis,"
                f" so this checkpoint resumes only with --scan_layers={was}"
            )
        raise ConfigError(
            f"--workdir={workdir} holds a checkpoint of a different model ({shown})."
            " Pass --overwrite to start afresh there (its checkpoints are deleted),"
            " or choose another --workdir."
        )

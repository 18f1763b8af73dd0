"""Orbax checkpoints in a workdir: the latest, and the best by validation loss.

Layout:
  <workdir>/checkpoints/<step>/{state, meta}   the latest two saves
  <workdir>/best/<step>/{state, meta}          the save with the lowest val loss
`meta` is JSON: the model config, the vocabulary and the best val loss so far,
so a checkpoint can be sampled from without the corpus or the flags.
Orbax writes to a temporary folder and renames it on success, so a run that
fails or is killed keeps its last good checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxgpt.config import ConfigError, ModelConfig

LATEST, BEST = "checkpoints", "best"


class Checkpointer:
    """Saves and restores (TrainState, meta) pairs under `workdir`."""

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir).absolute()
        self._managers = {
            LATEST: ocp.CheckpointManager(
                self.workdir / LATEST,
                options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
            ),
            BEST: ocp.CheckpointManager(
                self.workdir / BEST,
                options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
            ),
        }

    def latest_step(self, which: str = LATEST) -> int | None:
        return self._managers[which].latest_step()

    def save(self, step: int, state, meta: dict[str, Any], which: str = LATEST) -> None:
        manager = self._managers[which]
        if manager.latest_step() == step:
            return  # Already saved (e.g. an evaluation step that is also the last).
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )

    def read_meta(self, which: str = LATEST, step: int | None = None) -> dict[str, Any]:
        manager = self._managers[which]
        step = manager.latest_step() if step is None else step
        restored = manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )
        return restored["meta"]

    def restore(self, target_state, which: str = LATEST, step: int | None = None):
        """Restores the state into the structure (and shardings) of `target_state`."""
        manager = self._managers[which]
        step = manager.latest_step() if step is None else step
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        return restored["state"]

    def wait(self) -> None:
        for manager in self._managers.values():
            manager.wait_until_finished()

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()


def clear(workdir: str | Path) -> None:
    """Deletes the checkpoints and metrics of a workdir (for --overwrite)."""
    workdir = Path(workdir)
    for name in (LATEST, BEST):
        shutil.rmtree(workdir / name, ignore_errors=True)
    (workdir / "metrics.jsonl").unlink(missing_ok=True)


def check_compatible(saved: dict[str, Any], config: ModelConfig, workdir) -> None:
    """Refuses to resume a checkpoint whose parameter shapes differ from `config`."""
    current = config.architecture()
    saved_arch = {k: v for k, v in saved.items() if k != "dropout"}
    diff = {
        k: (saved_arch.get(k), v) for k, v in current.items() if saved_arch.get(k) != v
    }
    if diff:
        shown = ", ".join(
            f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items()
        )
        raise ConfigError(
            f"--workdir={workdir} holds a checkpoint of a different model ({shown})."
            " Pass --overwrite to start afresh there (its checkpoints are deleted),"
            " or choose another --workdir."
        )

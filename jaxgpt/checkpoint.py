"""Orbax checkpoints in a workdir: the latest, and the best by validation loss.

Layout:
  <workdir>/checkpoints/<step>/{state, meta}   the latest two saves
  <workdir>/best/<step>/{state, meta}          the save with the lowest val loss
`meta` is JSON: the model config, the vocabulary and the best val loss so far,
so a checkpoint can be sampled from without the corpus or the flags.
Orbax writes to a temporary folder and renames it on success, so a run that
fails or is killed keeps its last good checkpoint. Arrays are saved and
restored sharded: in a multi-process run every process calls save and restore
on the same (shared) workdir, each writes and reads its own shards, and orbax
has process 0 write the metadata and commit the folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxgpt import sharding
from jaxgpt.config import ConfigError, ModelConfig

LATEST, BEST = "checkpoints", "best"


class Checkpointer:
    """Saves and restores (TrainState, meta) pairs under `workdir`."""

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir).absolute()

        def manager(which: str, max_to_keep: int) -> ocp.CheckpointManager:
            # Both managers may save the same step at once; their own barrier
            # names keep the processes' synchronisation of the two apart.
            multiprocessing = ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=which
            )
            options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                multiprocessing_options=multiprocessing,
            )
            return ocp.CheckpointManager(self.workdir / which, options=options)

        self._managers = {LATEST: manager(LATEST, 2), BEST: manager(BEST, 1)}

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
        """Restores the state into the structure and shardings of `target_state`.

        `target_state` may be abstract (jax.ShapeDtypeStruct leaves with their
        shardings, see train.abstract_state): each device reads only its shards.
        """
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
    """Deletes the checkpoints and metrics of a workdir (for --overwrite).

    Process 0 deletes them; the others wait until it has.
    """
    workdir = Path(workdir)
    if sharding.is_main_process():
        for name in (LATEST, BEST):
            shutil.rmtree(workdir / name, ignore_errors=True)
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

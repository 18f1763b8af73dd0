"""Orbax checkpoints in a workdir: the latest and the best, verified when read.

Layout (one folder per saved step):
  <workdir>/checkpoints/<step>/{params, opt_state, meta}   the latest three saves
  <workdir>/best/<step>/{params, opt_state, meta}          the lowest val loss so far
  <workdir>/damaged/<folder>-<step>                        checkpoints that failed
                                                           verification, moved aside
`params` alone is enough to sample; `opt_state` holds the step and AdamW's
moments; `meta` is JSON: the run's description (model config, training
settings, vocabulary), the best val loss so far and its step, a checksum of
every saved array, and a checksum of the meta itself (`meta_checksum`), so a
checkpoint can be sampled from without the corpus or the flags, and verified.

What survives what:
- A kill, at any moment. Orbax writes into a temporary folder and renames it
  when complete; `resume` deletes the temporary folders a killed run left,
  restores the newest checkpoint, and makes `best/` agree with it.
- A folder renamed or copied to another step's name. The step the meta and
  the optimizer state record must be the folder's: one that differs is a
  damaged checkpoint (a later save of that step is never skipped for it).
- Corruption. A checksum of each array (computed on the devices, so it does
  not depend on how the array is sharded) is stored in `meta` and checked
  after restoring; the meta has a checksum of its own, checked before anything
  in it is believed. A checkpoint that fails either, lacks them, or cannot be
  read, is named in one line, moved aside, and the next newest one (latest or
  best) is used.
- A reader racing a writer (sampling while training replaces best/): a
  checkpoint that fails to read because a newer one replaced it meanwhile is
  not damage; the reader takes the newer one.
- A failed write (a full disk). `SaveError` names the step, the folder and the
  free space; the save's temporary folder is deleted, earlier checkpoints are
  untouched.

Arrays are saved and restored sharded: in a multi-process run every process
calls save and restore on the same (shared) workdir, each writes and reads
its own shards, and orbax has process 0 write the metadata and commit.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import math
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgpt.config import ConfigError, ModelConfig
from jaxgpt.run import hosts
from jaxgpt.run import workdir as workdir_lib
from jaxgpt.run.configs import free_on_resume

LATEST, BEST = "latest", "best"
FOLDERS = {LATEST: workdir_lib.CHECKPOINTS, BEST: workdir_lib.BEST}  # In the workdir.
KEEP = {LATEST: 3, BEST: 1}  # Saves kept of each: older latest ones to fall back to.
DAMAGED = workdir_lib.DAMAGED  # In the workdir: checkpoints that failed verification.
TMP_MARK = ".orbax-checkpoint-tmp"  # In the names of orbax's unfinished saves.
ITEMS = ("params", "opt_state")  # The array items of a checkpoint.
META_CHECKSUM = "meta_checksum"  # The meta's key for its own checksum.
RACE_RETRIES = 3  # Times a reader lists the checkpoints again after a race.


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read (the message says which and why)."""


class SaveError(CheckpointError):
    """Writing a checkpoint failed (e.g. the disk is full)."""


class Damaged(CheckpointError):
    """A checkpoint cannot be read, or its arrays differ from their checksums."""


# --- Checksums ------------------------------------------------------------------


def _as_u32(x: jax.Array) -> jax.Array:
    """The bits of each element as uint32 (8-byte elements: two words each)."""
    if x.dtype == jnp.bool_ or x.dtype.itemsize == 1:
        return x.astype(jnp.uint8).astype(jnp.uint32)
    if x.dtype.itemsize == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 4 bytes: [...]; 8: [..., 2].


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """Two uint32 sums of the element bits weighted by their positions.

    Sums mod 2^32 do not depend on the order of addition, so the result is
    the same however the array is sharded; the first sum's weights are odd,
    so changing any one element always changes it.
    """
    u = _as_u32(x)
    i = jnp.zeros(u.shape, jnp.uint32)  # Each element's flat index.
    for d, n in enumerate(u.shape):
        i = i * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, u.shape, d)
    mixed = (u ^ (u >> 16)) * jnp.uint32(0x45D9F3B)
    mixed = mixed ^ (mixed >> 16)
    weight = (i * jnp.uint32(0x9E3779B9)) | jnp.uint32(1)
    return jnp.stack(
        [
            jnp.sum(u * (2 * i + 1), dtype=jnp.uint32),
            jnp.sum(mixed * weight, dtype=jnp.uint32),
        ]
    )


def _leaf_checksum_np(x: np.ndarray) -> np.ndarray:
    """_leaf_checksum on the host, in numpy: the same two words, no compilation."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_ or x.dtype.itemsize == 1:
        u = x.astype(np.uint8).astype(np.uint32)
    elif x.dtype.itemsize == 2:
        u = x.view(np.uint16).astype(np.uint32)
    else:
        u = x.view(np.uint32)
    u = u.ravel()
    i = np.arange(u.size, dtype=np.uint32)
    mixed = (u ^ (u >> np.uint32(16))) * np.uint32(0x45D9F3B)
    mixed ^= mixed >> np.uint32(16)
    weight = (i * np.uint32(0x9E3779B9)) | np.uint32(1)
    odd = i * np.uint32(2) + np.uint32(1)
    return np.array(
        [np.sum(u * odd, dtype=np.uint32), np.sum(mixed * weight, dtype=np.uint32)]
    )


def on_host(leaves) -> bool:
    """Whether every array is in this process's memory already (CPU, unsharded
    across processes): numpy then reads it without a copy or a compilation."""
    return all(
        not isinstance(x, jax.Array)
        or (x.is_fully_addressable and all(d.platform == "cpu" for d in x.devices()))
        for x in leaves
    )


@functools.cache
def _checksum_fn(out_sharding) -> Callable:
    return jax.jit(
        lambda tree: jax.tree.map(_leaf_checksum, tree), out_shardings=out_sharding
    )


def checksums(tree) -> dict[str, str]:
    """{"path/of/leaf": 16 hex digits} for every array of `tree`.

    CPU arrays this process holds whole are summed in numpy (no compilation);
    others on their devices, by every process (all must call it then). Both
    give the same result.
    """
    leaves = jax.tree.leaves(tree)
    if on_host(leaves):
        sums = jax.tree.map(lambda x: _leaf_checksum_np(np.asarray(x)), tree)
    else:
        mesh = leaves[0].sharding.mesh
        sums = _checksum_fn(NamedSharding(mesh, P()))(tree)
        sums = jax.device_get(sums)
    flat, _ = jax.tree_util.tree_flatten_with_path(sums)
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): "".join(
            f"{int(w):08x}" for w in np.asarray(s)
        )
        for path, s in flat
    }


def verify(expected: Mapping[str, str], tree, item: str) -> None:
    """Raises Damaged if an array of `tree` differs from its checksum."""
    got = checksums(tree)
    wrong = [
        k for k in sorted(set(got) | set(expected)) if got.get(k) != expected.get(k)
    ]
    if wrong:
        more = f" and {len(wrong) - 1} more" if len(wrong) > 1 else ""
        raise Damaged(f"{item}/{wrong[0]}{more} differ from their checksums")


def meta_checksum(meta: Mapping[str, Any]) -> str:
    """The sha256 of the meta (without its own checksum) as JSON with sorted
    keys: the same before saving and after reading (JSON turns tuples into
    lists and keys into strings, so it is taken of the JSON round trip)."""
    body = {k: v for k, v in meta.items() if k != META_CHECKSUM}
    plain = json.loads(json.dumps(body))
    text = json.dumps(plain, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def signed(meta: Mapping[str, Any]) -> dict[str, Any]:
    """`meta` with its own checksum, as it is saved."""
    return {**meta, META_CHECKSUM: meta_checksum(meta)}


def check_meta(meta: Any, check: Callable[[dict], None] | None = None) -> dict:
    """`meta` if it is a checkpoint's meta as saved: a JSON object equal to its
    own checksum (if it has one: older metas do not), holding the checksums of
    the arrays and a best val loss;
    then `check(meta)` (the caller's own expectations) must not raise.
    Damaged says which is not so: nothing in a meta is believed before this."""
    if not isinstance(meta, dict):
        raise Damaged(f"its meta is a JSON {type(meta).__name__}, not an object")
    # A meta saved before metas had checksums is taken unsigned: its arrays are
    # still verified, and the run's next save signs it.
    if META_CHECKSUM in meta and meta[META_CHECKSUM] != meta_checksum(meta):
        raise Damaged("its meta differs from its checksum")
    sums = meta.get("checksums")
    if not isinstance(sums, dict) or not all(
        isinstance(sums.get(i), dict) for i in ITEMS
    ):
        raise Damaged("its meta has no checksums of its arrays")
    best, step = meta.get("best_val_loss"), meta.get("best_step")
    if not isinstance(best, int | float) or isinstance(best, bool):
        raise Damaged(f"its meta's best_val_loss is {best!r}, not a number")
    for key in ("best_step", "step"):  # (Metas saved before "step" have none.)
        step = meta.get(key)
        if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
            raise Damaged(f"its meta's {key} is {step!r}, not a step")
    if check is not None:
        try:
            check(meta)
        except Exception as e:  # Whatever is wrong with it.
            raise Damaged(f"its meta is not a run's meta ({describe(e)})") from e
    return meta


def check_step(step: int, meta: Mapping[str, Any], restored=None) -> None:
    """Damaged unless the step that `meta` (and the restored optimizer state, if
    any) records is `step`, the one its folder is named after (a folder copied
    or renamed to another step's name is not that step's checkpoint)."""
    recorded = [("meta", meta.get("step"))]
    if restored is not None and "opt_state" in restored:
        saved = restored["opt_state"]["step"]
        if isinstance(saved, jax.Array):  # Replicated: any shard holds it.
            saved = saved.addressable_data(0)
        recorded.append(("optimizer state", int(np.asarray(saved))))
    for where, saved in recorded:
        if saved is not None and saved != step:
            raise Damaged(
                f"it holds step {saved} (its {where} says), not step {step} as"
                " its folder's name says: it was copied or renamed"
            )


# --- The checkpointer -------------------------------------------------------------


def _opt_item(state) -> dict:
    """The `opt_state` item: the step and AdamW's state."""
    return {"step": state.step, "opt_state": state.opt_state}


def _state_sums(state) -> dict[str, dict[str, str]]:
    """The checksums of a state's two items, as the meta keeps them (one pass
    over both, so one program where the arrays are on devices)."""
    both = checksums({"params": state.params, "opt_state": _opt_item(state)})
    return {
        item: {
            k.split("/", 1)[1]: v for k, v in both.items() if k.split("/")[0] == item
        }
        for item in ("params", "opt_state")
    }


def describe(error: BaseException) -> str:
    """One short line for an exception raised by orbax or tensorstore: its
    root cause, which says what was wrong with which file."""
    for number, words in workdir_lib.WRITE_ERRORS.items():
        if workdir_lib.is_disk_full(error, errnos=(number,)):
            return words
    while error.__cause__ is not None:  # What it was raised from.
        error = error.__cause__
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 240 else text[:237] + "..."


class Checkpointer:
    """The latest and best checkpoints of one run; it alone decides what is kept.

    `meta` describes the run and is saved, with the best val loss so far, the
    arrays' checksums and its own, beside every checkpoint (a copy is kept:
    the caller's dict is never changed). Every meta read is verified
    (`check_meta`), and `check(meta)` may add what the caller expects of it
    (a run's model and tokenizer): a meta that fails is a damaged checkpoint.
    `read_only` (sampling) changes nothing on disk, so it may read a workdir
    that a training run is writing.
    """

    def __init__(
        self,
        workdir: str | Path,
        meta: Mapping[str, Any] | None = None,
        read_only: bool = False,
        check: Callable[[dict], None] | None = None,
    ):
        self.workdir = Path(workdir).absolute()
        self.read_only = read_only
        self.check_run = check  # The caller's own check of each meta.
        self._meta = dict(meta or {})
        self._managers = {
            which: manager(self.workdir / FOLDERS[which], which, read_only)
            for which in (LATEST, BEST)
        }
        self._pending: dict[str, int] = {}  # Saves started and not yet confirmed.
        self._failed_saves = False
        self.best_val_loss, self.best_step = math.inf, None
        meta = self.newest_meta((LATEST,)) if self.latest_step() is not None else None
        if meta:  # (A damaged one is named by `resume`.)
            self.best_val_loss = meta.get("best_val_loss", math.inf)
            self.best_step = meta.get("best_step")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close(quiet=exc[0] is not None)

    def folder(self, which: str, step: int | None = None) -> Path:
        base = self.workdir / FOLDERS[which]
        return base if step is None else base / str(step)

    def latest_step(self, which: str = LATEST) -> int | None:
        return self._managers[which].latest_step()

    def steps(self, which: str = LATEST) -> list[int]:
        return sorted(self._managers[which].all_steps())

    def update_meta(self, **items) -> None:
        """Changes what the next saves record in `meta`."""
        self._meta.update(items)

    # --- Saving

    def save(self, step: int, state, val_loss: float | None = None) -> None:
        """Saves `state` as the latest checkpoint, and as the best if `val_loss`
        is lower than every earlier one. Asynchronous: see `check` and `wait`."""
        improved = val_loss is not None and val_loss < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_step = val_loss, step
        kinds = (LATEST, BEST) if improved else (LATEST,)
        kinds = [w for w in kinds if step not in self._managers[w].all_steps()]
        if not kinds:
            return  # Already saved (e.g. an evaluation step that is also the last).
        meta = {
            **self._meta,
            "step": step,
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "checksums": _state_sums(state),
        }
        for which in kinds:
            self._save(which, step, state, meta)

    def _save(self, which: str, step: int, state, meta: dict) -> None:
        manager = self._managers[which]
        self._wait(which)  # Orbax would wait too; this names a failure's step.
        try:
            manager.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(state.params),
                    opt_state=ocp.args.StandardSave(_opt_item(state)),
                    meta=ocp.args.JsonSave(signed(meta)),
                ),
            )
        except Exception as e:
            raise self._failed(which, step, e) from e
        self._pending[which] = step

    def _wait(self, which: str) -> None:
        step = self._pending.pop(which, None)
        try:
            self._managers[which].wait_until_finished()
        except Exception as e:
            raise self._failed(which, step, e) from e

    def check(self) -> None:
        """Raises SaveError if an asynchronous save has failed (does not block)."""
        for which in list(self._pending):
            if not self._managers[which].is_saving_in_progress():
                self._wait(which)

    def wait(self) -> None:
        """Blocks until every asynchronous save has been written (SaveError if not)."""
        for which in (LATEST, BEST):
            self._wait(which)

    def _failed(self, which: str, step: int | None, error: BaseException) -> SaveError:
        """The SaveError for a failed save, once its temporary files are deleted."""
        for other in self._managers.values():  # Let every write end first.
            with contextlib.suppress(Exception):  # This error is the one reported.
                other.wait_until_finished()
        self._pending.clear()
        self.delete_unfinished()
        self._failed_saves = True  # `close` deletes what late writes left.
        kept = self.latest_step()
        folder = self.folder(which, step)
        full = workdir_lib.is_disk_full(error, (errno.ENOSPC, errno.EDQUOT))
        fix = "free space" if full else "fix that"
        then = (
            f" Checkpoints up to step {kept} are kept: {fix} (or choose another"
            f" --workdir) and run the same command again to resume from step {kept}."
            if kept is not None
            else f" {fix.capitalize()} (or choose another --workdir) and run again."
        )
        return SaveError(
            f"could not save the checkpoint of step {step} in {folder}"
            f" ({describe(error)}; {workdir_lib.free_space(self.workdir)} in"
            f" {self.workdir}); its unfinished files are deleted.{then}"
        )

    def delete_unfinished(self, settle_s: float = 0.0) -> list[Path]:
        """Deletes the temporary folders of saves that did not finish (process 0).

        After a failed save, tensorstore's writes still in flight may create
        files again for a moment: `settle_s` keeps deleting until none appear.
        """
        found = []
        if hosts.is_main_process():
            deadline = time.monotonic() + settle_s
            while True:
                now = self._unfinished()
                for path in now:
                    shutil.rmtree(path, ignore_errors=True)
                found += now
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.1)
        hosts.sync("jaxgpt.run.checkpoint.delete_unfinished")
        return found

    def _unfinished(self) -> list[Path]:
        folders = [self.folder(which) for which in (LATEST, BEST)]
        return [
            path
            for folder in folders
            if folder.is_dir()
            for path in folder.iterdir()
            if TMP_MARK in path.name
        ]

    # --- Reading

    def read_meta(self, which: str = LATEST, step: int | None = None) -> dict[str, Any]:
        """One checkpoint's meta, verified (Damaged if it cannot be read or is
        not intact)."""
        manager = self._managers[which]
        step = manager.latest_step() if step is None else step
        try:
            restored = manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )
        except Exception as e:  # Any failure to read is damage.
            raise Damaged(describe(e)) from e
        meta = check_meta(restored["meta"], self.check_run)
        check_step(step, meta)
        return meta

    def newest_meta(self, kinds=(LATEST, BEST)) -> dict[str, Any] | None:
        """The meta of the newest checkpoint whose meta is intact, or None."""
        for step, which in self.candidates(kinds):
            try:
                return self.read_meta(which, step)
            except Exception as e:  # noqa: BLE001 Damaged: `resume` names it.
                logging.info("cannot read the meta of %s: %s", step, describe(e))
        return None

    def candidates(self, kinds=(LATEST, BEST)) -> list[tuple[int, str]]:
        """(step, kind) of every checkpoint, newest first (latest before best)."""
        pairs = [(s, w) for w in kinds for s in self._managers[w].all_steps()]
        order = {LATEST: 0, BEST: 1}
        return sorted(pairs, key=lambda p: (-p[0], order[p[1]]))

    def load(self, target_state, which: str, step: int):
        """(state, meta) of one checkpoint, verified; Damaged if it is not intact.

        `target_state` may be abstract (jax.ShapeDtypeStruct leaves with their
        shardings, see program.abstract_state): each device reads only its shards.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        restored = self._read(
            which,
            step,
            params=ocp.args.StandardRestore(abstract.params),
            opt_state=ocp.args.StandardRestore(_opt_item(abstract)),
        )
        state = target_state.replace(
            step=restored["opt_state"]["step"],
            params=restored["params"],
            opt_state=restored["opt_state"]["opt_state"],
        )
        return state, restored["meta"]

    def load_params(self, target_params, which: str, step: int):
        """(params, meta) of one checkpoint, without the optimizer state, verified."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_params)
        restored = self._read(which, step, params=ocp.args.StandardRestore(abstract))
        return restored["params"], restored["meta"]

    def load_own_params(self, which: str, step: int, target_of: Callable[[dict], Any]):
        """(params, meta) of one checkpoint, read into `target_of(meta)` of its
        own verified meta (a flipped meta elsewhere changes nothing here)."""
        meta, error = None, None
        try:
            meta = self.read_meta(which, step)
        except Damaged as e:
            error = e
        if hosts.process_max(np.array([error is not None]))[0]:
            raise error or Damaged("another process could not read its meta")
        return self.load_params(target_of(meta), which, step)

    def _read(self, which: str, step: int, **items) -> dict[str, Any]:
        """The items of one checkpoint with its meta, each array checked against
        its checksum. Every process agrees on the outcome."""
        error = None
        try:
            restored = self._managers[which].restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **items)
            )
            meta = check_meta(restored["meta"], self.check_run)
            check_step(step, meta, restored)
            sums = meta["checksums"]
            for name in items:
                verify(sums[name], restored[name], name)
        except Exception as e:  # noqa: BLE001 Any failure to read is damage.
            error = e
        failed = hosts.process_max(np.array([error is not None]))[0]
        if failed:
            if isinstance(error, Damaged):
                raise error
            reason = describe(error) if error else "another process could not read it"
            raise Damaged(reason) from error
        return restored

    def restore(self, target_state, which: str = LATEST):
        """The newest `which` checkpoint's whole state, verified (Damaged if not)."""
        return self.load(target_state, which, self.latest_step(which))[0]

    def restore_params(self, target_params, which: str = LATEST):
        """The newest `which` checkpoint's parameters, verified (Damaged if not)."""
        return self.load_params(target_params, which, self.latest_step(which))[0]

    def newest_intact(
        self,
        load: Callable[[str, int], Any],
        kinds=(LATEST, BEST),
        say=logging.warning,
        advice: str = "Choose another --workdir to start afresh.",
    ):
        """(load(which, step), which, step) of the newest checkpoint that loads.

        Each one that does not is named in one line by `say`. Those newer than
        the one used are moved to <workdir>/damaged (unless read-only); if none
        loads, nothing is moved and CheckpointError lists them. Read-only, a
        checkpoint that fails because a writer replaced it meanwhile (a newer
        one of its kind is there now) is not damage: the list is read again.
        """
        for _ in range(RACE_RETRIES):
            damaged, replaced = [], False
            for step, which in self.candidates(kinds):
                try:
                    loaded = load(which, step)
                except Damaged as e:
                    if self.read_only and self._replaced(which, step):
                        logging.info("step %d was replaced while read: %s", step, e)
                        replaced = True
                        break
                    say(
                        f"the checkpoint of step {step} ({self.folder(which, step)})"
                        f" is damaged: {e}"
                    )
                    damaged.append((which, step, str(e)))
                    continue
                for bad_which, bad_step, _ in damaged:
                    self._move_aside(bad_which, bad_step, say)
                return loaded, which, step
            if not replaced:
                break
        listed = "; ".join(f"{self.folder(w, s)}: {why}" for w, s, why in damaged)
        raise CheckpointError(
            f"no checkpoint in --workdir={self.workdir} can be read ({listed});"
            f" they are left as they are. {advice}"
        )

    def _replaced(self, which: str, step: int) -> bool:
        """Whether a writer has saved a newer `which` checkpoint than `step`
        (which it then deletes, if it keeps no more), or deleted `step`."""
        self._managers[which].reload()
        now = self._managers[which].all_steps()
        return step not in now or max(now) > step

    def _move_aside(self, which: str, step: int, say) -> None:
        if self.read_only:
            return
        source = self.folder(which, step)
        dest = self.workdir / DAMAGED / f"{FOLDERS[which]}-{step}"
        if hosts.is_main_process():
            dest.parent.mkdir(exist_ok=True)
            n = 1
            while dest.exists():
                dest, n = dest.with_name(f"{FOLDERS[which]}-{step}.{n}"), n + 1
            source.rename(dest)
        hosts.sync("jaxgpt.run.checkpoint.move_aside")
        self._managers[which].reload()
        say(f"moved {source} to {dest}")

    # --- Resuming

    def resume(self, target_state, say=logging.warning):
        """(state, meta) of the newest intact checkpoint, or None if there is none.

        First deletes the temporary folders of saves a killed run left. Then,
        for the checkpoint restored at step S, makes best/ agree: it holds the
        best evaluated step up to S (S is saved again if its best save was cut
        short).
        """
        for path in self.delete_unfinished():
            logging.info("deleted %s (a save that did not finish)", path)
        if not self.candidates():
            return None
        loaded, which, step = self.newest_intact(
            lambda w, s: self.load(target_state, w, s), say=say
        )
        state, meta = loaded
        if which == BEST or step != self.latest_step():
            say(
                f"resuming from {self.folder(which, step)}, the newest intact checkpoint"
            )
        self.best_val_loss = meta.get("best_val_loss", math.inf)
        self.best_step = meta.get("best_step")
        self._agree_best(step, state, meta, say)
        return state, meta

    def _agree_best(self, step: int, state, meta: dict, say) -> None:
        # (No best step is past `step`: the newest intact checkpoint, latest or
        # best, is the one restored.)
        if self.best_step is None or self.best_step in self._managers[BEST].all_steps():
            return
        if self.best_step == step:  # Killed between the latest and the best save.
            self._save(BEST, step, state, meta)
            self._wait(BEST)
            logging.info(
                "saved step %d as the best checkpoint (its save was cut short)", step
            )
        else:
            say(
                f"the best checkpoint (step {self.best_step}, val loss"
                f" {self.best_val_loss:.4f}) is missing from {self.folder(BEST)}"
            )

    def close(self, quiet: bool = False) -> None:
        """Waits for the saves in flight (SaveError if one failed) and closes.
        `quiet`: another error is on its way; this one is not raised."""
        try:
            if not quiet:
                self.wait()
        finally:
            for manager in self._managers.values():
                try:
                    manager.close()
                except Exception:
                    if not quiet:
                        raise
            if self._failed_saves:
                self.delete_unfinished(settle_s=1.0)


def manager(folder: Path, which: str, read_only: bool = False) -> ocp.CheckpointManager:
    """An orbax manager for one of the two kinds of checkpoint."""
    # Both managers may save the same step at once; their own barrier names
    # keep the processes' synchronisation of the two apart.
    multiprocessing = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=which)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=KEEP[which],
        create=not read_only,
        read_only=read_only,
        multiprocessing_options=multiprocessing,
    )
    return ocp.CheckpointManager(folder, options=options)


def read_meta(
    workdir: str | Path,
    which: str = LATEST,
    check: Callable[[dict], None] | None = None,
) -> dict[str, Any] | None:
    """The meta of the workdir's newest intact `which` checkpoint, or None (also
    when there is no workdir: nothing is created)."""
    if not Path(workdir).is_dir():
        return None
    with Checkpointer(workdir, read_only=True, check=check) as checkpointer:
        return checkpointer.newest_meta((which,))


# What a step folder holds: its items, and orbax's own files (named "_...").
STEP_FILES = (*ITEMS, "meta", "commit_success.txt")
DAMAGED_NAME = re.compile(rf"({'|'.join(FOLDERS.values())})-\d+(\.\d+)?")


def foreign(workdir: str | Path) -> list[Path]:
    """What jaxgpt did not write in the workdir's checkpoint folders: anything
    but step folders (and orbax's unfinished saves) holding a checkpoint's
    files, and the damaged ones moved aside."""
    workdir, found = Path(workdir), []
    for folder in (*FOLDERS.values(), DAMAGED):
        if not (workdir / folder).is_dir():
            continue
        for path in sorted((workdir / folder).iterdir()):
            if TMP_MARK in path.name:
                continue  # An unfinished save (of orbax's).
            named = (
                DAMAGED_NAME.fullmatch(path.name)
                if folder == DAMAGED
                else path.name.isdigit()
            )
            if not (named and path.is_dir() and not path.is_symlink()):
                found.append(path)
                continue
            found += [
                p
                for p in sorted(path.iterdir())
                if not (p.name in STEP_FILES or p.name.startswith("_"))
            ]
    return found


def clear(workdir: str | Path) -> None:
    """Deletes the checkpoints and metrics of a workdir (for --overwrite): only
    what jaxgpt wrote. A file or folder it did not write there refuses it all
    (ConfigError naming it), before anything is deleted.

    Process 0 deletes them; the others wait until it has.
    """
    workdir, error = Path(workdir), None
    if hosts.is_main_process():
        found = foreign(workdir)
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            error = ConfigError(
                f"--overwrite deletes only the checkpoints jaxgpt wrote in"
                f" --workdir={workdir}, and {found[0]}{more} is not one of them:"
                f" move it out of {found[0].parent} (or delete it yourself), or"
                " choose another --workdir."
            )
        else:
            for folder in (*FOLDERS.values(), DAMAGED):
                shutil.rmtree(workdir / folder, ignore_errors=True)
            (workdir / workdir_lib.METRICS_NAME).unlink(missing_ok=True)
    if hosts.process_max(np.array([error is not None]))[0]:
        raise error or ConfigError(
            f"process 0 refused to clear --workdir={workdir}: see its log."
        )


def check_run_meta(meta: dict[str, Any]) -> None:
    """Raises unless `meta` describes a jaxgpt run: a model config jaxgpt builds
    and a tokenizer (the `check` of a run's Checkpointer)."""
    if not isinstance(meta.get("model"), dict):
        raise TypeError("it has no model config")
    ModelConfig(**meta["model"])
    tok = meta.get("tokenizer")
    if not isinstance(tok, dict) or not isinstance(tok.get("name"), str):
        raise TypeError("it names no tokenizer")


def architecture(config: ModelConfig) -> dict[str, Any]:
    """The fields that fix the parameter tree and shapes: all but those a resume
    may change (dropout, dtype, remat, attention); scan_layers may not change
    (it stacks the blocks' parameters)."""
    free = free_on_resume(ModelConfig)
    return {k: v for k, v in config.to_dict().items() if k not in free}


def check_compatible(saved: dict[str, Any], config: ModelConfig, workdir) -> None:
    """Refuses to resume a checkpoint whose parameter shapes differ from `config`."""
    current = architecture(config)
    saved_arch = architecture(ModelConfig(**saved))  # Defaults fill newer fields.
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

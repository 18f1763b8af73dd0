"""Several processes of one run (one per host): joining them, the one that
writes, and agreeing on decisions.

Every process runs the same program on the same mesh (sharding.py); process 0
alone writes logs, metrics and samples, and they all write checkpoints
together.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxgpt.config import MeshConfig
from jaxgpt.sharding import replicated


def initialize_distributed(cfg: MeshConfig) -> None:
    """Joins this process to a multi-process run (call before any other JAX use).

    A no-op without --coordinator_address: one process sees only its own devices.
    """
    if not cfg.multi_process:
        return
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        # CPU processes exchange arrays over gloo (older JAX defaults to none).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        cfg.coordinator_address, cfg.num_processes, cfg.process_id
    )


def is_main_process() -> bool:
    """Process 0 alone writes logs, metrics and samples."""
    return jax.process_index() == 0


def to_local(tree, mesh: Mesh):
    """A whole copy of `tree` on this process's first device (e.g. for sampling).

    Gathers FSDP shards from every host, so all processes must call it.
    """
    whole = _replicate(mesh)(tree)
    return jax.tree.map(lambda x: x.addressable_data(0), whole)


@functools.lru_cache(maxsize=8)
def _replicate(mesh: Mesh):
    """One jitted identity per mesh: called at every evaluation, traced once."""
    return jax.jit(lambda t: t, out_shardings=replicated(mesh))


def sync(name: str) -> None:
    """Waits until every process reaches this point (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def process_max(values: np.ndarray) -> np.ndarray:
    """The elementwise maximum of `values` over all processes (itself with one).

    Every process must call it at the same point: it is how they agree on a
    decision one of them made (a stop signal, a failed read).
    """
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values
    gathered = multihost_utils.process_allgather(values.astype(np.int32))
    return np.asarray(gathered).max(axis=0).astype(values.dtype)

"""The core's programs and arrays laid on the mesh (sharding.py's): shardings
of a state and of batches, each process's rows, and jit_on_mesh.

The core's train step and evaluation are written for one device; their layout
hints (sharding.split_batch, gather, shard_like_params) do nothing there.
`jit_on_mesh` compiles the same functions for a mesh, where the hints name
its axes, with the shardings below for their arguments and results. With
several hosts (hosts.py joins them) the mesh spans all their devices, and
each process reads and puts only its own devices' rows of a batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgpt.config import ConfigError
from jaxgpt.sharding import BATCH_AXES, DATA, FSDP, param_spec


def batch_devices(mesh) -> int:
    """How many slices the batch is split into (every device takes one)."""
    return mesh.shape[DATA] * mesh.shape[FSDP]


def check_batch(batch_size: int, grad_accum_steps: int, mesh) -> None:
    """Each micro-batch must split evenly over the devices of the batch axes."""
    n, a = batch_devices(mesh), grad_accum_steps
    if (batch_size // a) % n == 0:
        return
    lo = max(n * a, batch_size // (n * a) * n * a)
    accum = f" into --grad_accum_steps={a} micro-batches," if a > 1 else ""
    raise ConfigError(
        f"--batch_size={batch_size} does not split{accum} over the {n} devices of"
        f" the mesh (--mesh_data={mesh.shape[DATA]} x --mesh_fsdp"
        f"={mesh.shape[FSDP]}): use a multiple of {n * a}, e.g. --batch_size={lo}"
        f" or {lo + n * a}."
    )


def batch_sharding(mesh: Mesh, row_axis: int = 0) -> NamedSharding:
    """Rows of a batch (axis `row_axis`) split over all devices, each keeping whole rows."""
    return NamedSharding(mesh, P(*(None,) * row_axis, BATCH_AXES))


def process_rows(mesh: Mesh, n_rows: int) -> slice:
    """The rows of a batch of `n_rows` that this process's devices hold: one
    contiguous range, as jax.make_mesh orders the devices (one process: all)."""
    index_map = batch_sharding(mesh).addressable_devices_indices_map((n_rows,))
    ranges = {index[0].indices(n_rows)[:2] for index in index_map.values()}
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    if sum(stop - start for start, stop in ranges) != hi - lo:
        raise ValueError(
            f"this process's rows of the batch are not contiguous: {ranges}"
        )
    return slice(lo, hi)


def put_batch(local, shape: tuple[int, ...], mesh: Mesh, row_axis: int = 0):
    """The global batch of `shape`, split by rows over the mesh, from this process's
    rows (`local`, the rows `process_rows` names)."""
    return jax.make_array_from_process_local_data(
        batch_sharding(mesh, row_axis), local, shape
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device (keys, token arrays, metrics)."""
    return NamedSharding(mesh, P())


def state_shardings(tree, mesh: Mesh):
    """NamedShardings for each leaf of `tree` (params, a TrainState, or its shapes),
    by shape alone (sharding.param_spec): the moments are laid out like their
    parameters."""
    fsdp = mesh.shape[FSDP]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, param_spec(np.shape(x), fsdp)), tree
    )


def on_mesh(shapes, mesh: Mesh):
    """jax.ShapeDtypeStructs of `shapes` laid out by `state_shardings`: a target to
    create or restore a state into, each device holding only its shards."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        shapes,
        state_shardings(shapes, mesh),
    )


def jit_on_mesh(fn: Callable, mesh: Mesh, **jit_kw):
    """`fn` (a function, or the jax.jit of one) compiled for `mesh` by jax.jit
    with `jit_kw` (in_shardings, out_shardings, donate_argnums), its layout
    hints naming the mesh's axes."""
    fn = getattr(fn, "__wrapped__", fn)  # The function a jax.jit wraps.

    @functools.wraps(fn)
    def on_mesh(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return jax.jit(on_mesh, **jit_kw)

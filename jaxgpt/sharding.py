"""Where arrays live: a (data, fsdp) mesh of devices, for one device or many hosts.

The devices form a grid of data x fsdp devices with two named axes:

  data  data parallelism: each of the `data` groups of devices holds all the
        parameters and trains on its own share of the batch.
  fsdp  fully sharded data parallelism (ZeRO-3): the `fsdp` devices of a group
        split the parameters, gradients and optimizer state between them.

The global batch is split over both axes, so each of the data * fsdp devices
gets batch_size / (data * fsdp) sequences. A parameter (and its AdamW moments)
is split over the fsdp axis along its largest dimension that divides by the
axis size, and replicated when none does (scalars always are). `jax.jit`
compiles one program for the whole mesh from these shardings; inside the step
(train.py) the forward pass gathers whole parameters and the gradients are
summed back onto their shards, and XLA inserts that communication. With one
device everything is replicated on it and nothing is communicated.

Several hosts run the same program, one process each, after
`initialize_distributed`; `jax.devices()` then lists the devices of all
of them and the mesh spans them all.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgpt.config import ConfigError

wsc = jax.lax.with_sharding_constraint

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)  # The batch dimension is split over both.


def initialize_distributed(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
) -> None:
    """Joins this process to a multi-process run (call before any other JAX use).

    A no-op when no flag is given: one process sees only its own devices.
    """
    given = (coordinator_address, num_processes, process_id)
    if all(v is None for v in given):
        return
    if any(v is None for v in given):
        raise ConfigError(
            "--coordinator_address, --num_processes and --process_id go together:"
            " give all three (the same address and count to every process, ids"
            " 0 .. num_processes - 1), or none for a single process."
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError(
            f"--process_id={process_id} must lie in [0, --num_processes"
            f"={num_processes})."
        )
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        # CPU processes exchange arrays over gloo (older JAX defaults to none).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def is_main_process() -> bool:
    """Process 0 alone writes logs, metrics and samples."""
    return jax.process_index() == 0


def make_mesh(data: int | None = None, fsdp: int = 1, devices=None) -> Mesh:
    """A data x fsdp grid of `devices` (default: all, on every host).

    `data` defaults to the number of devices / fsdp: pure data parallelism.
    """
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    if fsdp < 1 or (data is not None and data < 1):
        raise ConfigError(f"--mesh_data={data} and --mesh_fsdp={fsdp} must be >= 1.")
    if data is None and n % fsdp == 0:
        data = n // fsdp
    if data is None or data * fsdp != n:
        raise ConfigError(
            f"--mesh_data={data or 'auto'} x --mesh_fsdp={fsdp} must equal the"
            f" number of devices, {n} (--mesh_data defaults to {n} / --mesh_fsdp):"
            f" e.g. --mesh_data={n} --mesh_fsdp=1."
        )
    # Auto axes: jit's in/out shardings fix the layouts, XLA chooses the rest.
    return jax.make_mesh(
        (data, fsdp), (DATA, FSDP), axis_types=(AxisType.Auto,) * 2, devices=devices
    )


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


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of x_BT / y_BT split over all devices; each device keeps whole rows."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device (keys, token arrays, metrics)."""
    return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Splits the largest dimension that divides by `fsdp`; replicates otherwise."""
    if fsdp > 1:
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % fsdp == 0:
                return P(*(FSDP if d == dim else None for d in range(len(shape))))
    return P()


def state_shardings(tree, mesh: Mesh):
    """NamedShardings for each leaf of `tree` (params, a TrainState, or its shapes).

    The rule depends only on a leaf's shape, so the AdamW moments are laid out
    like their parameters and the step counter is replicated.
    """
    fsdp = mesh.shape[FSDP]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, param_spec(np.shape(x), fsdp)), tree
    )


# Inside jit: layouts for the intermediate values of a step (no-ops without a mesh).


def split_batch(tree, mesh: Mesh | None):
    """Keeps batch-major arrays split by rows over the devices."""
    return tree if mesh is None else wsc(tree, batch_sharding(mesh))


def gather(params, mesh: Mesh | None):
    """Whole parameters on every device for the forward pass (FSDP's all-gather)."""
    return params if mesh is None else wsc(params, replicated(mesh))


def shard_like_params(grads, mesh: Mesh | None):
    """Gradients summed onto their parameters' shards (FSDP's reduce-scatter)."""
    return grads if mesh is None else wsc(grads, state_shardings(grads, mesh))


def to_local(tree, mesh: Mesh):
    """A whole copy of `tree` on this process's first device (e.g. for sampling).

    Gathers FSDP shards from every host, so all processes must call it.
    """
    whole = jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)
    return jax.tree.map(lambda x: x.addressable_data(0), whole)


def sync(name: str) -> None:
    """Waits until every process reaches this point (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)

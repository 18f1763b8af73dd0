"""Where arrays live: a (data, fsdp) mesh of devices, for one device or many hosts.

  data  data parallelism: each of the `data` groups of devices holds all the
        parameters and trains on its own share of the batch.
  fsdp  fully sharded data parallelism (ZeRO-3): the `fsdp` devices of a group
        split the parameters, gradients and optimizer state between them.

The batch is split over both axes. A parameter (and its optimizer moments) is
split over fsdp along its largest dimension that divides by the axis size, or
replicated (param_spec). `jax.jit` compiles one program for the whole mesh,
and XLA inserts the communication: the forward pass gathers whole parameters,
gradients are summed back onto their shards. With several hosts the mesh
spans all their devices.

The core's train step and evaluation are written for one device: their
layout hints (split_batch, gather, shard_like_params) do nothing there. The
engine lays them on a mesh in one place, jaxgpt/run/layout.py: its
`jit_on_mesh` compiles them for the mesh, where the hints name its axes, with
the shardings of their arguments and results.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgpt.config import ConfigError

wsc = jax.lax.with_sharding_constraint

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)  # The batch dimension is split over both.


def make_mesh(data: int | None = None, fsdp: int = 1) -> Mesh:
    """A data x fsdp grid of all devices (on every host); `data` defaults to the
    number of devices / fsdp: pure data parallelism."""
    n = jax.device_count()
    if data is None and n % fsdp == 0:
        data = n // fsdp
    if data is None or data * fsdp != n:
        raise ConfigError(
            f"--mesh_data={data or 'auto'} x --mesh_fsdp={fsdp} must equal the"
            f" number of devices, {n} (--mesh_data defaults to {n} / --mesh_fsdp):"
            f" e.g. --mesh_data={n} --mesh_fsdp=1."
        )
    # Auto axes: jit's in/out shardings fix the layouts, XLA chooses the rest.
    return jax.make_mesh((data, fsdp), (DATA, FSDP), axis_types=(AxisType.Auto,) * 2)


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Splits the largest dimension that divides by `fsdp`; replicates otherwise."""
    if fsdp > 1:
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % fsdp == 0:
                return P(*(FSDP if d == dim else None for d in range(len(shape))))
    return P()


# Inside jit: layouts for the intermediate values of a step. They apply under
# layout.jit_on_mesh; elsewhere (one device, no mesh) they leave their values alone.


def constrain(tree, spec_of: Callable[[tuple[int, ...], int], P]):
    """Each leaf of `tree` laid out as spec_of(its shape, fsdp) on the mesh the
    step is compiled for; `tree` itself without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return tree
    fsdp = mesh.shape[FSDP]
    return jax.tree.map(
        lambda x: wsc(x, NamedSharding(mesh, spec_of(np.shape(x), fsdp))), tree
    )


def split_batch(tree):
    """Keeps batch-major arrays split by rows over the devices."""
    return constrain(tree, lambda shape, fsdp: P(BATCH_AXES))


def gather(params):
    """Whole parameters on every device for the forward pass (FSDP's all-gather)."""
    return constrain(params, lambda shape, fsdp: P())


def shard_like_params(grads):
    """Gradients summed onto their parameters' shards (FSDP's reduce-scatter)."""
    return constrain(grads, param_spec)

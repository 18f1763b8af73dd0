"""Several processes of one run (one per host): joining them, the one that
writes, and agreeing on decisions.

Every process runs the same program on the same mesh (sharding.py); process 0
alone writes logs, metrics and samples, and they all write checkpoints
together.

Joining: each process says what it waits for, and gives up in one line after
--distributed_timeout seconds if the others do not all join (JAX's own
deadline, later, aborts the process with a C++ stack trace). Process 0 first
checks that its port is free: a second process 0 is refused at once, instead
of taking over the first one's place (which aborts it).
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import threading
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxgpt.config import ConfigError
from jaxgpt.run.configs import MeshConfig
from jaxgpt.run.layout import replicated

JAX_GRACE_S = 60  # JAX's deadline comes this long after ours: ours speaks first.


def initialize_distributed(cfg: MeshConfig) -> None:
    """Joins this process to a multi-process run (call before any other JAX use).

    A no-op without --coordinator_address: one process sees only its own devices.
    """
    if not cfg.multi_process:
        return
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        # CPU processes exchange arrays over gloo (older JAX defaults to none).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address, n, i = cfg.coordinator_address, cfg.num_processes, cfg.process_id
    if i == 0:
        check_port_free(address)
    logging.info(
        "process %d of %d: waiting up to %d s for all %d processes to join at %s"
        " (--distributed_timeout)",
        i, n, cfg.distributed_timeout, n, address,
    )  # fmt: skip
    t0 = time.monotonic()
    watchdog = threading.Timer(cfg.distributed_timeout, give_up, (cfg, t0))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            address,
            n,
            i,
            initialization_timeout=cfg.distributed_timeout + JAX_GRACE_S,
        )
    finally:
        watchdog.cancel()
    logging.info("all %d processes joined in %.1fs", n, time.monotonic() - t0)


def give_up(cfg: MeshConfig, t0: float) -> None:
    """Ends the process with one line: the run's processes did not all join."""
    waited = "process 0 and the others" if cfg.process_id else "the other processes"
    message = (
        f"error: process {cfg.process_id} of {cfg.num_processes} gave up after"
        f" {time.monotonic() - t0:.0f} s waiting for {waited} at"
        f" --coordinator_address={cfg.coordinator_address}: start all"
        f" {cfg.num_processes} processes (--process_id=0 .. {cfg.num_processes - 1},"
        " each once) with the same --coordinator_address and --num_processes, or"
        " raise --distributed_timeout.\n"
    )
    os.write(2, message.encode())
    os._exit(1)  # JAX's threads are waiting in C++: no orderly way out.


def check_port_free(address: str) -> None:
    """Refuses to start process 0 on a port already listened on here."""
    port = int(address.rsplit(":", 1)[1])
    family = socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("::" if family == socket.AF_INET6 else "", port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                return  # Not ours to judge: JAX reports it.
            raise ConfigError(
                f"--process_id=0: port {port} of --coordinator_address={address} is"
                " in use on this host (another process 0 of this run, or another"
                " program): start process 0 once, or choose a free port for"
                " --coordinator_address."
            ) from None


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

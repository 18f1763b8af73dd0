"""Train a GPT, sample from it, or evaluate it: the entry point.

  python -m jaxgpt.main --flagfile=experiments/shakespeare_cpu.cfg
  python -m jaxgpt.main --flagfile=experiments/shakespeare_cpu.cfg --mode=sample

Every flag is a field of a config (config.py: the core's; run/configs.py: the
engine's), made into a flag by run/cli.py. main reads them once into a
Command, sets up this process and its devices, and hands the Command to the
mode: modes/training.py, modes/sampling.py or modes/evaluation.py. Nothing
below main reads a flag.
"""

from __future__ import annotations

from jaxgpt.run import stops

if __name__ == "__main__":  # Ctrl-C while JAX is imported ends quietly too.
    stops.quit_at_once()

import sys

import jax
from absl import logging

from jaxgpt import data, sharding
from jaxgpt.config import ConfigError
from jaxgpt.modes import evaluation, sampling, training
from jaxgpt.run import cache, cli, errors, hosts, quiet
from jaxgpt.run import checkpoint as ckpt
from jaxgpt.run.perf import cpu_speedups

FLAGS = cli.FLAGS
MODES = {"train": training.run, "sample": sampling.run, "eval": evaluation.run}
# Errors a user can act on: each ends the run with one line (run/errors.py).
USER_ERRORS = (ConfigError, data.DataError, FloatingPointError, ckpt.CheckpointError)


def main(argv: list[str]) -> int:
    quiet.install()  # Other libraries' log lines: one line each, orbax's none.
    cpu_speedups()  # Before XLA allocates and compiles (run/perf.py).
    cache.enable_compilation_cache()  # A second run loads its compiled programs.
    del argv  # cli.run refuses words that are not flags.
    with stops.QuitAtOnce():  # Outside the training loop: a signal ends at once.
        try:
            cmd = cli.command()
            hosts.initialize_distributed(cmd.mesh)  # Before any other use of JAX.
            if not hosts.is_main_process():
                logging.set_verbosity(logging.WARNING)  # Process 0 logs for all.
            mesh = sharding.make_mesh(cmd.mesh.mesh_data, cmd.mesh.mesh_fsdp)
            if cmd.eval.tasks and cmd.run.mode != "eval":
                raise ConfigError(
                    f"--tasks scores a checkpoint with --mode=eval, not --mode="
                    f"{cmd.run.mode}; a run scores HellaSwag with --eval_tasks=hellaswag."
                )
            return MODES[cmd.run.mode](cmd, mesh)
        except USER_ERRORS as e:
            if isinstance(e, ckpt.SaveError):  # Orbax's threads may never end.
                errors.quit_now(errors.one_line(e))
            errors.exit_with(e)
        except OSError as e:
            errors.exit_with(e, FLAGS.workdir)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            sys.exit(
                "error: out of device memory ("
                + " ".join(str(e).split())[:300]
                + "): lower --batch_size, --block_size or --num_samples."
            )


if __name__ == "__main__":
    cli.run(main)

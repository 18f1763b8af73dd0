"""Train a character-level GPT, or sample from a trained one.

  python -m jaxgpt.main --flagfile=experiments/shakespeare_cpu.cfg
  python -m jaxgpt.main --flagfile=experiments/shakespeare_cpu.cfg --mode=sample

The only module that reads flags. Every flag is a field of a config in
config.py (`--n_layer` is ModelConfig.n_layer): the flags are made from those
fields, and main builds the frozen configs from them, then calls the pure
pieces in order: text -> tokens -> state -> step, batches, evaluation -> the
training loop -> a sample.
"""

from __future__ import annotations

from jaxgpt import stops

if __name__ == "__main__":  # Ctrl-C while JAX is imported ends quietly too.
    stops.quit_at_once()

import dataclasses
import logging as pylogging
import signal
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
from absl import app, flags, logging

from jaxgpt import checkpoint as ckpt
from jaxgpt import (
    config,
    data,
    generate,
    metrics,
    model,
    perf,
    sharding,
    streams,
    tokenizer,
    train,
    workdir,
)
from jaxgpt.config import (
    ConfigError,
    DataConfig,
    MeshConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
)
from jaxgpt.speedups import keep_freed_memory

FLAGS = flags.FLAGS


def define_flags(cls: type) -> None:
    """One absl flag per option of `cls`: its name, type, default and help."""
    for field, hint in config.flag_fields(cls):
        name, default, help_ = field.name, field.default, field.metadata["help"]
        if typing.get_origin(hint) is Literal:
            flags.DEFINE_enum(name, default, list(typing.get_args(hint)), help_)
            continue
        if isinstance(hint, types.UnionType):  # `int | None`: an optional int.
            (hint,) = [t for t in typing.get_args(hint) if t is not type(None)]
        define = {
            bool: flags.DEFINE_bool,
            int: flags.DEFINE_integer,
            float: flags.DEFINE_float,
            str: flags.DEFINE_string,
        }[hint]
        define(name, default, help_)


for _cls in config.ALL:
    define_flags(_cls)


def from_flags(cls: type, **given: Any):
    """The config `cls` built from the flags' values (and `given` non-flag fields)."""
    values = {
        field.name: FLAGS[field.name].value for field, _ in config.flag_fields(cls)
    }
    return cls(**values, **given)


# --- Training ------------------------------------------------------------------


def read_corpus(data_cfg: DataConfig, block_size: int):
    """The corpus as character ids: its vocabulary and its train/val splits."""
    text = data.load_text(data_cfg.data_path)
    if not text:
        where = f"--data_path={data_cfg.data_path}" if data_cfg.data_path else "corpus"
        raise data.DataError(f"the {where} is empty: pass a text file.")
    vocab = tokenizer.build_vocab(text)
    train_tokens, val_tokens = data.split(tokenizer.encode(text, vocab))
    data.check_long_enough(len(train_tokens), block_size, "training split")
    data.check_long_enough(
        len(val_tokens), block_size, "validation split (the last 10% of the corpus)"
    )
    return vocab, {"train": train_tokens, "val": val_tokens}


def read_text_corpus(data_cfg: DataConfig, block_size: int):
    """read_corpus, with one line for a corpus that is not text."""
    try:
        return read_corpus(data_cfg, block_size)
    except UnicodeDecodeError as e:
        where = f"--data_path={data_cfg.data_path}" if data_cfg.data_path else "corpus"
        raise data.DataError(
            f"the {where} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset"
            f" {e.start}): pass a UTF-8 text file."
        ) from e


def lock_workdir(run: RunConfig) -> workdir.Lock:
    """Makes --workdir and takes its lock (process 0 holds it; all processes
    fail together if it cannot)."""
    lock, error = workdir.Lock(run.workdir, hold=sharding.is_main_process()), None
    try:
        workdir.make(run.workdir)
        if lock.hold:
            lock.acquire()
    except ConfigError as e:
        error = e
    if sharding.process_max(np.array([error is not None]))[0]:
        raise error or ConfigError(
            f"process 0 cannot use --workdir={run.workdir}: see its log."
        )
    return lock


def prepare_workdir(
    run: RunConfig, model_cfg: ModelConfig, vocab: str, meta: dict
) -> ckpt.Checkpointer:
    """The workdir's Checkpointer, emptied first with --overwrite. A workdir holding
    another model or vocabulary (by its newest readable meta) is refused."""
    if run.overwrite:
        ckpt.clear(run.workdir)
    checkpointer = ckpt.Checkpointer(run.workdir, meta)
    saved = checkpointer.newest_meta()
    if saved is None:
        return checkpointer
    problem = None
    try:
        ckpt.check_compatible(saved["model"], model_cfg, run.workdir)
    except ConfigError as e:
        problem = e
    if problem is None and saved["vocab"] != vocab:
        problem = ConfigError(
            f"--workdir={run.workdir} holds a checkpoint trained on a corpus with a"
            " different vocabulary. Pass --overwrite to start afresh there, or"
            " choose another --workdir."
        )
    if problem:
        checkpointer.close()
        raise problem
    return checkpointer


def resume(checkpointer: ckpt.Checkpointer, run: RunConfig, model_cfg, train_cfg, mesh):
    """The newest intact checkpoint's state (None for a fresh run), with the
    training settings checked against it and best/ and metrics.jsonl made to
    agree with it."""
    target = train.abstract_state(model_cfg, train_cfg, mesh)
    resumed = checkpointer.resume(target, say=say)
    current = train.trained_settings(train_cfg, run.seed)
    step = -1
    if resumed is None:
        history = [{"from_step": 0, **current}]
        state = None
    else:
        state, saved = resumed
        step = int(state.step)
        history = train.settings_history(saved, current, step, run.allow_changes)
        logging.info("resuming from step %d in %s", step, run.workdir)
    checkpointer.update_meta(settings=history)
    if sharding.is_main_process():  # Rows of steps the run will evaluate again.
        path = Path(run.workdir) / workdir.METRICS_NAME
        dropped = workdir.trim_metrics(path, step if step > 0 else -1)
        if dropped:
            logging.info("dropped %d rows past step %d from %s", dropped, step, path)
    return state


def say(line: str) -> None:
    """A warning line from process 0."""
    if sharding.is_main_process():
        logging.warning(line)


def run_train(run: RunConfig, sample_cfg: SampleConfig, mesh) -> int:
    """Trains the run in --workdir from scratch or where it stopped, then samples."""
    train_cfg = from_flags(TrainConfig)
    vocab, splits = read_text_corpus(from_flags(DataConfig), FLAGS.block_size)
    model_cfg = from_flags(ModelConfig, vocab_size=len(vocab))
    check_backend(model_cfg)
    prompt_ids = encode_prompt(sample_cfg.prompt, vocab)  # Fails now, not later.
    sharding.check_batch(train_cfg.batch_size, train_cfg.grad_accum_steps, mesh)
    meta = {"model": model_cfg.to_dict(), "train": dataclasses.asdict(train_cfg)}
    meta |= {"seed": run.seed, "vocab": vocab}
    root = streams.root(run.seed)
    with (
        lock_workdir(run),
        prepare_workdir(run, model_cfg, vocab, meta) as checkpointer,
    ):
        state = resume(checkpointer, run, model_cfg, train_cfg, mesh)
        if state is None:
            state = train.create_state(model_cfg, train_cfg, root, mesh)
        log_start(model_cfg, state.params, splits, mesh)
        log = make_log(run, model_cfg, train_cfg, int(state.step), mesh)
        train_step = train.make_train_step(model_cfg, train_cfg, mesh)
        B, T = train_cfg.batch_size, model_cfg.block_size
        t0 = time.perf_counter()
        state, stopped_by = train.train(
            state,
            train_cfg,
            lambda state, x_BT, y_BT: train_step(state, x_BT, y_BT, root),
            train.make_batches(splits["train"], root, B, T, mesh),
            train.make_evaluate(model_cfg, train_cfg, splits, root, mesh),
            checkpointer,
            log,
        )
    logging.info(
        "trained to step %d in %.1fs", int(state.step), time.perf_counter() - t0
    )
    if stopped_by in ("SIGINT", "SIGTERM"):
        return 128 + signal.Signals[stopped_by].value
    print_samples(state.params, model_cfg, vocab, prompt_ids, sample_cfg, root, mesh)
    return 0


def make_log(run: RunConfig, model_cfg, train_cfg, start_step: int, mesh):
    """The run's TrainLog, with the peak FLOP/s its MFU divides by."""
    peak, source = perf.peak_flops(model_cfg.dtype, run.peak_tflops)
    logging.info("peak %.4g GFLOP/s per device (%s)", peak / 1e9, source)
    schedule = train.lr_schedule(train_cfg)
    return metrics.TrainLog(
        run.workdir, model_cfg, train_cfg, schedule, start_step, peak, mesh.size
    )


def check_backend(model_cfg: ModelConfig) -> None:
    if model_cfg.attention == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(
            "--attention=cudnn needs an NVIDIA GPU, and this run has"
            f" {jax.default_backend()}: use --attention=dot_product or einsum."
        )


def log_start(model_cfg: ModelConfig, params, splits: dict[str, np.ndarray], mesh):
    n_params = model.count_params(params)
    n_positions = (
        model_cfg.block_size * model_cfg.n_embd if model_cfg.model == "gpt" else 0
    )
    logging.info(
        "%s: %s parameters (%s without position embeddings); vocab %d,"
        " %s train / %s val tokens; mesh %s over %d devices, %d process(es)",
        model_cfg.model,
        f"{n_params:,}",
        f"{n_params - n_positions:,}",
        model_cfg.vocab_size,
        f"{len(splits['train']):,}",
        f"{len(splits['val']):,}",
        dict(mesh.shape),
        jax.device_count(),
        jax.process_count(),
    )


# --- Sampling --------------------------------------------------------------------


def encode_prompt(prompt: str, vocab: str) -> np.ndarray:
    try:
        return tokenizer.encode(prompt, vocab)
    except ValueError as e:
        raise ConfigError(f"--prompt: {e}") from e


def print_samples(params, model_cfg, vocab, prompt_ids, cfg: SampleConfig, root, mesh):
    """Prints cfg.num_samples continuations of the prompt (process 0 prints)."""
    params = sharding.to_local(params, mesh)  # Every process takes part.
    if not sharding.is_main_process():
        return
    t0 = time.perf_counter()
    apply_fn = model.make_model(model_cfg).apply
    key = streams.stream(root, "sample")
    ids_BA = jax.device_get(
        generate.sample(apply_fn, params, model_cfg, prompt_ids, cfg, key)
    )
    dt = time.perf_counter() - t0
    for row in ids_BA:
        print(tokenizer.decode(row, vocab))
        print("-" * 40)
    logging.info(
        "sampled %d x %d tokens in %.2fs (compile included)",
        cfg.num_samples,
        cfg.max_new_tokens,
        dt,
    )


def run_sample(run: RunConfig, sample_cfg: SampleConfig, mesh) -> int:
    """Samples from the workdir's checkpoint: its parameters and meta, nothing else.

    Reads only (a training run may be writing the workdir); a damaged checkpoint
    is named and the next older one of the same kind used.
    """
    workdir_, which = Path(run.workdir), sample_cfg.checkpoint
    with ckpt.Checkpointer(workdir_, read_only=True) as checkpointer:
        meta = checkpointer.newest_meta((which,))
        if meta is None:
            found = [
                str(checkpointer.folder(which, s)) for s in checkpointer.steps(which)
            ]
            raise ConfigError(
                f"no {which} checkpoint in --workdir={workdir_}"
                + (f" has a readable meta ({', '.join(found)})" if found else "")
                + ": train first (--mode=train) or point --workdir at a run."
            )
        model_cfg = ModelConfig(**meta["model"])
        prompt_ids = encode_prompt(sample_cfg.prompt, meta["vocab"])
        target = train.abstract_params(model_cfg, mesh)
        other = ckpt.LATEST if which == ckpt.BEST else ckpt.BEST
        (params, _), _, step = checkpointer.newest_intact(
            lambda w, s: checkpointer.load_params(target, w, s),
            (which,),
            say=say,
            advice=f"Sample from --checkpoint={other}, or train again.",
        )
        logging.info("sampling from step %d of %s", step, workdir_)
    root = streams.root(run.seed)
    print_samples(params, model_cfg, meta["vocab"], prompt_ids, sample_cfg, root, mesh)
    return 0


# --- The program ---------------------------------------------------------------------


class _QuietLibraries(pylogging.Filter):
    """jaxgpt's log lines; other libraries' warnings and errors as one line each
    without their tracebacks; nothing of orbax's (jaxgpt reports what a save or
    a restore did, and a failure in one line). With --verbosity=1, everything."""

    package_dir = str(Path(__file__).resolve().parent)

    def filter(self, record) -> bool:
        path = str(Path(record.pathname).resolve())
        if path.startswith(self.package_dir) or logging.get_verbosity() >= 1:
            return True
        if record.levelno < pylogging.WARNING or "/orbax/" in path:
            return False  # Orbax's: jaxgpt says what a save or restore did.
        if record.levelno >= pylogging.ERROR and "/asyncio/" in path:
            return False  # Orbax's event loop's.
        lines = record.getMessage().splitlines()
        record.msg, record.args = (lines[0] if lines else ""), ()
        record.exc_info = record.exc_text = record.stack_info = None
        return True


_QUIET_LIBRARIES = _QuietLibraries()


def _quiet_unraisable(args) -> None:
    """Drops tensorstore's late callbacks into orbax's closed event loop after a
    failed write (reported by jaxgpt in one line); passes anything else on."""
    closed_loop = isinstance(args.exc_value, RuntimeError) and "loop is closed" in str(
        args.exc_value
    )
    if not closed_loop or logging.get_verbosity() >= 1:
        sys.__unraisablehook__(args)


def one_line(error: BaseException) -> str:
    """`error: <message>` on one line."""
    return "error: " + " ".join(str(error).split("\n"))


def os_error_line(e: OSError, workdir_: str) -> str:
    """One line for an OSError reading or writing files (a full disk names the
    workdir and its free space)."""
    where = e.filename or workdir_
    full = e.errno in workdir.FULL
    space = f"; {workdir.free_space(workdir_)} in {workdir_}" if full else ""
    advice = (
        " Free space (or choose another --workdir) and run the same command again"
        " to resume."
        if full
        else ""
    )
    return f"error: cannot use {where} ({e.strerror or e}{space}).{advice}"


def main(argv: list[str]) -> int:
    logging.get_absl_handler().addFilter(_QUIET_LIBRARIES)
    sys.unraisablehook = _quiet_unraisable
    keep_freed_memory()  # Before XLA allocates: no page faults per step.
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    with stops.QuitAtOnce():  # Outside the training loop: a signal ends at once.
        try:
            run, sample_cfg = from_flags(RunConfig), from_flags(SampleConfig)
            mesh_cfg = from_flags(MeshConfig)
            sharding.initialize_distributed(mesh_cfg)  # Before any other use of JAX.
            if not sharding.is_main_process():
                logging.set_verbosity(logging.WARNING)  # Process 0 logs for all.
            mesh = sharding.make_mesh(mesh_cfg.mesh_data, mesh_cfg.mesh_fsdp)
            if run.mode == "sample":
                return run_sample(run, sample_cfg, mesh)
            return run_train(run, sample_cfg, mesh)
        except (
            ConfigError,
            data.DataError,
            FloatingPointError,
            ckpt.CheckpointError,
        ) as e:
            sys.exit(one_line(e))
        except OSError as e:
            sys.exit(os_error_line(e, FLAGS.workdir))


if __name__ == "__main__":
    app.run(main)

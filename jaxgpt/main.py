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

import dataclasses
import functools
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
    vocab = tokenizer.build_vocab(text)
    train_tokens, val_tokens = data.split(tokenizer.encode(text, vocab))
    data.check_long_enough(len(train_tokens), block_size, "training split")
    data.check_long_enough(
        len(val_tokens), block_size, "validation split (the last 10% of the corpus)"
    )
    return vocab, {"train": train_tokens, "val": val_tokens}


def prepare_workdir(run: RunConfig, model_cfg: ModelConfig, vocab: str) -> bool:
    """Makes --workdir (empty with --overwrite); True if it holds a checkpoint to
    resume. One of another model or vocabulary is refused."""
    workdir = Path(run.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if run.overwrite:
        ckpt.clear(workdir)
    saved = ckpt.read_meta(workdir)
    if saved is None:
        return False
    ckpt.check_compatible(saved["model"], model_cfg, workdir)
    if saved["vocab"] != vocab:
        raise ConfigError(
            f"--workdir={workdir} holds a checkpoint trained on a corpus with a"
            " different vocabulary. Pass --overwrite to start afresh there, or"
            " choose another --workdir."
        )
    return True


def restore(checkpointer: ckpt.Checkpointer, target, params_only: bool, which: str):
    """The checkpoint's state (or parameters alone), or one line if it doesn't fit."""
    try:
        if params_only:
            return checkpointer.restore_params(target, which)
        return checkpointer.restore(target, which)
    except (ValueError, KeyError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(
            f"the checkpoint in {checkpointer.workdir} does not match this model"
            f" or optimizer ({str(e).splitlines()[0][:200]}). Pass --overwrite to"
            " start afresh, or choose another --workdir."
        ) from e


def run_train(run: RunConfig, sample_cfg: SampleConfig, mesh) -> int:
    """Trains the run in --workdir from scratch or where it stopped, then samples."""
    train_cfg = from_flags(TrainConfig)
    vocab, splits = read_corpus(from_flags(DataConfig), FLAGS.block_size)
    model_cfg = from_flags(ModelConfig, vocab_size=len(vocab))
    check_backend(model_cfg)
    prompt_ids = encode_prompt(sample_cfg.prompt, vocab)  # Fails now, not later.
    sharding.check_batch(train_cfg.batch_size, train_cfg.grad_accum_steps, mesh)
    resuming = prepare_workdir(run, model_cfg, vocab)
    meta = {"model": model_cfg.to_dict(), "train": dataclasses.asdict(train_cfg)}
    meta |= {"seed": run.seed, "vocab": vocab}
    root = streams.root(run.seed)
    with ckpt.Checkpointer(run.workdir, meta) as checkpointer:
        if resuming:
            target = train.abstract_state(model_cfg, train_cfg, mesh)
            state = restore(checkpointer, target, False, ckpt.LATEST)
            logging.info("resuming from step %d in %s", int(state.step), run.workdir)
        else:
            state = train.create_state(model_cfg, train_cfg, root, mesh)
        log_start(model_cfg, state.params, splits, mesh)
        log = make_log(run, model_cfg, train_cfg, int(state.step), mesh)
        train_step = train.make_train_step(model_cfg, train_cfg, mesh)
        evaluate = train.make_evaluate(model_cfg, train_cfg, splits, root, mesh)
        if run.tensorboard:  # A sample of text beside each evaluation's losses.
            one = dataclasses.replace(sample_cfg, num_samples=1)
            draw = lambda p: draw_samples(
                p, model_cfg, vocab, prompt_ids, one, root, mesh
            )
            evaluate = with_samples(evaluate, log, draw)
        B, T = train_cfg.batch_size, model_cfg.block_size
        t0 = time.perf_counter()
        state, stopped_by = train.train(
            state,
            train_cfg,
            lambda state, x_BT, y_BT: train_step(state, x_BT, y_BT, root),
            train.make_batches(splits["train"], root, B, T, mesh),
            evaluate,
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
        run.workdir,
        model_cfg,
        train_cfg,
        schedule,
        start_step,
        peak,
        mesh.size,
        tensorboard=run.tensorboard,
    )


def with_samples(evaluate, log: metrics.TrainLog, draw):
    """`evaluate`, which also hands `log` the text `draw(params)` returns (a list
    of samples, empty off process 0) at each evaluation."""

    def evaluate_and_sample(params):
        losses = evaluate(params)
        texts = draw(params)
        log.add_sample(texts[0] if texts else None)
        return losses

    return evaluate_and_sample


def check_backend(model_cfg: ModelConfig) -> None:
    if model_cfg.attention == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(
            "--attention=cudnn needs an NVIDIA GPU, and this run has"
            f" {jax.default_backend()}: use --attention=dot_product or einsum."
        )


def log_start(model_cfg: ModelConfig, params, splits: dict[str, np.ndarray], mesh):
    n_params = model.count_params(params)
    n_positions = (
        model_cfg.block_size * model_cfg.n_embd if model_cfg.model != "bigram" else 0
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


def draw_samples(params, model_cfg, vocab, prompt_ids, cfg: SampleConfig, root, mesh):
    """cfg.num_samples continuations of the prompt, as text, on process 0 (the
    others take part in gathering the parameters and get [])."""
    params = sharding.to_local(params, mesh)  # Every process takes part.
    if not sharding.is_main_process():
        return []
    key = streams.stream(root, "sample")
    ids_BA = jax.device_get(
        generate.sample(apply_of(model_cfg), params, model_cfg, prompt_ids, cfg, key)
    )
    return [tokenizer.decode(row, vocab) for row in ids_BA]


@functools.lru_cache
def apply_of(model_cfg: ModelConfig):
    """The model's apply, one per config: compiled sampling is cached by it."""
    return model.make_model(model_cfg).apply


def print_samples(params, model_cfg, vocab, prompt_ids, cfg: SampleConfig, root, mesh):
    """Prints cfg.num_samples continuations of the prompt (process 0 prints)."""
    t0 = time.perf_counter()
    texts = draw_samples(params, model_cfg, vocab, prompt_ids, cfg, root, mesh)
    if not sharding.is_main_process():
        return
    dt = time.perf_counter() - t0
    for text in texts:
        print(text)
        print("-" * 40)
    logging.info(
        "sampled %d x %d tokens in %.2fs (compile included)",
        cfg.num_samples,
        cfg.max_new_tokens,
        dt,
    )


def run_sample(run: RunConfig, sample_cfg: SampleConfig, mesh) -> int:
    """Samples from the workdir's checkpoint: its parameters and meta, nothing else."""
    workdir, which = Path(run.workdir), sample_cfg.checkpoint
    meta = ckpt.read_meta(workdir, which)
    if meta is None:
        raise ConfigError(
            f"no {which} checkpoint in --workdir={workdir}: train first"
            " (--mode=train) or point --workdir at a run."
        )
    model_cfg = ModelConfig(**meta["model"])
    prompt_ids = encode_prompt(sample_cfg.prompt, meta["vocab"])
    with ckpt.Checkpointer(workdir) as checkpointer:
        target = train.abstract_params(model_cfg, mesh)
        params = restore(checkpointer, target, True, which)
        logging.info(
            "sampling from step %d of %s", checkpointer.latest_step(which), workdir
        )
    root = streams.root(run.seed)
    print_samples(params, model_cfg, meta["vocab"], prompt_ids, sample_cfg, root, mesh)
    return 0


# --- The program ---------------------------------------------------------------------


class _OwnInfoOnly(pylogging.Filter):
    """Keeps jaxgpt's INFO lines and every library's warnings, not their INFO chatter."""

    package_dir = str(Path(__file__).resolve().parent)

    def filter(self, record) -> bool:
        return record.levelno >= pylogging.WARNING or str(
            Path(record.pathname).resolve()
        ).startswith(self.package_dir)


def main(argv: list[str]) -> int:
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
    keep_freed_memory()  # Before XLA allocates: no page faults per step.
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
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
    except (ConfigError, data.DataError, FloatingPointError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)

"""Train a GPT, or sample from a trained one.

  python -m jaxgpt.main --flagfile=experiments/shakespeare_cpu.cfg
  python -m jaxgpt.main --flagfile=experiments/shakespeare_cpu.cfg --mode=sample

Every flag is a field of a config in config.py (cli.py makes them); main
builds the frozen configs from them, then calls the pieces in order: the
dataset (token files) -> state -> step, batches, evaluation -> the training
loop (loop.py) -> a sample.
"""

from __future__ import annotations

from jaxgpt.run import stops

if __name__ == "__main__":  # Ctrl-C while JAX is imported ends quietly too.
    stops.quit_at_once()

import dataclasses
import errno
import functools
import os
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, logging
from tqdm import tqdm

from jaxgpt import data, generate, lecture, model, sharding, train
from jaxgpt.config import ConfigError, ModelConfig, SampleConfig, TrainConfig
from jaxgpt.datasets import prepare
from jaxgpt.evals import hellaswag
from jaxgpt.hub import load, tokenizer_io
from jaxgpt.run import (
    cache,
    cli,
    hosts,
    loop,
    memory,
    metrics,
    perf,
    program,
    quiet,
    workdir,
)
from jaxgpt.run import checkpoint as ckpt
from jaxgpt.run.configs import DataConfig, EvalConfig, MeshConfig, RunConfig
from jaxgpt.run.perf import cpu_speedups

FLAGS = cli.FLAGS
from_flags = cli.from_flags


# --- Training ------------------------------------------------------------------


def lock_workdir(run: RunConfig) -> workdir.Lock:
    """Makes --workdir and takes its lock (process 0 holds it; all processes
    fail together if it cannot)."""
    lock, error = workdir.Lock(run.workdir, hold=hosts.is_main_process()), None
    try:
        workdir.make(run.workdir)
        if lock.hold:
            lock.acquire()
    except ConfigError as e:
        error = e
    if hosts.process_max(np.array([error is not None]))[0]:
        raise error or ConfigError(
            f"process 0 cannot use --workdir={run.workdir}: see its log."
        )
    return lock


def resume(checkpointer: ckpt.Checkpointer, run: RunConfig, model_cfg, train_cfg, mesh):
    """The newest intact checkpoint's state (None for a fresh run), with the
    training settings checked against it and best/ and metrics.jsonl made to
    agree with it."""
    target = program.abstract_state(model_cfg, train_cfg, mesh)
    resumed = checkpointer.resume(target, say=load.say)
    current = loop.trained_settings(train_cfg, run.seed)
    step = -1
    if resumed is None:
        history = [{"from_step": 0, **current}]
        state = None
    else:
        state, saved = resumed
        step = int(state.step)
        history = loop.settings_history(saved, current, step, run.allow_changes)
        logging.info("resuming from step %d in %s", step, run.workdir)
    checkpointer.update_meta(settings=history)
    if hosts.is_main_process():  # Rows of steps the run will evaluate again.
        path = Path(run.workdir) / workdir.METRICS_NAME
        dropped = workdir.trim_metrics(path, step if step > 0 else -1)
        if dropped:
            logging.info("dropped %d rows past step %d from %s", dropped, step, path)
    return state


def choose_model(run: RunConfig, saved: dict | None, dataset: prepare.Dataset):
    """The model to train and its parameters when they are imported: a finetune's
    own (resuming it), --init_from's weights, or the flags' new model."""
    if saved is not None and saved.get("init_from"):
        model_cfg = ModelConfig(**{**saved["model"], **cli.runtime_options()})
        return model_cfg, None, dataset.tokenizer
    if saved is None and run.init_from:
        return load.import_weights(run.init_from, cli.model_overrides())
    tok = dataset.tokenizer
    return from_flags(ModelConfig, vocab_size=tok.vocab_size), None, tok


def check_resumable(saved: dict, model_cfg: ModelConfig, tok, workdir) -> None:
    """Refuses to resume a checkpoint of another tokenizer or model (the
    tokenizer first: a dataset prepared again from other text changes both)."""
    if saved.get("tokenizer") != tok.to_json():
        raise ConfigError(
            f"--workdir={workdir} holds a checkpoint trained with another tokenizer"
            f" (vocabulary {saved['model'].get('vocab_size')}, now"
            f" {model_cfg.vocab_size}): if --dataset={saved.get('dataset')} was"
            " prepared again from other text, prepare it from the run's text to"
            " resume; pass --overwrite to start afresh there (its checkpoints are"
            " deleted), or choose another --workdir."
        )
    ckpt.check_compatible(saved["model"], model_cfg, workdir)


def check_model(run: RunConfig, saved: dict | None, dataset: prepare.Dataset):
    """The model to train (choose_model), checked against the dataset, this
    machine and the workdir's checkpoint: (model config, parameters, tokenizer)."""
    model_cfg, params, tok = choose_model(run, saved, dataset)
    prepare.check_fits(dataset, model_cfg, tok)
    check_backend(model_cfg.attention)
    if saved is not None:
        check_resumable(saved, model_cfg, tok, run.workdir)
    return model_cfg, params, tok


def saved_meta(run: RunConfig) -> dict | None:
    """The meta of --workdir's newest intact checkpoint (None: there is none, or
    --overwrite will delete them). Reads only, creating nothing; every process
    reads it (the same calls on each, whether the workdir exists yet or not)."""
    if run.overwrite:
        return None
    check = ckpt.check_run_meta
    with ckpt.Checkpointer(run.workdir, read_only=True, check=check) as checkpointer:
        return checkpointer.newest_meta()


def run_train(run: RunConfig, sample_cfg: SampleConfig, mesh) -> int:
    """Trains the run in --workdir from scratch, from --init_from's weights, or
    where it stopped; then samples. Everything is checked before the workdir
    is made: a refused run writes nothing there."""
    check_backend(FLAGS.attention)  # Before the dtype --attention=cudnn needs.
    train_cfg = from_flags(TrainConfig)
    sharding.check_batch(train_cfg.batch_size, train_cfg.grad_accum_steps, mesh)
    if not run.init_from:  # The flags' model, checked before any data is read.
        from_flags(ModelConfig, vocab_size=1)
    warn_unfinished_decay(train_cfg)
    data_cfg, eval_cfg = from_flags(DataConfig), from_flags(EvalConfig)
    dataset = prepare.read_dataset(data_cfg)
    # Every model trains on the dataset's tokenizer (check_fits): the prompt
    # fails now, not after training.
    prompt_ids = encode_prompt(sample_cfg.prompt, dataset.tokenizer)
    root = train.root_key(run.seed)
    saved = saved_meta(run)
    model_cfg, params, tok = check_model(run, saved, dataset)
    memory.check_train(model_cfg, train_cfg)  # Before any batch is drawn.
    memory.check_sample(model_cfg, sample_cfg)  # The samples after training.
    # Read before the workdir is made, as --eval_tasks' rows are.
    evaluate = make_evaluate(
        model_cfg, train_cfg, dataset, root, mesh, eval_cfg, data_cfg.data_dir
    )
    with lock_workdir(run), open_run(run) as checkpointer:
        newest = checkpointer.newest_meta()
        if newest != saved:  # Another run saved there meanwhile.
            saved = newest
            model_cfg, params, tok = check_model(run, saved, dataset)
            evaluate = make_evaluate(
                model_cfg, train_cfg, dataset, root, mesh, eval_cfg, data_cfg.data_dir
            )
        checkpointer.update_meta(
            model=model_cfg.to_dict(),
            train=dataclasses.asdict(train_cfg),
            seed=run.seed,
            dataset=data_cfg.dataset,
            tokenizer=tok.to_json(),
            init_from=saved.get("init_from") if saved else run.init_from,
        )
        state = resume(checkpointer, run, model_cfg, train_cfg, mesh)
        if state is None:  # New weights, or --init_from's with a fresh optimizer.
            state = program.create_state(model_cfg, train_cfg, root, mesh, params)
        log_start(model_cfg, state.params, dataset.splits, mesh)
        log = make_log(run, model_cfg, train_cfg, int(state.step), mesh)
        train_step = program.make_train_step(model_cfg, train_cfg, mesh)
        if run.tensorboard:  # A short sample of text beside each evaluation's losses.
            one = dataclasses.replace(
                sample_cfg,
                num_samples=1,
                max_new_tokens=min(sample_cfg.max_new_tokens, 200),
            )
            draw = lambda p: draw_samples(
                p, model_cfg, tok, prompt_ids, one, root, mesh
            )
            evaluate = with_samples(evaluate, log, draw)
        B, T = train_cfg.batch_size, model_cfg.block_size
        t0 = time.perf_counter()
        state, stopped_by = loop.train(
            state,
            train_cfg,
            lambda state, x_BT, y_BT: train_step(state, x_BT, y_BT, root),
            program.make_batches(dataset.splits["train"], root, B, T, mesh),
            evaluate,
            checkpointer,
            log,
        )
    logging.info(
        "trained to step %d in %.1fs", int(state.step), time.perf_counter() - t0
    )
    if stopped_by in ("SIGINT", "SIGTERM"):
        return 128 + signal.Signals[stopped_by].value
    print_samples(state.params, model_cfg, tok, prompt_ids, sample_cfg, root, mesh)
    return 0


def warn_unfinished_decay(train_cfg: TrainConfig) -> None:
    """Says so when the run ends before its learning rate has decayed (e.g.
    --max_iters lowered below a flagfile's --lr_decay_iters)."""
    end, decay = train_cfg.max_iters, train_cfg.lr_decay_iters
    if end < decay:
        lr = float(train.lr_schedule(train_cfg)(end))
        load.say(
            f"--max_iters={end} is below --lr_decay_iters={decay}: the learning rate"
            f" ends at {lr:.3g} ({lr / train_cfg.learning_rate:.0%} of its peak), not"
            f" --min_lr={train_cfg.min_lr:g}. Pass --lr_decay_iters={end} to decay"
            " over the run (--stop_at stops early without changing the schedule)."
        )


def open_run(run: RunConfig) -> ckpt.Checkpointer:
    """The workdir's Checkpointer, its checkpoints deleted first with --overwrite."""
    if run.overwrite:
        ckpt.clear(run.workdir)
    return ckpt.Checkpointer(run.workdir, {}, check=ckpt.check_run_meta)


def make_evaluate(
    model_cfg,
    train_cfg,
    dataset: prepare.Dataset,
    root,
    mesh,
    eval_cfg: EvalConfig,
    data_dir: str,
    progress=None,
):
    """The run's evaluation: loss and bits per byte of each split, and the
    accuracies of --eval_tasks."""
    token_bytes = tokenizer_io.token_bytes(dataset.tokenizer)
    splits = dataset.splits
    evaluate = program.make_evaluate(
        model_cfg, train_cfg, splits, root, mesh, token_bytes, progress
    )
    if not eval_cfg.eval_tasks:
        return evaluate
    rows = read_hellaswag(eval_cfg, data_dir)
    rows = rows[: eval_cfg.eval_task_examples]
    score = hellaswag.make_evaluate(
        model_cfg, dataset.tokenizer, rows, mesh, eval_cfg.eval_batch_size
    )
    logging.info("hellaswag: %d examples at each evaluation", len(rows))
    return lambda params: {**evaluate(params), **score(params)}


def read_hellaswag(eval_cfg: EvalConfig, data_dir: str) -> list[dict]:
    """HellaSwag's validation rows (fetched once by process 0 if need be)."""
    read = lambda: hellaswag.load_examples(eval_cfg.eval_data_path, data_dir)
    if hosts.is_main_process():
        rows = read()
    hosts.sync("jaxgpt.evals.hellaswag")
    return rows if hosts.is_main_process() else read()


def make_log(run: RunConfig, model_cfg, train_cfg, start_step: int, mesh):
    """The run's TrainLog, with the peak FLOP/s its MFU divides by."""
    peak, source = perf.peak_flops(
        model_cfg.dtype, run.peak_tflops, store=cache.peak_file()
    )
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


def check_backend(attention: str) -> None:
    """Refuses --attention=cudnn off an NVIDIA GPU."""
    if attention == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(
            "--attention=cudnn needs an NVIDIA GPU, and this run has"
            f" {jax.default_backend()}: use --attention=dot_product or einsum."
        )


def log_start(model_cfg: ModelConfig, params, splits: dict[str, np.ndarray], mesh):
    n_params = model.count_params(params)
    n_positions = model.count_params(params.get("wpe", {}))  # Learned positions.
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


def encode_prompt(prompt: str, tok) -> np.ndarray:
    try:
        return tok.encode(prompt)
    except ValueError as e:
        raise ConfigError(f"--prompt: {e}") from e


def draw_samples(params, model_cfg, tok, prompt_ids, cfg: SampleConfig, root, mesh):
    """cfg.num_samples continuations of the prompt, as text, on process 0 (the
    others take part in gathering the parameters and get [])."""
    params = hosts.to_local(params, mesh)  # Every process takes part.
    if not hosts.is_main_process():
        return []
    key = train.stream(root, "sample")
    ids_BA = jax.device_get(
        generate.sample(apply_of(model_cfg), params, model_cfg, prompt_ids, cfg, key)
    )
    return [tok.decode(row) for row in ids_BA]


@functools.lru_cache
def apply_of(model_cfg: ModelConfig):
    """The model's apply, one per config: compiled sampling is cached by it."""
    return lecture.make_model(model_cfg).apply


def print_samples(params, model_cfg, tok, prompt_ids, cfg: SampleConfig, root, mesh):
    """Prints cfg.num_samples continuations of the prompt (process 0 prints)."""
    t0 = time.perf_counter()
    texts = draw_samples(params, model_cfg, tok, prompt_ids, cfg, root, mesh)
    if not hosts.is_main_process():
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
    """Samples from the workdir's checkpoint, or from --init_from's weights."""
    model_cfg, params, tok = load.load_model(
        run, sample_cfg.checkpoint, mesh, cli.model_overrides()
    )
    prompt_ids = encode_prompt(sample_cfg.prompt, tok)
    memory.check_sample(model_cfg, sample_cfg)
    root = train.root_key(run.seed)
    print_samples(params, model_cfg, tok, prompt_ids, sample_cfg, root, mesh)
    return 0


# What --mode=eval takes from the run it evaluates, unless given as flags.
EVAL_SETTINGS = {
    TrainConfig: ("batch_size", "grad_accum_steps", "eval_iters"),
    DataConfig: ("dataset",),
}


def eval_configs(run: RunConfig, which: str) -> tuple[TrainConfig, DataConfig, str]:
    """The run's own evaluation: its batch size, --eval_iters and dataset, read
    from its checkpoint's meta, for each one not given as a flag (all flags
    with --init_from); and a few words saying which."""
    meta = {} if run.init_from else (ckpt.read_meta(run.workdir, which) or {})
    saved = {**meta.get("train", {}), "dataset": meta.get("dataset")}

    def chosen(cls):
        names = EVAL_SETTINGS[cls]
        taken = {
            n: saved[n]
            for n in names
            if saved.get(n) is not None and not FLAGS[n].present
        }
        return dataclasses.replace(from_flags(cls), **taken)

    given = [f"--{n}" for ns in EVAL_SETTINGS.values() for n in ns if FLAGS[n].present]
    source = "the flags' settings"
    if meta:
        source = "the run's settings"
        source += f", {' '.join(given)} from the flags" if given else ""
    return chosen(TrainConfig), chosen(DataConfig), source


def run_eval(run: RunConfig, sample_cfg: SampleConfig, mesh) -> int:
    """Loss and bits per byte of a checkpoint (or --init_from's weights) on its
    dataset's splits, evaluated as the run evaluated them (eval_configs), with a
    progress bar counting the batches (and --eval_tasks' accuracies); with
    --tasks, lm-evaluation-harness's scores."""
    eval_cfg = from_flags(EvalConfig)
    if eval_cfg.tasks:
        return run_tasks(run, sample_cfg, eval_cfg, mesh)
    model_cfg, params, tok = load.load_model(
        run, sample_cfg.checkpoint, mesh, cli.model_overrides()
    )
    train_cfg, data_cfg, source = eval_configs(run, sample_cfg.checkpoint)
    dataset = prepare.read_dataset(data_cfg)
    prepare.check_fits(dataset, model_cfg, tok)
    sharding.check_batch(train_cfg.batch_size, train_cfg.grad_accum_steps, mesh)
    root = train.root_key(run.seed)
    B, T = train_cfg.batch_size, model_cfg.block_size
    logging.info(
        "evaluating on --dataset=%s: %d batches of %d x %d tokens per split (%s)",
        data_cfg.dataset, train_cfg.eval_iters, B, T, source,
    )  # fmt: skip
    total = train_cfg.eval_iters * train_cfg.grad_accum_steps * len(dataset.splits)
    quiet_here = not hosts.is_main_process()
    with tqdm(total=total, desc="evaluating", unit="batch", disable=quiet_here) as bar:
        evaluate = make_evaluate(
            model_cfg,
            train_cfg,
            dataset,
            root,
            mesh,
            eval_cfg,
            data_cfg.data_dir,
            bar.update,
        )
        losses = evaluate(params)
    if hosts.is_main_process():
        for split in dataset.splits:
            print(
                f"{split}: loss {losses[f'{split}_loss']:.4f},"
                f" {losses[f'{split}_bpb']:.4f} bits per byte"
            )
        for task in eval_cfg.task_list("eval_tasks"):
            print(
                f"{task}: acc {losses[f'{task}_acc']:.4f},"
                f" acc_norm {losses[f'{task}_acc_norm']:.4f}"
            )
    return 0


def run_tasks(run: RunConfig, sample_cfg: SampleConfig, eval_cfg, mesh) -> int:
    """--tasks through lm-evaluation-harness: the harness's table, and its JSON
    written to --workdir."""
    try:
        from jaxgpt.evals import harness  # lm-eval: the eval extra.
    except ImportError as e:
        raise ConfigError(
            f"--tasks needs lm-evaluation-harness ({e}): pip install -e '.[eval]'."
        ) from None
    if jax.process_count() > 1:
        raise ConfigError("--tasks runs in one process (it may use many devices).")
    output = workdir.make(run.workdir) / "lm_eval_results.json"
    lm = harness.JaxGPTLM(
        init_from=run.init_from,
        workdir=None if run.init_from else run.workdir,
        batch_size=eval_cfg.eval_batch_size,
        seed=run.seed,
        loaded=load.load_model(run, sample_cfg.checkpoint, mesh, cli.model_overrides()),
        mesh=mesh,
    )
    limit = eval_cfg.limit
    harness.evaluate(
        lm,
        eval_cfg.task_list(),
        num_fewshot=eval_cfg.num_fewshot,
        limit=int(limit) if limit is not None and limit >= 1 else limit,
        include_path=eval_cfg.include_path,
        output=output,
    )
    return 0


# --- The program ---------------------------------------------------------------------


def one_line(error: BaseException) -> str:
    """`error: <message>` on one line."""
    return "error: " + " ".join(str(error).split("\n"))


def os_error_line(e: OSError, workdir_: str) -> str:
    """One line for an OSError reading or writing files (a full disk names the
    workdir and its free space)."""
    where = e.filename or workdir_
    full = e.errno in workdir.FULL
    space = f"; {workdir.free_space(workdir_)} in {workdir_}" if full else ""
    advice = {
        errno.EISDIR: f" It is a folder where jaxgpt writes a file: move {where} away"
        " (or choose another --workdir) and run again.",
        errno.ENOTDIR: f" A file stands where jaxgpt keeps a folder in {where}: move"
        " it away (or choose another --workdir) and run again.",
        errno.EEXIST: f" A file stands where jaxgpt makes a folder: move {where}"
        " away (or choose another --workdir) and run again.",
        errno.EACCES: " Choose a --workdir (and files) you can write to.",
        errno.EROFS: " Choose a --workdir on a writable disk.",
    }.get(e.errno, " Fix that and run the same command again.")
    if full:
        advice = (
            " Free space (or choose another --workdir) and run the same command"
            " again to resume."
        )
    return f"error: cannot use {where} ({e.strerror or e}{space}).{advice}"


def quit_now(line: str) -> None:
    """Ends the process with `line` and exit status 1 without waiting for other
    threads: after a failed save, orbax's threads of that save may wait for it
    forever (the checkpoints are closed and cleaned up before this)."""
    logging.flush()
    sys.stdout.flush()
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    os._exit(1)


def main(argv: list[str]) -> int:
    quiet.install()  # Other libraries' log lines: one line each, orbax's none.
    cpu_speedups()  # Before XLA allocates and compiles (perf.py).
    cache.enable_compilation_cache()  # A second run loads its compiled programs.
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    with stops.QuitAtOnce():  # Outside the training loop: a signal ends at once.
        try:
            run, sample_cfg = from_flags(RunConfig), from_flags(SampleConfig)
            mesh_cfg = from_flags(MeshConfig)
            hosts.initialize_distributed(mesh_cfg)  # Before any other use of JAX.
            if not hosts.is_main_process():
                logging.set_verbosity(logging.WARNING)  # Process 0 logs for all.
            mesh = sharding.make_mesh(mesh_cfg.mesh_data, mesh_cfg.mesh_fsdp)
            if from_flags(EvalConfig).tasks and run.mode != "eval":
                raise ConfigError(
                    f"--tasks scores a checkpoint with --mode=eval, not --mode="
                    f"{run.mode}; a run scores HellaSwag with --eval_tasks=hellaswag."
                )
            modes = {"train": run_train, "sample": run_sample, "eval": run_eval}
            return modes[run.mode](run, sample_cfg, mesh)
        except (
            ConfigError,
            data.DataError,
            FloatingPointError,
            ckpt.CheckpointError,
        ) as e:
            if isinstance(e, ckpt.SaveError):  # Orbax's threads may never end.
                quit_now(one_line(e))
            sys.exit(one_line(e))
        except OSError as e:
            sys.exit(os_error_line(e, FLAGS.workdir))
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            sys.exit(
                "error: out of device memory ("
                + " ".join(str(e).split())[:300]
                + "): lower --batch_size, --block_size or --num_samples."
            )


if __name__ == "__main__":
    app.run(main)

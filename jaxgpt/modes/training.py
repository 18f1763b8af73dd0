"""--mode=train: a run from its flags to its last checkpoint and a sample.

The pieces in order: the dataset (token files) -> the model (new, imported or
resumed) -> state -> the compiled step, batches and evaluation laid on the
mesh (run/program.py) -> the training loop (run/loop.py) -> a sample.

A chat dataset (conversations prepared as rows, datasets/rows.py) fine-tunes
the model on its masked tokens: --init_from names a Hugging Face folder or a
run's --workdir, whose tokenizer is the dataset's less its chat tokens; the
model's vocabulary grows to hold them (hub.load.grow_vocab)."""

from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path

import jax
import numpy as np
from absl import logging

from jaxgpt import model, train
from jaxgpt.config import ConfigError, ModelConfig, TrainConfig
from jaxgpt.datasets import prepare, rows
from jaxgpt.evals import generation, hellaswag
from jaxgpt.hub import load, tokenizer_io
from jaxgpt.modes import sampling
from jaxgpt.run import (
    cache,
    cli,
    hosts,
    layout,
    loop,
    memory,
    metrics,
    perf,
    program,
    workdir,
)
from jaxgpt.run import checkpoint as ckpt
from jaxgpt.run.configs import EvalConfig, RunConfig


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


def choose_model(
    cmd: cli.Command, saved: dict | None, dataset: prepare.Dataset, mesh=None
):
    """The model to train and its parameters when they are imported: a finetune's
    own (resuming it), --init_from's weights, or the flags' new model."""
    if saved is not None and saved.get("init_from"):
        model_cfg = ModelConfig(**{**saved["model"], **cmd.runtime()})
        return model_cfg, None, dataset.tokenizer
    if saved is None and cmd.run.init_from:
        return with_chat_tokens(*import_model(cmd, mesh), dataset, cmd.run.seed)
    tok = dataset.tokenizer
    return cmd.model_config(vocab_size=tok.vocab_size), None, tok


def import_model(cmd: cli.Command, mesh):
    """--init_from's (model config, parameters, tokenizer): a run's --workdir
    (its best checkpoint, else its latest), or a Hugging Face model."""
    init_from = cmd.run.init_from
    if not (Path(init_from) / workdir.CHECKPOINTS).is_dir():
        return load.import_weights(init_from, cmd.model_overrides())
    which = ckpt.BEST if ckpt.read_meta(init_from, ckpt.BEST) else ckpt.LATEST
    run = dataclasses.replace(cmd.run, init_from=None, workdir=init_from)
    model_cfg, params, tok = load.load_model(run, which, mesh)
    return ModelConfig(**{**model_cfg.to_dict(), **cmd.runtime()}), params, tok


def with_chat_tokens(model_cfg, params, tok, dataset: prepare.Dataset, seed: int):
    """The imported model on a dataset of its tokenizer plus jaxgpt's chat
    tokens: the dataset's tokenizer, and the model's vocabulary grown to hold
    it (the new rows drawn as the model's init draws them)."""
    chat = dataset.tokenizer
    if getattr(chat, "name", None) != "chat" or chat.base.to_json() != tok.to_json():
        return model_cfg, params, tok
    key = train.stream(train.root_key(seed), "params")
    params, model_cfg = load.grow_vocab(params, model_cfg, chat.vocab_size, key)
    return model_cfg, params, chat


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


def check_model(
    cmd: cli.Command, saved: dict | None, dataset: prepare.Dataset, mesh=None
):
    """The model to train (choose_model), checked against the dataset, this
    machine and the workdir's checkpoint: (model config, parameters, tokenizer)."""
    run = cmd.run
    model_cfg, params, tok = choose_model(cmd, saved, dataset, mesh)
    prepare.check_fits(dataset, model_cfg, tok)
    if dataset.rows:
        rows.check_fits(dataset, model_cfg)
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


def run(cmd: cli.Command, mesh) -> int:
    """--mode=train: trains the run in --workdir from scratch, from --init_from's
    weights, or where it stopped; then samples. Everything is checked before
    the workdir is made: a refused run writes nothing there."""
    run, sample_cfg, train_cfg = cmd.run, cmd.sample, cmd.train
    data_cfg, eval_cfg = cmd.data, cmd.eval
    check_backend(cmd.model["attention"])  # Before the dtype cudnn needs.
    layout.check_batch(train_cfg.batch_size, train_cfg.grad_accum_steps, mesh)
    if not run.init_from:  # The flags' model, checked before any data is read.
        cmd.model_config(vocab_size=1)
    warn_unfinished_decay(train_cfg)
    block_size = cmd.model["block_size"] if "block_size" in cmd.given else None
    dataset = prepare.read_dataset(data_cfg, block_size, run.init_from)
    # Every model trains on the dataset's tokenizer (check_fits): the prompt
    # fails now, not after training.
    prompt_ids = sampling.encode_prompt(sample_cfg.prompt, dataset.tokenizer)
    root = train.root_key(run.seed)
    saved = saved_meta(run)
    model_cfg, params, tok = check_model(cmd, saved, dataset, mesh)
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
            model_cfg, params, tok = check_model(cmd, saved, dataset, mesh)
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
        log = make_log(run, model_cfg, train_cfg, cmd.loop, int(state.step), mesh)
        packed = bool(dataset.rows)  # Rows of conversations: train.accumulate's.
        train_step = program.make_train_step(model_cfg, train_cfg, mesh, packed)
        if run.tensorboard:  # A short sample of text beside each evaluation's losses.
            one = dataclasses.replace(
                sample_cfg,
                num_samples=1,
                max_new_tokens=min(sample_cfg.max_new_tokens, 200),
            )
            draw = lambda p: sampling.draw_samples(
                p, model_cfg, tok, prompt_ids, one, root, mesh
            )
            evaluate = with_samples(evaluate, log, draw)
        B, T = train_cfg.batch_size, model_cfg.block_size
        hooks = []
        if packed:
            hooks = [rows.LearnedTokens(cmd.loop.log_interval, log.say)]
            batches = rows.make_batches(
                rows.rows_of(dataset)["train"], root, B, mesh, hooks[0]
            )
        else:
            batches = program.make_batches(dataset.splits["train"], root, B, T, mesh)
        t0 = time.perf_counter()
        state, stopped_by = loop.train(
            state,
            cmd.loop,
            lambda state, *batch: train_step(state, *batch[:2], root, *batch[2:]),
            batches,
            evaluate,
            checkpointer,
            log,
            hooks=hooks,
        )
    logging.info(
        "trained to step %d in %.1fs", int(state.step), time.perf_counter() - t0
    )
    if stopped_by in ("SIGINT", "SIGTERM"):
        return 128 + signal.Signals[stopped_by].value
    sampling.print_samples(
        state.params, model_cfg, tok, prompt_ids, sample_cfg, root, mesh
    )
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
    """The run's evaluation: loss and bits per byte of each split (of a chat
    dataset, the loss over its masked tokens), and the accuracies of
    --eval_tasks."""
    token_bytes = tokenizer_io.token_bytes(dataset.tokenizer)
    if dataset.rows:
        splits = rows.rows_of(dataset)
        evaluate = rows.make_evaluate(model_cfg, train_cfg, splits, root, mesh)
    else:
        evaluate = program.make_evaluate(
            model_cfg, train_cfg, dataset.splits, root, mesh, token_bytes, progress
        )
    evaluate = generation.with_chat_task(
        evaluate, model_cfg, dataset.tokenizer, eval_cfg, mesh
    )
    if "hellaswag" not in eval_cfg.task_list("eval_tasks"):
        return evaluate
    examples = read_hellaswag(eval_cfg, data_dir)
    examples = examples[: eval_cfg.eval_task_examples]
    score = hellaswag.make_evaluate(
        model_cfg, dataset.tokenizer, examples, mesh, eval_cfg.eval_batch_size
    )
    logging.info("hellaswag: %d examples at each evaluation", len(examples))
    return lambda params: {**evaluate(params), **score(params)}


def read_hellaswag(eval_cfg: EvalConfig, data_dir: str) -> list[dict]:
    """HellaSwag's validation rows (fetched once by process 0 if need be)."""
    read = lambda: hellaswag.load_examples(eval_cfg.eval_data_path, data_dir)
    if hosts.is_main_process():
        rows = read()
    hosts.sync("jaxgpt.evals.hellaswag")
    return rows if hosts.is_main_process() else read()


def make_log(run: RunConfig, model_cfg, train_cfg, loop_cfg, start_step: int, mesh):
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
        loop_cfg,
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

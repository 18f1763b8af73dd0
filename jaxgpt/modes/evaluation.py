"""--mode=eval: a checkpoint's loss and bits per byte on its dataset, evaluated
as its run evaluated them; with --tasks, lm-evaluation-harness's tasks."""

from __future__ import annotations

import dataclasses

import jax
from absl import logging
from tqdm import tqdm

from jaxgpt import train
from jaxgpt.config import ConfigError, TrainConfig
from jaxgpt.datasets import prepare
from jaxgpt.hub import load
from jaxgpt.modes import training
from jaxgpt.run import checkpoint as ckpt
from jaxgpt.run import cli, hosts, layout, workdir
from jaxgpt.run.configs import DataConfig

# What --mode=eval takes from the run it evaluates, unless given as flags.
EVAL_SETTINGS = {
    TrainConfig: ("batch_size", "grad_accum_steps", "eval_iters"),
    DataConfig: ("dataset",),
}


def eval_configs(cmd: cli.Command, which: str) -> tuple[TrainConfig, DataConfig, str]:
    """The run's own evaluation: its batch size, --eval_iters and dataset, read
    from its checkpoint's meta, for each one not given as a flag (all flags
    with --init_from); and a few words saying which."""
    run = cmd.run
    meta = {} if run.init_from else (ckpt.read_meta(run.workdir, which) or {})
    saved = {**meta.get("train", {}), "dataset": meta.get("dataset")}

    def chosen(cls):
        names = EVAL_SETTINGS[cls]
        taken = {
            n: saved[n]
            for n in names
            if saved.get(n) is not None and n not in cmd.given
        }
        return dataclasses.replace(flags_cfg[cls], **taken)

    flags_cfg = {TrainConfig: cmd.train, DataConfig: cmd.data}
    given = [f"--{n}" for ns in EVAL_SETTINGS.values() for n in ns if n in cmd.given]
    source = "the flags' settings"
    if meta:
        source = "the run's settings"
        source += f", {' '.join(given)} from the flags" if given else ""
    return chosen(TrainConfig), chosen(DataConfig), source


def run(cmd: cli.Command, mesh) -> int:
    """--mode=eval: loss and bits per byte of a checkpoint (or --init_from's
    weights) on its dataset's splits, evaluated as the run evaluated them
    (eval_configs), with a progress bar counting the batches (and --eval_tasks'
    accuracies); with --tasks, lm-evaluation-harness's scores."""
    run, sample_cfg, eval_cfg = cmd.run, cmd.sample, cmd.eval
    if eval_cfg.tasks:
        return run_tasks(cmd, mesh)
    model_cfg, params, tok = load.load_model(
        run, sample_cfg.checkpoint, mesh, cmd.model_overrides()
    )
    train_cfg, data_cfg, source = eval_configs(cmd, sample_cfg.checkpoint)
    dataset = prepare.read_dataset(data_cfg)
    prepare.check_fits(dataset, model_cfg, tok)
    layout.check_batch(train_cfg.batch_size, train_cfg.grad_accum_steps, mesh)
    root = train.root_key(run.seed)
    B, T = train_cfg.batch_size, model_cfg.block_size
    logging.info(
        "evaluating on --dataset=%s: %d batches of %d x %d tokens per split (%s)",
        data_cfg.dataset, train_cfg.eval_iters, B, T, source,
    )  # fmt: skip
    total = train_cfg.eval_iters * train_cfg.grad_accum_steps * len(dataset.splits)
    quiet_here = not hosts.is_main_process()
    with tqdm(total=total, desc="evaluating", unit="batch", disable=quiet_here) as bar:
        evaluate = training.make_evaluate(
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
            scores = [(k, v) for k, v in losses.items() if k.startswith(f"{task}_")]
            print(
                f"{task}: "
                + ", ".join(f"{k[len(task) + 1 :]} {v:.4f}" for k, v in scores)
            )
    return 0


def run_tasks(cmd: cli.Command, mesh) -> int:
    """--tasks through lm-evaluation-harness: the harness's table, and its JSON
    written to --workdir."""
    run, eval_cfg = cmd.run, cmd.eval
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
        loaded=load.load_model(run, cmd.sample.checkpoint, mesh, cmd.model_overrides()),
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
        apply_chat_template=eval_cfg.apply_chat_template,
        fewshot_as_multiturn=eval_cfg.fewshot_as_multiturn,
        system_instruction=eval_cfg.system_instruction,
    )
    return 0

"""Learning from rewards on the chat task (GRPO-style, as nanochat's chat_rl).

  python -m jaxgpt.tools.grpo --init_from=out/chat_sft --workdir=out/chat_rl \\
      --chat_data_path=data/chat_tasks/train.jsonl --chat_eval_path=data/chat_tasks/test.jsonl

Each step draws --batch_size prompts of the train split (a function of
(seed, step)), samples --num_samples replies to each (run/decoding, at
--temperature, ending at the template's stop ids or the answer's length and
a margin), rewards each reply 1 if it is the exact answer (chat_tasks.score),
else 0, and takes the reply's advantage as its reward less its group's mean
(the replies to the same prompt). One AdamW step then lowers

  loss = -sum(adv * log p(token)) / (sampled tokens)

over the sampled tokens only (prompt and padding masked out). The test
split's exact match is measured at the start, every --eval_interval steps and
at the end. The state is saved as a training run saves it at each
--eval_interval and at the end, so jaxgpt.evals.generation and jaxgpt.chat
read it from --workdir; a run started again on the same --workdir with the
same settings resumes from its newest intact checkpoint, and goes on as the
uninterrupted run would (a step's prompts and replies are a function of the
seed, the step and the parameters).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgpt import lecture, sharding, train
from jaxgpt.config import ConfigError, ModelConfig, TrainConfig
from jaxgpt.datasets import chat_tasks, chat_template
from jaxgpt.evals import generation
from jaxgpt.hub import load
from jaxgpt.run import cache, cli, errors, hosts, quiet, workdir
from jaxgpt.run import checkpoint as ckpt
from jaxgpt.run.perf import cpu_speedups

# --- Advantages and the loss ------------------------------------------------------


def advantages(rewards_PG: jax.Array, normalize: bool = False) -> jax.Array:
    """[P, G]: each reply's reward less the mean of its group (the G replies to
    one prompt); with `normalize`, divided by the group's std (+1e-6). A group
    whose replies all score the same teaches nothing (all zeros)."""
    rewards_PG = jnp.asarray(rewards_PG, jnp.float32)
    adv_PG = rewards_PG - rewards_PG.mean(axis=1, keepdims=True)
    if normalize:
        adv_PG = adv_PG / (rewards_PG.std(axis=1, keepdims=True) + 1e-6)
    return adv_PG


def pg_loss(apply_fn: Callable, params, x_NT, y_NT, w_NT, adv_N) -> jax.Array:
    """-sum(adv * w * log p(y | x)) / max(sum(w), 1): the policy gradient's
    loss over the sampled tokens (w_NT: 1 where y_NT is a sampled token)."""
    logits_NTV = apply_fn({"params": params}, x_NT, deterministic=True)
    logp_NTV = jax.nn.log_softmax(logits_NTV.astype(jnp.float32))
    logp_NT = jnp.take_along_axis(logp_NTV, y_NT[..., None], axis=-1)[..., 0]
    w_NT = w_NT.astype(jnp.float32)
    return -jnp.sum(adv_N[:, None] * w_NT * logp_NT) / jnp.maximum(jnp.sum(w_NT), 1)


def make_optimizer(train_cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping (--grad_clip), then AdamW whose learning rate falls
    linearly from --learning_rate to --min_lr over --max_iters (nanochat's RL:
    to 0), weight decay on matrices only."""
    lr = optax.linear_schedule(
        train_cfg.learning_rate, train_cfg.min_lr, train_cfg.max_iters
    )
    adamw = optax.adamw(
        lr,
        b1=train_cfg.beta1,
        b2=train_cfg.beta2,
        weight_decay=train_cfg.weight_decay,
        mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p),
    )
    clip = (
        optax.clip_by_global_norm(train_cfg.grad_clip) if train_cfg.grad_clip else None
    )
    return optax.chain(clip or optax.identity(), adamw)


def make_step(apply_fn: Callable, tx: optax.GradientTransformation) -> Callable:
    """step(state, x_NT, y_NT, w_NT, adv_N) -> (state, loss): one jitted update."""

    @jax.jit
    def step(state: train.TrainState, x_NT, y_NT, w_NT, adv_N):
        loss, grads = jax.value_and_grad(
            lambda p: pg_loss(apply_fn, p, x_NT, y_NT, w_NT, adv_N)
        )(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return train.TrainState(state.step + 1, params, opt_state), loss

    return step


# --- Rollouts ---------------------------------------------------------------------


def rows_of(
    prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]], T: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x_NT, y_NT, w_NT): each prompt and its reply as one row of T inputs and
    T targets (zero-padded), w_NT 1 where the target is a reply's token."""
    N = len(prompts)
    tokens_NL = np.zeros((N, T + 1), np.int32)
    w_NT = np.zeros((N, T), np.float32)
    for n, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
        ids = np.concatenate([np.asarray(prompt), np.asarray(reply, np.int64)])
        ids = ids[: T + 1]
        tokens_NL[n, : len(ids)] = ids
        w_NT[n, len(prompt) - 1 : len(ids) - 1] = 1.0  # Targets: the reply's tokens.
    return tokens_NL[:, :-1], tokens_NL[:, 1:], w_NT


def row_length(prompts, replies, context: int, multiple: int = 16) -> int:
    """The rows' T: the longest prompt and reply less one, rounded up to a
    multiple of 16 (a handful of compiled steps), at most the context."""
    longest = max(len(p) + len(r) for p, r in zip(prompts, replies, strict=True))
    return min(context, -(-(longest - 1) // multiple) * multiple)


def reply_texts(tok, replies, stop_ids, stop_strings) -> list[str]:
    """Each reply's text: its tokens less a final stop id, cut at stop_strings."""
    texts = []
    for ids in replies:
        ids = ids[:-1] if ids and ids[-1] in stop_ids else ids
        texts.append(generation.cut(tok.decode(list(ids)), stop_strings))
    return texts


def rollout(apply_fn, params, model_cfg, tok, task, root, step, sample_cfg, P, G):
    """Step `step`'s prompts (P records of the train split, drawn by (seed, step)),
    G sampled replies to each: (prompts, replies, rewards_PG)."""
    rng = train.host_rng(train.stream(root, "batch"), step)
    picked = rng.choice(len(task.records), size=P, replace=P > len(task.records))
    seeds = train.host_rng(train.stream(root, "sample"), step).integers(0, 2**31, P * G)
    prompts, opts = [], []
    for n, k in enumerate(np.repeat(picked, G)):
        prompts.append(task.prompts[k])
        opts.append(
            dataclasses.replace(
                task.opts[k],
                temperature=sample_cfg.temperature,
                top_k=sample_cfg.top_k,
                top_p=sample_cfg.top_p,
                seed=int(seeds[n]),
            )
        )
    replies = generation.generate_ids(
        apply_fn, params, model_cfg, prompts, opts, task.stop_ids, rows=P * G
    )
    texts = reply_texts(tok, replies, task.stop_ids, task.stop_strings)
    answers = [task.records[k]["answer"] for k in np.repeat(picked, G)]
    rewards = [float(chat_tasks.score(t, a)) for t, a in zip(texts, answers)]
    return prompts, replies, np.asarray(rewards, np.float32).reshape(P, G)


# --- The run ----------------------------------------------------------------------


def evaluate(
    apply_fn, params, model_cfg, tok, test: generation.ChatTask, sample_cfg, root, rows
) -> dict[str, float]:
    """The test split's exact match: greedy, per task and overall
    (generation.exact_match's keys), and of one reply sampled as the run samples
    (sampled_acc; each record's seed the same at every evaluation)."""
    greedy = generation.generate(
        apply_fn, params, model_cfg, tok, test.prompts, test.opts,
        test.stop_ids, test.stop_strings, rows,
    )  # fmt: skip
    seeds = train.host_rng(train.stream(root, "eval"), 0).integers(
        0, 2**31, len(test.opts)
    )
    opts = [
        dataclasses.replace(
            o,
            temperature=sample_cfg.temperature,
            top_k=sample_cfg.top_k,
            top_p=sample_cfg.top_p,
            seed=int(seed),
        )
        for o, seed in zip(test.opts, seeds, strict=True)
    ]
    sampled = generation.generate(
        apply_fn, params, model_cfg, tok, test.prompts, opts,
        test.stop_ids, test.stop_strings, rows,
    )  # fmt: skip
    scores = generation.exact_match(test.records, greedy)
    scores["sampled_acc"] = generation.exact_match(test.records, sampled)["chat_acc"]
    return scores


def describe_scores(scores: dict[str, float]) -> str:
    tasks = [k for k in sorted(scores) if k.startswith("chat_") and k != "chat_acc"]
    each = " ".join(f"{k[5:-4]} {scores[k]:.3f}" for k in tasks)
    return (
        f"exact match {scores['chat_acc']:.4f} ({each}); sampled"
        f" {scores['sampled_acc']:.4f}"
    )


def import_model(cmd: cli.Command, mesh):
    """--init_from's (model config, parameters, tokenizer): a run's --workdir
    (its best checkpoint, else its latest), or a Hugging Face model."""
    init_from = cmd.run.init_from
    if not os.path.isdir(os.path.join(init_from, workdir.CHECKPOINTS)):
        return load.import_weights(init_from, cmd.model_overrides())
    which = ckpt.BEST if ckpt.read_meta(init_from, ckpt.BEST) else ckpt.LATEST
    run = dataclasses.replace(cmd.run, init_from=None, workdir=init_from)
    model_cfg, params, tok = load.load_model(run, which, mesh)
    return ModelConfig(**{**model_cfg.to_dict(), **cmd.runtime()}), params, tok


def check(cmd: cli.Command) -> None:
    """Refuses settings this run cannot use, before any work."""
    run, evals, sample = cmd.run, cmd.eval, cmd.sample
    if not run.init_from:
        raise ConfigError(
            "give --init_from: the fine-tuned run's --workdir (e.g. out/chat_sft) or"
            " a model folder to learn from rewards."
        )
    if not evals.chat_data_path:
        raise ConfigError(
            "give --chat_data_path: the train.jsonl that python -m"
            " jaxgpt.datasets.chat_tasks writes (its prompts are sampled)."
        )
    if sample.num_samples < 2:
        raise ConfigError(
            f"--num_samples={sample.num_samples}: give at least 2 replies per prompt"
            " (an advantage is a reward less its group's mean)."
        )
    if sample.temperature <= 0:
        raise ConfigError(
            f"--temperature={sample.temperature}: sample with a temperature above 0"
            " (about 1), or every reply to a prompt is the same."
        )
    if os.path.realpath(run.workdir) == os.path.realpath(run.init_from):
        raise ConfigError(
            f"--workdir={run.workdir} is --init_from: write the new model to"
            " another --workdir."
        )


def check_resume(cmd: cli.Command, meta: dict) -> None:
    """A --workdir with checkpoints resumes only a run of these settings (meta)."""
    run = cmd.run
    saved = None if run.overwrite else ckpt.read_meta(run.workdir)
    if saved is None:
        return
    if "rl" not in saved:
        raise ConfigError(
            f"--workdir={run.workdir} holds another run's checkpoints: pass"
            " --overwrite (they are deleted) or choose another --workdir."
        )
    changed = [k for k in RESUMED if saved.get(k) != meta[k]]
    if changed:
        raise ConfigError(
            f"--workdir={run.workdir} holds a run of other settings ({', '.join(changed)}"
            " differ): give its settings to resume it, --overwrite to start again,"
            " or another --workdir."
        )


RESUMED = ("model", "train", "seed", "init_from", "rl")  # What a resume keeps.


def run_rl(cmd: cli.Command, mesh) -> dict[str, float] | None:
    """Learns from rewards for --max_iters steps (resuming --workdir's run),
    saving at each --eval_interval and at the end. Returns the final exact
    match (None without --chat_eval_path)."""
    run, train_cfg, sample_cfg, eval_cfg = cmd.run, cmd.train, cmd.sample, cmd.eval
    loop_cfg = cmd.loop
    check(cmd)
    model_cfg, params, tok = import_model(cmd, mesh)
    meta = run_meta(cmd, model_cfg, tok)
    check_resume(cmd, meta)
    # Plain arrays on the default device, as the jitted step returns them: one
    # compiled step (a checkpoint's mesh shardings would compile a second).
    params = jax.tree.map(jnp.asarray, jax.device_get(hosts.to_local(params, mesh)))
    template = chat_template.template_for(tok)
    train_records = generation.read_records(eval_cfg.chat_data_path, "--chat_data_path")
    task = generation.prepare(tok, template, train_records, model_cfg.block_size)
    test_records = None
    if eval_cfg.chat_eval_path:
        test_records = generation.read_records(eval_cfg.chat_eval_path)
        test_records = test_records[: eval_cfg.eval_task_examples]
        test = generation.prepare(tok, template, test_records, model_cfg.block_size)
    apply_fn = lecture.apply_of(model_cfg)
    root = train.root_key(run.seed)
    P, G, T = train_cfg.batch_size, sample_cfg.num_samples, model_cfg.block_size
    tx = make_optimizer(train_cfg)
    state = train.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    step_fn = make_step(apply_fn, tx)

    def scored(at: int) -> dict[str, float] | None:
        if test_records is None:
            return None
        t0 = time.perf_counter()
        scores = evaluate(
            apply_fn, state.params, model_cfg, tok, test, sample_cfg, root,
            eval_cfg.eval_batch_size,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        print(f"step {at}: {describe_scores(scores)} [{seconds:.1f}s]", flush=True)
        return scores

    def learn(saver: ckpt.Checkpointer) -> dict[str, float] | None:
        """The steps from the newest intact checkpoint (or 0) to --max_iters."""
        nonlocal state
        if resumed := saver.resume(state):
            state = resumed[0]
            print(f"resuming from step {int(state.step)}", flush=True)
        first = int(state.step)
        print(
            f"{len(train_records)} train prompts of {eval_cfg.chat_data_path};"
            f" {P} prompts x {G} replies a step at temperature {sample_cfg.temperature}",
            flush=True,
        )
        scores = scored(first)
        t_start = time.perf_counter()
        for step in range(first, train_cfg.max_iters):
            t0 = time.perf_counter()
            prompts, replies, rewards_PG = rollout(
                apply_fn, state.params, model_cfg, tok, task, root, step, sample_cfg,
                P, G,
            )  # fmt: skip
            t1 = time.perf_counter()
            adv_N = advantages(rewards_PG).reshape(-1)
            x_NT, y_NT, w_NT = rows_of(
                prompts, replies, row_length(prompts, replies, T)
            )
            state, loss = step_fn(state, x_NT, y_NT, w_NT, adv_N)
            loss = float(loss)
            if step % loop_cfg.log_interval == 0 or step == train_cfg.max_iters - 1:
                learning = np.mean(rewards_PG.std(axis=1) > 0)
                print(
                    f"step {step}: reward {rewards_PG.mean():.3f}, groups with a"
                    f" signal {learning:.2f}, reply tokens {w_NT.sum(1).mean():.1f},"
                    f" loss {loss:+.4f} [sample {t1 - t0:.2f}s,"
                    f" update {time.perf_counter() - t1:.2f}s]",
                    flush=True,
                )
            done = step + 1
            if done % loop_cfg.eval_interval == 0 and done < train_cfg.max_iters:
                scored(done)
                saver.save(done, state)
        seconds = time.perf_counter() - t_start
        print(f"{train_cfg.max_iters - first} steps in {seconds:.1f}s", flush=True)
        if train_cfg.max_iters > first:  # (Else the run was complete.)
            scores = scored(train_cfg.max_iters)
            saver.save(int(state.step), state)
        return scores

    workdir.make(run.workdir)
    with workdir.Lock(run.workdir):
        if run.overwrite:
            ckpt.clear(run.workdir)
        with ckpt.Checkpointer(run.workdir, meta, check=ckpt.check_run_meta) as saver:
            scores = learn(saver)
    print(f"saved step {int(state.step)} in {run.workdir}", flush=True)
    return scores


def run_meta(cmd: cli.Command, model_cfg: ModelConfig, tok) -> dict:
    """A checkpoint's meta, as a training run's (model, tokenizer, settings), so
    every reader of a run's --workdir reads it; "rl": this run's settings."""
    run, sample = cmd.run, cmd.sample
    return {
        "model": model_cfg.to_dict(),
        "train": dataclasses.asdict(cmd.train),
        "seed": run.seed,
        "dataset": "chat_tasks",
        "tokenizer": tok.to_json(),
        "init_from": run.init_from,
        "rl": {
            "chat_data_path": cmd.eval.chat_data_path,
            "num_samples": sample.num_samples,
            "temperature": sample.temperature,
            "top_k": sample.top_k,
            "top_p": sample.top_p,
        },
    }


def main(argv: list[str]) -> int:
    quiet.install()
    cpu_speedups()
    cache.enable_compilation_cache()
    del argv  # cli.run refuses words that are not flags.
    where = cli.FLAGS.workdir
    try:
        cmd = cli.command()
        mesh = sharding.make_mesh(cmd.mesh.mesh_data, cmd.mesh.mesh_fsdp)
        run_rl(cmd, mesh)
    except (ConfigError, ckpt.CheckpointError, chat_template.ChatTemplateError) as e:
        errors.exit_with(e)
    except OSError as e:
        errors.exit_with(e, where)
    return 0


if __name__ == "__main__":
    cli.run(main)

"""Replies to many prompts decoded together, and the chat task's exact match.

  python -m jaxgpt.evals.generation --workdir=out-chat --chat_eval_path=data/chat_tasks/test.jsonl
  python -m jaxgpt.evals.generation --init_from=gpt2 --chat_eval_path=data/chat_tasks/test.jsonl

`generate` decodes prompts of any lengths in one batch through
run/decoding.decode (each row its own KV cache, so a reply is the one the
prompt gets alone), ending each at a stop id, a stop string or its maximum
length, greedy or sampled. The Decoder's context is what the longest prompt
and reply need (a power of two, at most block_size), so each step reads a KV
cache of that many positions, not of the whole block.

`evaluate_chat_task` scores the test split that jaxgpt.datasets.chat_tasks
writes: each record's messages less the final assistant answer become the
chat template's generation prompt (jaxgpt's chat tokens, or a Hugging Face
template), the greedy replies are decoded together, and chat_tasks.score
compares each with record["answer"]: the exact match of each task and of all.
A base model (no template) is prompted with the conversation's text, one
message a line, and its reply ends at the end of its line. --eval_tasks=chat
runs it at each evaluation of a training run (make_evaluate).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxgpt import lecture
from jaxgpt.config import ConfigError, ModelConfig
from jaxgpt.datasets import chat_tasks, chat_template, conversations
from jaxgpt.hub import load as hub_load
from jaxgpt.run import cache, cli, decoding, errors, hosts, quiet
from jaxgpt.run import checkpoint as ckpt
from jaxgpt.run.decoding import RowOptions
from jaxgpt.run.perf import cpu_speedups

Message = Mapping[str, str]
MARGIN = 8  # New tokens a chat task's reply may take beyond its answer's.


# --- Prompts and stops ------------------------------------------------------------


def prompt_ids(tok, template, messages: Sequence[Message]) -> np.ndarray:
    """int32 [T]: the messages less a final assistant turn (the reference
    answer), then the assistant's header (chat_template.reply_prompt)."""
    messages, _ = conversations.split_prompt(messages)
    return chat_template.reply_prompt(tok, template, messages)


# --- Generation -------------------------------------------------------------------


def fitted(model_cfg: ModelConfig, params, context: int) -> tuple[ModelConfig, Any]:
    """The model with a context of `context` positions (<= block_size): a KV
    cache that long, learned positions cut to it; the same logits for every
    position below it."""
    if context >= model_cfg.block_size or model_cfg.kind.lecture:
        return model_cfg, params
    if "wpe" in params:
        wpe = {**params["wpe"], "embedding": params["wpe"]["embedding"][:context]}
        params = {**params, "wpe": wpe}
    return dataclasses.replace(model_cfg, block_size=context), params


def generate_ids(
    apply_fn: Callable,
    params,
    model_cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    opts: RowOptions | Sequence[RowOptions],
    stop_ids: Sequence[int] = (),
    rows: int | None = None,
) -> list[list[int]]:
    """Every prompt's new tokens (the stop id that ended it included), the
    prompts decoded `rows` at a time (default: all) in a context cut to the
    longest prompt and reply (decoding.padded_length of it)."""
    if isinstance(opts, RowOptions):
        opts = [opts] * len(prompts)
    if not prompts:
        return []
    need = max(len(p) + o.max_tokens for p, o in zip(prompts, opts, strict=True))
    context = decoding.padded_length(need, model_cfg.block_size)
    cfg, params = fitted(model_cfg, params, context)
    if cfg is not model_cfg:
        apply_fn = lecture.apply_of(cfg)
    return decoding.decode(apply_fn, params, cfg, prompts, opts, stop_ids, rows)


def cut(text: str, stop_strings: Sequence[str]) -> str:
    """The text before the first of stop_strings."""
    ends = [i for s in stop_strings if s and (i := text.find(s)) >= 0]
    return text[: min(ends)] if ends else text


def generate(
    apply_fn: Callable,
    params,
    model_cfg: ModelConfig,
    tok,
    prompts: Sequence[Sequence[int]],
    opts: RowOptions | Sequence[RowOptions],
    stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    rows: int | None = None,
) -> list[str]:
    """Every prompt's reply as text: its new tokens less a final stop id, cut
    before the first of stop_strings."""
    texts = []
    for ids in generate_ids(apply_fn, params, model_cfg, prompts, opts, stop_ids, rows):
        ids = ids[:-1] if ids and ids[-1] in stop_ids else ids
        texts.append(cut(tok.decode(list(ids)), stop_strings))
    return texts


# --- The chat task ----------------------------------------------------------------


def read_records(path: str | Path, flag: str = "--chat_eval_path") -> list[dict]:
    """The records of a chat task's .jsonl (python -m jaxgpt.datasets.chat_tasks):
    each a conversation with its "answer" (and "task"); ConfigError naming the
    file and line of one that is not."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{flag}={path} is not a file: give a test.jsonl that python -m"
            " jaxgpt.datasets.chat_tasks wrote."
        )
    records = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{number}: not JSON ({e.msg}).") from None
        problem = conversations.check_conversation(record)
        if problem is None and not isinstance(record.get("answer"), str):
            problem = 'it has no "answer" string'
        if problem:
            raise ConfigError(
                f"{path}:{number}: {problem}: give a chat task's records (python -m"
                " jaxgpt.datasets.chat_tasks writes them)."
            )
        records.append(record)
    if not records:
        raise ConfigError(f"{flag}={path} holds no records.")
    return records


def exact_match(records: Sequence[Mapping], replies: Sequence[str]) -> dict[str, float]:
    """{"chat_acc": all records', "chat_<task>_acc": each task's} exact match."""
    right, count = collections.Counter(), collections.Counter()
    for record, reply in zip(records, replies, strict=True):
        ok = chat_tasks.score(reply, record["answer"])
        for name in ("chat", f"chat_{record.get('task', 'other')}"):
            right[name] += ok
            count[name] += 1
    return {f"{name}_acc": right[name] / count[name] for name in sorted(count)}


@dataclasses.dataclass(frozen=True)
class ChatTask:
    """A chat task's records ready to decode: prompts, options, stops."""

    records: list[dict]
    prompts: list[np.ndarray]
    opts: list[RowOptions]
    stop_ids: tuple[int, ...]
    stop_strings: tuple[str, ...]


def prepare(tok, template, records: Sequence[dict], context: int) -> ChatTask:
    """Each record's generation prompt and greedy options: new tokens at most
    its answer's and MARGIN more (a longer reply cannot match), within the
    context. A base model's reply ends at its line's end."""
    prompts, opts = [], []
    for i, record in enumerate(records):
        try:
            ids = prompt_ids(tok, template, record["messages"])
            answer = len(tok.encode(record["answer"])) + MARGIN
        except ValueError as e:  # A character the tokenizer does not hold.
            raise ConfigError(
                f"the chat task's record {i}: {e} Use a model whose tokenizer holds"
                " the task's characters."
            ) from None
        if len(ids) >= context:
            raise ConfigError(
                f"a chat task's prompt takes {len(ids)} tokens and the model's"
                f" context holds {context}: use a model with a longer --block_size"
                " or shorter prompts."
            )
        prompts.append(ids)
        opts.append(RowOptions(min(answer, context - len(ids)), temperature=0.0))
    strings = () if template is not None else ("\n",)
    return ChatTask(
        list(records), prompts, opts, chat_template.stop_ids_of(tok, template), strings
    )


def evaluate_chat_task(
    apply_fn: Callable,
    params,
    model_cfg: ModelConfig,
    tok,
    records: Sequence[dict],
    template=None,
    rows: int | None = None,
) -> dict[str, float]:
    """Exact match of greedy replies to the records, per task and overall
    (exact_match's keys); `template` None: the tokenizer's own
    (chat_template.template_for), if any."""
    template = template if template is not None else chat_template.template_for(tok)
    task = prepare(tok, template, records, model_cfg.block_size)
    replies = generate(
        apply_fn, params, model_cfg, tok, task.prompts, task.opts,
        task.stop_ids, task.stop_strings, rows,
    )  # fmt: skip
    return exact_match(task.records, replies)


def make_evaluate(
    model_cfg: ModelConfig, tok, path: str, mesh, examples: int | None, rows: int
) -> Callable[[Any], dict[str, float]]:
    """--eval_tasks=chat in a training run: evaluate(params) -> exact_match of
    the first `examples` records of `path` (a whole copy of the parameters on
    each process, `rows` replies decoded together)."""
    records = read_records(path)[:examples]
    template = chat_template.template_for(tok)
    apply_fn = lecture.apply_of(model_cfg)

    def evaluate(params) -> dict[str, float]:
        local = hosts.to_local(params, mesh)
        return evaluate_chat_task(
            apply_fn, local, model_cfg, tok, records, template, rows
        )

    return evaluate


def with_chat_task(evaluate, model_cfg, tok, eval_cfg, mesh):
    """`evaluate` with the chat task's exact match added when --eval_tasks
    names chat (the training loop's hook)."""
    if "chat" not in eval_cfg.task_list("eval_tasks"):
        return evaluate
    if not eval_cfg.chat_eval_path:
        raise ConfigError(
            "--eval_tasks=chat needs --chat_eval_path: the test.jsonl that python -m"
            " jaxgpt.datasets.chat_tasks writes."
        )
    score = make_evaluate(
        model_cfg, tok, eval_cfg.chat_eval_path, mesh,
        eval_cfg.eval_task_examples, eval_cfg.eval_batch_size,
    )  # fmt: skip
    return lambda params: {**evaluate(params), **score(params)}


# --- The command ------------------------------------------------------------------


def table(scores: Mapping[str, float], records: Sequence[Mapping]) -> str:
    """The exact-match table: one row per task, then all."""
    count = collections.Counter(r.get("task", "other") for r in records)
    lines = ["| task | examples | exact match |", "|---|---:|---:|"]
    for task in sorted(count):
        lines.append(f"| {task} | {count[task]} | {scores[f'chat_{task}_acc']:.4f} |")
    lines.append(f"| all | {len(records)} | {scores['chat_acc']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    quiet.install()  # Other libraries' log lines: one line each, orbax's none.
    cpu_speedups()  # Before XLA allocates and compiles (run/perf.py).
    cache.enable_compilation_cache()
    del argv  # cli.run refuses words that are not flags.
    cmd = cli.command()
    run, eval_cfg = cmd.run, cmd.eval
    try:
        if not eval_cfg.chat_eval_path:
            raise ConfigError(
                "give --chat_eval_path: the test.jsonl that python -m"
                " jaxgpt.datasets.chat_tasks writes."
            )
        records = read_records(eval_cfg.chat_eval_path)
        records = records[: eval_cfg.eval_task_examples]
        model_cfg, params, tok = hub_load.load_local(cmd)
        template = chat_template.template_for(tok)
        task = prepare(tok, template, records, model_cfg.block_size)
    except (ConfigError, ckpt.CheckpointError, chat_template.ChatTemplateError) as e:
        errors.exit_with(e)
    except OSError as e:
        errors.exit_with(e, run.workdir)
    kind = "chat template" if template is not None else "no template: text prompts"
    print(f"{len(records)} records of {eval_cfg.chat_eval_path}, {kind}")
    t0 = time.perf_counter()
    replies = generate(
        lecture.apply_of(model_cfg), params, model_cfg, tok, task.prompts,
        task.opts, task.stop_ids, task.stop_strings, eval_cfg.eval_batch_size,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    print(table(exact_match(task.records, replies), task.records))
    print(
        f"{len(replies)} greedy replies in {seconds:.1f}s, compile included"
        f" ({len(replies) / seconds:.1f} replies/s, {eval_cfg.eval_batch_size} at once)"
    )
    return 0


if __name__ == "__main__":
    cli.run(main)

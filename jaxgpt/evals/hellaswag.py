"""HellaSwag at each evaluation of a training run: acc and acc_norm.

Each example is a context and four endings, one of them right. As
lm-evaluation-harness scores it (completion-style, as build-nanogpt does too),
the model's choice is the ending with the highest log-likelihood after the
context (acc), or the highest log-likelihood per character of the ending
(acc_norm); the texts are cleaned as the harness's `hellaswag` task cleans
them. Tokens come from the run's tokenizer (a char model is scored too, near
chance), windows from scoring.window, so each ending gets the log-likelihood the
harness would give it.

Data: the validation split of HF `datasets`' Rowan/hellaswag (10,042
examples), read once and kept in <data_dir>/hellaswag/validation.jsonl, or a
local jsonl in the same schema (--eval_data_path). All examples are padded to
one shape [n, b, 4, T], b examples split over the mesh's devices, and one
compiled scan over the n batches scores them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from jax.sharding import Mesh

from jaxgpt.config import ConfigError, ModelConfig
from jaxgpt.evals import scoring
from jaxgpt.run import layout

DATASET = "Rowan/hellaswag"
FIELDS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")
ENDINGS = 4


# --- The data ---------------------------------------------------------------------


def cached_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / "hellaswag" / "validation.jsonl"


def read_examples(path: str | Path, source: str | None = None) -> list[dict]:
    """The rows of a jsonl in Rowan/hellaswag's schema; ConfigError naming the
    file (as `source`, default --eval_data_path=path), the line and the field
    if a row is not."""
    path = Path(path)
    flag = source or f"--eval_data_path={path}"
    if not path.is_file():
        raise ConfigError(f"{flag} is not a file.")
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                missing = [k for k in FIELDS if k not in row]
                if missing:
                    raise ValueError(f"no {missing[0]!r}")
                if len(row["endings"]) != ENDINGS:
                    raise ValueError(f"{len(row['endings'])} endings, not {ENDINGS}")
                if int(row["label"]) not in range(ENDINGS):
                    raise ValueError(f"label {row['label']!r} is not 0 .. 3")
            except (ValueError, TypeError) as e:
                raise ConfigError(
                    f"{flag}, line {i}: not a HellaSwag row ({e}); each line"
                    f" holds {DATASET}'s fields: {', '.join(FIELDS)}."
                ) from None
            rows.append(row)
    if not rows:
        raise ConfigError(f"{flag} holds no examples.")
    return rows


def load_examples(data_path: str | None, data_dir: str | Path) -> list[dict]:
    """HellaSwag's validation rows: --eval_data_path's, else the copy kept in
    data_dir, else fetched through HF datasets once (and kept there)."""
    if data_path:
        return read_examples(data_path)
    path = cached_path(data_dir)
    if not path.is_file():
        fetch(path)
    return read_examples(path, f"{path} (delete it to read the split again)")


def fetch(path: Path) -> None:
    """Writes Rowan/hellaswag's validation split to `path` (through HF datasets)."""
    try:
        import datasets

        rows = datasets.load_dataset(DATASET, split="validation")
    except Exception as e:  # noqa: BLE001 ImportError, offline, the Hub's...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"--eval_tasks=hellaswag: HellaSwag's validation split is not in {path}"
            f" and could not be read through HF datasets ({reason}). Run once online"
            " with `pip install datasets`, or pass --eval_data_path=FILE: a jsonl of"
            f" {DATASET}'s validation rows ({', '.join(FIELDS)})."
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part")
    with part.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({k: row[k] for k in FIELDS}) + "\n")
    part.replace(path)  # Whole, or not there.


def preprocess(text: str) -> str:
    """The harness's cleaning of HellaSwag's text (WikiHow's bracketed artifacts)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def query_and_endings(row: dict) -> tuple[str, list[str]]:
    """The context and the endings, as the harness's hellaswag task builds them."""
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    query = preprocess(row["activity_label"] + ": " + ctx)
    return query, [preprocess(ending) for ending in row["endings"]]


def encode_pair(encode, context: str, continuation: str):
    """(context ids, continuation ids) as the harness splits them: a trailing
    space of the context moves to the continuation; the whole text is encoded
    and the context's tokens are cut off its front."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx) :]


def windows(rows: list[dict], tok, block_size: int) -> list[list[tuple]]:
    """Each example's four (inputs, targets, n) windows (scoring.window)."""
    encode, out = scoring.encoder(tok), []
    for row in rows:
        query, endings = query_and_endings(row)
        pairs = [encode_pair(encode, query, " " + ending) for ending in endings]
        out.append([scoring.window(c, e, block_size) for c, e in pairs])
    return out


def answers(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """The endings' lengths in characters [E, 4], and the right endings [E]."""
    chars = [[len(e) for e in query_and_endings(row)[1]] for row in rows]
    return np.array(chars, np.float64), np.array([int(r["label"]) for r in rows])


# --- The evaluation ---------------------------------------------------------------


def accuracies(ll_EK: np.ndarray, chars_EK: np.ndarray, labels_E: np.ndarray):
    """acc (highest log-likelihood) and acc_norm (highest per character), in
    float64 as the harness computes them."""
    ll_EK = np.asarray(ll_EK, np.float64)
    acc = np.argmax(ll_EK, axis=1) == labels_E
    acc_norm = np.argmax(ll_EK / chars_EK, axis=1) == labels_E
    return float(acc.mean()), float(acc_norm.mean())


def make_log_likelihoods(
    model_cfg: ModelConfig, tok, rows: list[dict], mesh: Mesh, batch_rows: int = 16
) -> Callable[[object], np.ndarray]:
    """ll_EK(params): the log-likelihood of each example's endings, scored by
    the lm-eval model's program (scoring.make_score) on batches of about
    batch_rows / 4 examples (a multiple of the mesh's devices, each device
    holding whole examples), each process putting its own devices' rows."""
    per_example = windows(rows, tok, model_cfg.block_size)
    E, T = len(rows), max(len(w[0]) for ex in per_example for w in ex)
    n_dev = layout.batch_devices(mesh)
    b = max(1, batch_rows // ENDINGS // n_dev) * n_dev  # Examples per batch.
    n, B = -(-E // b), b * ENDINGS  # Batches, and rows in each.
    x, y, m = (np.zeros((n * b, ENDINGS, T), t) for t in (np.int32, np.int32, bool))
    for e, ex in enumerate(per_example):
        x[e], y[e], m[e] = scoring.pack(ex, ENDINGS, T)
    rows_of = layout.process_rows(mesh, B)
    batches = [
        [
            layout.put_batch(
                z[i * b : (i + 1) * b].reshape(B, T)[rows_of], (B, T), mesh
            )
            for z in (x, y, m)
        ]
        for i in range(n)
    ]
    score = scoring.make_score(model_cfg, mesh)

    def log_likelihoods(params) -> np.ndarray:
        ll = [np.asarray(score(params, *batch)[0]) for batch in batches]
        return np.concatenate(ll).reshape(n * b, ENDINGS)[:E]

    return log_likelihoods


def make_evaluate(
    model_cfg: ModelConfig, tok, rows: list[dict], mesh: Mesh, batch_rows: int = 16
) -> Callable[[object], dict[str, float]]:
    """evaluate(params) -> {"hellaswag_acc", "hellaswag_acc_norm"} over `rows`."""
    log_likelihoods = make_log_likelihoods(model_cfg, tok, rows, mesh, batch_rows)
    chars_EK, labels_E = answers(rows)

    def evaluate(params) -> dict[str, float]:
        acc, acc_norm = accuracies(log_likelihoods(params), chars_EK, labels_E)
        return {"hellaswag_acc": acc, "hellaswag_acc_norm": acc_norm}

    return evaluate

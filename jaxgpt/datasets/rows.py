"""Training on a chat dataset's rows (prepare.prepare_chat): batches, evaluation
and the count of the tokens learned.

A batch is whole rows of block_size + 1 tokens, drawn by index from the batch
stream at (seed, step), so a resumed run sees the batches an uninterrupted
one would: x_BT = tokens[:, :-1], y_BT = tokens[:, 1:], and `packed` =
{"w_BT": mask[:, 1:] (a conversation's first token has mask 0, so no
conversation learns to predict the next one's start), "seg_BT":
segments[:, :-1], "pos_BT": segment_positions(segments)[:, :-1]}, which
train.loss_and_grads reads: attention within each conversation, positions
restarting at each, the loss the mean over the masked tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxgpt import train
from jaxgpt.config import ConfigError, ModelConfig, TrainConfig
from jaxgpt.datasets.conversations import segment_positions
from jaxgpt.datasets.prepare import Dataset
from jaxgpt.datasets.token_file import TokenFile
from jaxgpt.run import layout, program


@dataclasses.dataclass(frozen=True)
class Rows:
    """One split's rows: tokens, loss mask and segment ids, each a flat file
    of rows of `length` items (read a row at a time)."""

    tokens: TokenFile
    mask: TokenFile
    segments: TokenFile
    length: int  # block_size + 1.

    def __len__(self) -> int:
        return len(self.tokens) // self.length

    def read(self, index_B: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        """(x_BT, y_BT, packed) of the rows `index_B`."""
        L = self.length
        read = lambda f: np.stack([f[i * L : (i + 1) * L] for i in index_B])
        tokens_BL, mask_BL = read(self.tokens).astype(np.int32), read(self.mask)
        segments_BL = read(self.segments).astype(np.int32)
        packed = {
            "w_BT": mask_BL[:, 1:].astype(np.float32),
            "seg_BT": segments_BL[:, :-1],
            "pos_BT": segment_positions(segments_BL)[:, :-1],
        }
        return tokens_BL[:, :-1], tokens_BL[:, 1:], packed


def rows_of(dataset: Dataset) -> dict[str, Rows]:
    """Each split's Rows of a chat dataset."""
    length = dataset.block_size + 1
    return {
        split: Rows(tokens, **dataset.rows[split], length=length)
        for split, tokens in dataset.splits.items()
    }


def check_fits(dataset: Dataset, model_cfg: ModelConfig) -> None:
    """The model's context holds the dataset's rows."""
    if dataset.block_size > model_cfg.block_size:
        raise ConfigError(
            f"--dataset={dataset.meta['dataset']} holds rows of"
            f" {dataset.block_size} + 1 tokens, longer than the model's context of"
            f" {model_cfg.block_size}: prepare it with --block_size="
            f"{model_cfg.block_size} (or less) into another --dataset."
        )


def get_rows(
    rows: Rows, rng: np.random.Generator, batch_size: int, which: slice = slice(None)
) -> tuple[np.ndarray, np.ndarray, dict]:
    """`batch_size` random whole rows (all drawn, `which` of them read: a
    process's share): (x_BT, y_BT, packed)."""
    index_B = rng.integers(0, len(rows), size=batch_size)
    return rows.read(index_B[which])


def make_batches(
    rows: Rows, root: jax.Array, batch_size: int, mesh: Mesh, counter=None
) -> Callable[[int], tuple]:
    """batch(step) -> (x_BT, y_BT, packed) of training step `step`, drawn on the
    host from the batch stream and split by rows over the devices (each
    process reading its own). `counter` (a LearnedTokens) counts their
    masked tokens."""
    batch_stream = np.asarray(train.stream(root, "batch"))
    which = layout.process_rows(mesh, batch_size)
    shape = (batch_size, rows.length - 1)

    def batch(step: int):
        x_BT, y_BT, packed = get_rows(
            rows, train.host_rng(batch_stream, step), batch_size, which
        )
        if counter is not None:
            counter.add(step, float(packed["w_BT"].sum()))
        put = lambda z: layout.put_batch(z, shape, mesh)
        return put(x_BT), put(y_BT), jax.tree.map(put, packed)

    return batch


def make_evaluate(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    splits: dict[str, Rows],
    root: jax.Array,
    mesh: Mesh,
) -> Callable[[Any], dict[str, float]]:
    """evaluate(params) -> {"<split>_loss": the mean loss over the masked tokens
    of the run's fixed evaluation rows}: eval_iters x grad_accum_steps batches
    of batch_size / grad_accum_steps rows per split, drawn from the eval stream."""
    n = train_cfg.eval_iters * train_cfg.grad_accum_steps
    b = train_cfg.batch_size // train_cfg.grad_accum_steps
    eval_stream = np.asarray(train.stream(root, "eval"))
    which = layout.process_rows(mesh, b)

    def batches(rows: Rows):
        drawn = [
            get_rows(rows, train.host_rng(eval_stream, i), b, which) for i in range(n)
        ]
        x_KbT, y_KbT, packed_K = jax.tree.map(lambda *z: np.stack(z), *drawn)
        put = lambda z: layout.put_batch(z, (n, b, rows.length - 1), mesh, 1)
        return put(x_KbT), put(y_KbT), jax.tree.map(put, packed_K)

    fixed = {name: batches(rows) for name, rows in splits.items()}
    add_losses = program.make_packed_eval_loss(model_cfg, mesh)

    def evaluate(params) -> dict[str, float]:
        out = {}
        for name, batch in fixed.items():
            total, weight = np.asarray(
                add_losses(params, np.zeros(2, np.float32), *batch)
            )
            out[f"{name}_loss"] = float(total) / max(float(weight), 1.0)
        return out

    return evaluate


class LearnedTokens:
    """The masked (learned) tokens of the steps this run trains, said every
    log_interval steps: a hook of loop.train (it never stops the run)."""

    def __init__(self, log_interval: int, say: Callable[[str], None]):
        self.log_interval, self.say = log_interval, say
        self.total, self.steps = 0.0, 0

    def add(self, step: int, n: float) -> None:
        self.total, self.steps = self.total + n, self.steps + 1

    def __call__(self, step: int, state, metrics) -> bool:
        if step % self.log_interval == 0 and self.steps:
            self.say(
                f"step {step}: {self.total:,.0f} masked tokens learned in this"
                f" process's {self.steps} steps ({self.total / self.steps:,.1f} per step)"
            )
        return False

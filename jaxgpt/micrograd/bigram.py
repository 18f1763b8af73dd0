"""A bigram character model trained with the numpy tensor engine.

    python -m jaxgpt.micrograd.bigram [--steps=2000 --data_path=path/to/input.txt]

The same model and recipe as the core's `--model=bigram`: a V x V table,
initialised N(0, 0.02), whose row for token t holds the logits of the next
token; sorted-character vocabulary; first 90% of the corpus for training;
batches of random windows; mean cross-entropy; AdamW (b1=0.9, b2=0.99,
eps=1e-8) at a constant learning rate. Only the gradients come from
`jaxgpt.micrograd.tensor` instead of jax.grad.

The corpus, vocabulary, split and batches are jaxgpt's own (jaxgpt.data and
jaxgpt.tokenizer, which need numpy only): --data_path, else $JAXGPT_DATA_DIR,
the cache, or a download.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np

from jaxgpt import data, tokenizer
from jaxgpt.datasets import prepare
from jaxgpt.micrograd.optim import AdamW
from jaxgpt.micrograd.tensor import Tensor, cross_entropy, embedding, no_grad
from jaxgpt.run import errors


def load_corpus(data_path: str | None = None) -> str:
    """The training text: --data_path, else jaxgpt's own finder (see jaxgpt.data)."""
    try:
        return prepare.load_text(data_path)
    except data.DataError as e:
        raise SystemExit(errors.one_line(e)) from e


def encode(text: str) -> tuple[str, np.ndarray]:
    """jaxgpt's character vocabulary (sorted distinct characters) and the token ids."""
    tok = tokenizer.CharTokenizer.train(text)
    return tok.vocab, tok.encode(text)


def loss_fn(table: Tensor, x_BT: np.ndarray, y_BT: np.ndarray) -> Tensor:
    """Mean cross-entropy of the next-token logits table[x] against y."""
    return cross_entropy(embedding(table, x_BT), y_BT)


def estimate_loss(
    table: Tensor, splits: dict[str, np.ndarray], args: argparse.Namespace
) -> dict[str, float]:
    """Mean loss over `eval_iters` batches of each split (the same ones every time)."""
    out = {}
    with no_grad():
        for name, tokens in splits.items():
            rng = np.random.default_rng([args.seed, 1])
            losses = [
                loss_fn(
                    table,
                    *data.get_batch(tokens, rng, args.batch_size, args.block_size),
                ).item()
                for _ in range(args.eval_iters)
            ]
            out[name] = float(np.mean(losses))
    return out


def train(
    text: str, args: argparse.Namespace, log=print
) -> tuple[Tensor, dict[str, float]]:
    """Trains the bigram table on `text`; returns it and the final train/val losses."""
    vocab, tokens = encode(text)
    splits = dict(zip(("train", "val"), data.split(tokens)))
    for name, part in splits.items():
        try:
            data.check_long_enough(len(part), args.block_size, f"{name} split")
        except data.DataError as e:
            raise SystemExit(errors.one_line(e)) from e
    rng = np.random.default_rng(args.seed)
    V = len(vocab)
    table = Tensor(rng.normal(0.0, 0.02, size=(V, V)))
    opt = AdamW(
        [table],
        lr=args.learning_rate,
        b1=0.9,
        b2=0.99,
        eps=1e-8,
        weight_decay=args.weight_decay,
    )
    log(f"{len(tokens):,} tokens, vocabulary of {V}, {V * V:,} parameters")
    start = time.perf_counter()
    losses = {}
    for step in range(args.steps + 1):
        if step % args.eval_interval == 0 or step == args.steps:
            losses = estimate_loss(table, splits, args)
            log(
                f"step {step:5d}  train loss {losses['train']:.4f}"
                f"  val loss {losses['val']:.4f}"
                f"  ({time.perf_counter() - start:.1f} s)"
            )
        if step == args.steps:
            break
        x_BT, y_BT = data.get_batch(
            splits["train"], rng, args.batch_size, args.block_size
        )
        loss = loss_fn(table, x_BT, y_BT)
        opt.zero_grad()
        loss.backward()
        opt.step()
    log(
        f"final: train loss {losses['train']:.4f}, val loss {losses['val']:.4f},"
        f" {args.steps} steps in {time.perf_counter() - start:.1f} s"
    )
    return table, losses


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = errors.ArgumentParser(
        prog="python -m jaxgpt.micrograd.bigram",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=2000, help="Training steps.")
    p.add_argument("--batch_size", type=int, default=32, help="Sequences per step.")
    p.add_argument("--block_size", type=int, default=8, help="Characters per sequence.")
    p.add_argument(
        "--learning_rate", type=float, default=1e-2, help="Constant AdamW rate."
    )
    p.add_argument(
        "--weight_decay", type=float, default=0.0, help="AdamW weight decay."
    )
    p.add_argument(
        "--eval_iters", type=int, default=50, help="Batches per loss estimate."
    )
    p.add_argument(
        "--eval_interval", type=int, default=500, help="Steps between estimates."
    )
    p.add_argument("--seed", type=int, default=1337, help="Seed of init and batches.")
    p.add_argument("--data_path", default=None, help="The corpus (a text file).")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "block_size", "eval_iters", "eval_interval"):
        if getattr(args, name) <= 0:
            p.error(f"--{name}={getattr(args, name)} must be positive.")
    if args.learning_rate <= 0 or args.weight_decay < 0:
        p.error("--learning_rate must be positive and --weight_decay >= 0.")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    train(load_corpus(args.data_path), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

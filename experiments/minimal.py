"""The smallest complete jaxgpt program: text -> tokens -> batches -> a GPT
trained by the one compiled step -> a sample. Only the core, on one device.

  python experiments/minimal.py                       # tiny shakespeare
  python experiments/minimal.py input.txt --steps 50  # any text file

The text comes from the path given, else $JAXGPT_DATA_DIR/tinyshakespeare/
input.txt, else ../shared/data/tinyshakespeare/input.txt. The model and its
training are the CPU recipe's (experiments/shakespeare_cpu.cfg), shortened.
"""

import argparse
import os
import sys
from pathlib import Path

from jaxgpt import data, generate, lecture, tokenizer, train
from jaxgpt.config import ModelConfig, TrainConfig


def corpus_path(given: str | None) -> Path:
    """The text to train on: `given`, else tiny shakespeare where jaxgpt keeps it."""
    if given:
        return Path(given)
    base = os.environ.get("JAXGPT_DATA_DIR", "../shared/data")
    return Path(base) / "tinyshakespeare" / "input.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", nargs="?", help="a UTF-8 text file to train on")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    args = parser.parse_args()
    path = corpus_path(args.path)
    if not path.is_file():
        sys.exit(f"error: no text at {path}: pass a text file's path.")
    if args.steps < 1:
        sys.exit(f"error: --steps={args.steps}: train for at least 1 step.")
    text = path.read_text(encoding="utf-8")

    # Characters -> token ids; the first 90% to train on, the rest to validate.
    tok = tokenizer.CharTokenizer.train(text)
    train_ids, val_ids = data.split(tok.encode(text))

    model_cfg = ModelConfig(
        vocab_size=tok.vocab_size, block_size=64, n_layer=4, n_head=4, n_embd=128,
        bias=False, dropout=0.0,
    )  # fmt: skip
    train_cfg = TrainConfig(
        batch_size=12, max_iters=args.steps, learning_rate=2e-3, min_lr=1e-4,
        warmup_iters=min(100, args.steps // 10), beta2=0.99, eval_iters=20,
    )  # fmt: skip

    # Every random choice comes from one root key: parameters, batches, samples.
    root = train.root_key(1337)
    state = train.create_state(model_cfg, train_cfg, root)  # Params + AdamW's moments.
    step = train.make_train_step(model_cfg, train_cfg)  # One compiled update.
    batch = train.make_batches(train_ids, root, train_cfg.batch_size, 64)
    splits = {"train": train_ids, "val": val_ids}
    evaluate = train.make_evaluate(model_cfg, train_cfg, splits, root)

    for s in range(args.steps + 1):
        if s % max(1, args.steps // 4) == 0 or s == args.steps:
            # The mean loss of 20 fixed batches of each split: estimate_loss.
            train_loss, val_loss = evaluate(state.params).values()
            print(f"step {s}: train {train_loss:.4f}, val {val_loss:.4f}")
        if s < args.steps:
            x_BT, y_BT = batch(s)  # Random windows of the text, drawn for step s.
            state, _ = step(state, x_BT, y_BT, root)

    # 300 characters after a newline, drawn with temperature 0.8 and top-k 200.
    apply_fn, key = lecture.make_model(model_cfg).apply, train.stream(root, "sample")
    ids_BA = generate.sample(apply_fn, state.params, model_cfg, tok.encode("\n"), key,
                             max_new_tokens=300, temperature=0.8, top_k=200)  # fmt: skip
    print(tok.decode(ids_BA[0]))


if __name__ == "__main__":
    main()

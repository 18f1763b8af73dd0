"""A generated chat task with an exact answer, to measure what fine-tuning taught.

  python -m jaxgpt.datasets.chat_tasks --out=data/chat_tasks --n_train=10000 --n_test=500 --seed=0

In the spirit of nanochat's SpellingBee and simple arithmetic: spell a word
letter by letter ("c a t"), count a letter in a word, add two numbers below
100, reverse a short string. Words are random lowercase strings, so a model
must follow the letters, not remember a dictionary. One user turn, one
assistant turn (the answer), written as conversation `.jsonl` files
(conversations.py) with the task, its arguments and the answer beside the
messages. The test split is the first n_test distinct prompts drawn from the
seed, the train split the next n_train: disjoint, and the test split is the
same whatever n_train is. `score` is exact match after normalising whitespace.
"""

from __future__ import annotations

import random
import string
import sys
from pathlib import Path
from typing import Any

from jaxgpt.datasets.conversations import ConversationError, write_conversations
from jaxgpt.run import errors

TASKS = ("spell", "count", "add", "reverse")
PHRASINGS = {
    "spell": ("Spell the word {0} letter by letter.", "How do you spell '{0}'?"),
    "count": (
        "How many times does the letter {1} appear in {0}?",
        "Count the letter '{1}' in '{0}'.",
    ),
    "add": ("What is {0} + {1}?", "Add {0} and {1}."),
    "reverse": ("Reverse the string {0}.", "Write '{0}' backwards."),
}


def word(rng: random.Random, low: int = 3, high: int = 8) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(low, high)))


def draw_args(task: str, rng: random.Random) -> list:
    """A task's arguments, drawn from rng."""
    if task == "spell":
        return [word(rng)]
    if task == "count":
        w = word(rng)  # Two times in three a letter of the word; else any.
        letter = (
            rng.choice(w)
            if rng.random() < 2 / 3
            else rng.choice(string.ascii_lowercase)
        )
        return [w, letter]
    if task == "add":
        return [rng.randrange(100), rng.randrange(100)]
    return [word(rng, 3, 7)]


def answer(task: str, args: list) -> str:
    """The one right reply."""
    if task == "spell":
        return " ".join(args[0])
    if task == "count":
        return str(args[0].count(args[1]))
    if task == "add":
        return str(args[0] + args[1])
    return args[0][::-1]


def make_record(task: str, args: list, phrasing: int) -> dict[str, Any]:
    """One conversation: the prompt, the answer; task, args and answer beside."""
    reply = answer(task, args)
    prompt = PHRASINGS[task][phrasing].format(*args)
    messages = [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": reply},
    ]
    return {"messages": messages, "task": task, "args": args, "answer": reply}


def make_splits(
    n_train: int, n_test: int, seed: int, tasks: tuple[str, ...] = TASKS
) -> tuple[list[dict], list[dict]]:
    """(train, test) records: n_test + n_train distinct (task, arguments) drawn
    from `seed`, the test split first."""
    if unknown := sorted(set(tasks) - set(TASKS)):
        raise ValueError(f"unknown tasks {unknown}: choose from {', '.join(TASKS)}.")
    if n_train < 0 or n_test < 1 or not tasks:
        raise ValueError("n_test must be at least 1, n_train at least 0, with a task.")
    rng, seen, records = random.Random(seed), set(), []
    n, tries = n_train + n_test, 0
    while len(records) < n:
        tries += 1
        if tries > 100 * n:
            raise ValueError(
                f"cannot draw {n} distinct prompts from tasks {', '.join(tasks)}:"
                " ask for fewer, or add tasks."
            )
        task = rng.choice(tasks)
        args = draw_args(task, rng)
        phrasing = rng.randrange(len(PHRASINGS[task]))
        if (task, *args) in seen:
            continue
        seen.add((task, *args))
        records.append(make_record(task, args, phrasing))
    return records[n_test:], records[:n_test]


def normalize(text: str) -> str:
    return " ".join(text.split())


def score(prediction: str, answer: str) -> bool:
    """Exact match, whitespace normalised (runs of it are one space, ends trimmed)."""
    return normalize(prediction) == normalize(answer)


def main(argv: list[str] | None = None) -> None:
    parser = errors.ArgumentParser(
        prog="python -m jaxgpt.datasets.chat_tasks", description=__doc__
    )
    parser.add_argument(
        "--out", required=True, help="folder for train.jsonl, test.jsonl"
    )
    parser.add_argument("--n_train", type=int, default=10_000)
    parser.add_argument("--n_test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated")
    flags = parser.parse_args(argv)
    out = Path(flags.out)
    files = [out / "train.jsonl", out / "test.jsonl"]
    if existing := [str(f) for f in files if f.exists()]:
        sys.exit(
            errors.one_line(
                f"{out} already holds {', '.join(existing)}: choose another --out,"
                " or move them away first."
            )
        )
    try:
        tasks = tuple(t.strip() for t in flags.tasks.split(",") if t.strip())
        train, test = make_splits(flags.n_train, flags.n_test, flags.seed, tasks)
        out.mkdir(parents=True, exist_ok=True)
        for file, records in zip(files, (train, test), strict=True):
            write_conversations(file, records)
    except (ValueError, ConversationError) as e:
        sys.exit(errors.one_line(e))
    except OSError as e:
        e.filename = e.filename or str(out)
        sys.exit(errors.file_error_line(e, "write", "choose another --out"))
    print(f"wrote {len(train)} train and {len(test)} test conversations to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Tokenizer speed: our BPE trainer and encoders beside tiktoken and HF tokenizers.

  python benchmarks/tokenizer.py                          # tiny shakespeare, 100 MB
  python benchmarks/tokenizer.py --text=PATH --mb=100 --vocab_size=32768

Three measurements, each run side by side in this one process:

1. Training on the --text corpus (tiny shakespeare by default) to
   --small_vocab_size ids.
2. Training on --mb megabytes to --vocab_size ids. A --text that short is
   grown into a varied corpus first (`varied_text`): its lines drawn at
   random, with invented words and numbers mixed in, so that the large text
   has a long tail of distinct words as real text does, rather than the same
   chunks repeated.
3. Encoding --encode_mb megabytes of that text on one thread: our pure-Python
   encoder (`jaxgpt.tokenizer.encode`), tiktoken with our merges and with GPT-2's,
   and HF tokenizers with the vocabulary it trained (also with encode_batch
   on all cores).

Both trainers split text with GPT-2's pattern (HF's ByteLevel pre-tokenizer
uses it) unless --pattern=gpt4, start from the 256 bytes and reserve
<|endoftext|>. HF's trainer uses every core (rayon); ours counts chunks in a
process pool and merges on one core.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import time

import numpy as np
from absl import app, flags

from jaxgpt import tokenizer
from jaxgpt.datasets import prepare, tokenizer_train
from jaxgpt.hub import tokenizer_io
from jaxgpt.hub.tokenizer_io import load_gpt2
from jaxgpt.run import perf

_TEXT = flags.DEFINE_string("text", None, "Base corpus (default: tiny shakespeare).")
_MB = flags.DEFINE_float("mb", 100, "Size of the large training text, in MB.")
_VOCAB = flags.DEFINE_integer("vocab_size", 32768, "Vocabulary of the large run.")
_SMALL_VOCAB = flags.DEFINE_integer(
    "small_vocab_size", 4096, "Vocabulary for the base text (0: skip that run)."
)
_ENCODE_MB = flags.DEFINE_float("encode_mb", 20, "MB of the large text to encode.")
_PATTERN = flags.DEFINE_enum("pattern", "gpt2", ["gpt2", "gpt4"], "Pre-tokeniser.")
_WORKERS = flags.DEFINE_integer("num_workers", None, "Counting processes (all cores).")
_SKIP_HF = flags.DEFINE_bool("skip_hf", False, "Leave HF tokenizers out.")


def varied_text(base: str, n_chars: int, seed: int = 0) -> str:
    """About `n_chars` of text in `base`'s style, with a long tail of new words.

    Lines of `base` are drawn at random; in about a third of them one word is
    replaced by an invented word, drawn from 1M samples of a character trigram
    model of `base`'s words (so short, likely words recur and long ones are
    rare, as in real text), and one line in twenty gains a number below a
    million. Deterministic in `seed`.
    """
    rng = np.random.default_rng(seed)
    lines = [line for line in base.split("\n") if line.strip()]
    pool = invented_words(base, 1_000_000, rng)
    out, size = [], 0
    while size < n_chars:
        for i, u, k, z, num in zip(
            rng.integers(len(lines), size=100_000),
            rng.random(100_000),
            rng.integers(0, 1 << 30, size=100_000),
            rng.integers(len(pool), size=100_000),
            rng.integers(0, 1_000_000, size=100_000),
        ):
            line = lines[i]
            if u < 0.33:  # swap one word for an invented one
                words = line.split(" ")
                words[k % len(words)] = pool[z]
                line = " ".join(words)
            elif u > 0.95:
                line = f"{line} {num}"
            out.append(line)
            size += len(line) + 1
            if size >= n_chars:
                break
    return "\n".join(out)


def invented_words(base: str, n: int, rng: np.random.Generator) -> list[str]:
    """`n` pseudo-words from a character trigram model of `base`'s words."""
    words = re.findall(r"[A-Za-z]+", base)
    nexts: dict[str, list[str]] = {}
    for w in words:
        padded = "^^" + w.lower() + "$"
        for a, b, c in zip(padded, padded[1:], padded[2:]):
            nexts.setdefault(a + b, []).append(c)
    out = []
    for r in rng.random((n, 16)):
        ctx, word = "^^", ""
        for x in r:
            c = nexts[ctx][int(x * len(nexts[ctx]))]
            if c == "$":
                break
            word, ctx = word + c, ctx[1] + c
        out.append(word.capitalize() if r[0] < 0.2 else word or "a")
    return out


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def train_ours(text: str, vocab_size: int, pattern: str) -> tuple[tokenizer.BPE, dict]:
    """Our trainer, with its two phases timed apart."""
    specials = (tokenizer.ENDOFTEXT,)
    counts, t_count = timed(
        tokenizer_train.count_chunks, text, pattern, specials, _WORKERS.value
    )
    num_merges = vocab_size - 256 - len(specials)
    merges, t_merge = timed(tokenizer_train.learn_merges, counts, num_merges)
    ids = {s: 256 + len(merges) + j for j, s in enumerate(specials)}
    tok = tokenizer.BPE(tuple(merges), pattern, ids)
    return tok, {"count": t_count, "merge": t_merge, "distinct": len(counts)}


def train_hf(text: str, vocab_size: int):
    """HF tokenizers' BPE trainer with the ByteLevel pre-tokenizer (GPT-2's split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[tokenizer.ENDOFTEXT],
        show_progress=False,
    )
    pieces = tokenizer_train.split_at_safe_points(text, max(1, len(text) // 1_000_000))
    tok.train_from_iterator(pieces, trainer)
    return tok


def training_row(what: str, text: str, vocab_size: int, pattern: str, target_s):
    """Trains ours and HF's on `text`; prints a row each and returns ours."""
    mb = len(text.encode("utf-8")) / 1e6
    tok, t = train_ours(text, vocab_size, pattern)
    total = t["count"] + t["merge"]
    verdict = "" if target_s is None else f" (target <= {target_s:.0f} s)"
    print(
        f"| {what} | {mb:.1f} MB | {vocab_size} | ours | {total:.1f} s{verdict} |"
        f" count {t['count']:.1f} s ({t['distinct']:,} distinct chunks),"
        f" merges {t['merge']:.1f} s |",
        flush=True,
    )
    if not _SKIP_HF.value:
        hf, t_hf = timed(train_hf, text, vocab_size)
        print(
            f"| {what} | {mb:.1f} MB | {vocab_size} | HF tokenizers | {t_hf:.1f} s |"
            f" vocabulary {hf.get_vocab_size()} |",
            flush=True,
        )
    return tok, (None if _SKIP_HF.value else hf)


def pieces(text: str) -> list[str]:
    """`text` cut at chunk boundaries into pieces of about 100 kB."""
    return tokenizer_train.split_at_safe_points(text, max(1, len(text) // 100_000))


def encoding_rows(text: str, ours: tokenizer.BPE, hf) -> None:
    """MB/s of each encoder on the same text, one thread each."""
    mb = len(text.encode("utf-8")) / 1e6
    encoders = {
        "ours, pure Python (chunk cache)": lambda t: tokenizer.encode(t, ours),
        "tiktoken, our merges": tokenizer_io.to_tiktoken(ours).encode_ordinary,
        "tiktoken, GPT-2's merges": load_gpt2().encoding.encode_ordinary,
    }
    if hf is not None:  # fed 100 kB pieces: one huge string is far slower in HF
        encoders["HF tokenizers, its merges"] = lambda t: [
            i for piece in pieces(t) for i in hf.encode(piece).ids
        ]
        encoders["HF tokenizers, encode_batch (all cores)"] = lambda t: [
            i for enc in hf.encode_batch(pieces(t)) for i in enc.ids
        ]
    for name, encode in encoders.items():
        ids, seconds = timed(encode, text)
        print(
            f"| {name} | {mb / seconds:.1f} MB/s | {len(ids):,} tokens"
            f" ({len(text) / len(ids):.2f} chars/token) |",
            flush=True,
        )


def main(argv):
    del argv
    pattern = (
        tokenizer_io.GPT2_PATTERN
        if _PATTERN.value == "gpt2"
        else tokenizer.GPT4_PATTERN
    )
    base_path = prepare.find_corpus(_TEXT.value)
    base = base_path.read_text(encoding="utf-8")
    print(
        f"{datetime.date.today()}, {perf.cpu_name()}, {os.cpu_count()} cores,"
        f" Python {platform.python_version()}; pattern {_PATTERN.value};"
        f" base text {base_path} ({len(base) / 1e6:.1f} MB)"
    )
    print("| text | size | vocab | trainer | time | notes |")
    print("|---|---:|---:|---|---:|---|")
    if _SMALL_VOCAB.value:
        training_row("base", base, _SMALL_VOCAB.value, pattern, target_s=10)

    n_chars = int(_MB.value * 1e6)
    if len(base) >= n_chars:
        big, t_gen = base[:n_chars], 0.0
    else:
        big, t_gen = timed(varied_text, base, n_chars)
    what = "varied" if t_gen else "base"
    print(f"(large text: {what}, built in {t_gen:.1f} s)", flush=True)
    ours, hf = training_row(what, big, _VOCAB.value, pattern, target_s=180)

    sample = big[: int(_ENCODE_MB.value * 1e6)]
    print(f"\nEncoding {len(sample) / 1e6:.1f} MB of the large text, one thread:")
    print("| encoder | speed | tokens |")
    print("|---|---:|---:|")
    encoding_rows(sample, ours, hf)


if __name__ == "__main__":
    app.run(main)

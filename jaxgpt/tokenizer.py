"""Character-level tokenizer: the vocabulary is the sorted distinct characters.

A vocabulary is just a string (`vocab[i]` is the character with id i), so it
is trivially saved beside a checkpoint as JSON and reloaded for sampling.
"""

from __future__ import annotations

import numpy as np


def build_vocab(text: str) -> str:
    """Returns the sorted distinct characters of `text`; id i is `vocab[i]`."""
    if not text:
        raise ValueError("cannot build a vocabulary from empty text.")
    return "".join(sorted(set(text)))


def encode(text: str, vocab: str) -> np.ndarray:
    """Maps each character to its id: int32 array of shape [len(text)].

    Raises ValueError naming every character that is not in the vocabulary.
    """
    stoi = {ch: i for i, ch in enumerate(vocab)}
    unknown = sorted(set(text) - stoi.keys())
    if unknown:
        shown = ", ".join(repr(ch) for ch in unknown[:20])
        more = f" (and {len(unknown) - 20} more)" if len(unknown) > 20 else ""
        raise ValueError(
            f"{len(unknown)} character(s) not in the vocabulary: {shown}{more}."
            " Use only characters that occur in the training corpus."
        )
    return np.fromiter((stoi[ch] for ch in text), dtype=np.int32, count=len(text))


def decode(ids, vocab: str) -> str:
    """Maps ids (any int sequence or array) back to text."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= len(vocab)):
        raise ValueError(
            f"token ids must lie in [0, {len(vocab)}); got {ids.min()}..{ids.max()}."
        )
    return "".join(vocab[i] for i in ids.tolist())

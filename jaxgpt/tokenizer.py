"""Tokenizers: text <-> int32 ids, characters and byte-level BPE.

- `CharTokenizer` ("char"): one id per distinct character of the corpus.
- `BPE`, `encode`, `decode`: byte-level BPE as in Karpathy's minbpe lecture:
  the 256 bytes are ids 0..255; a regex cuts text into chunks (words, numbers,
  punctuation, spaces) that merges never cross; encoding applies the learned
  merges (datasets/tokenizer_train.py learns them) in the order they were
  learned. Special tokens (<|endoftext|>) come after the merges, only where
  allowed. GPT-2's holds OpenAI's 50,000 merges.

Runs encode with tiktoken's Rust encoder built from the same merges, which
gives the same ids (tested): hub/tokenizer_io.BPETokenizer ("bpe", "gpt2").
Each tokenizer saves itself as a small JSON dict (`to_json`) that
tokenizer_io.py reads back.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from itertools import pairwise
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np
import regex


@runtime_checkable
class Tokenizer(Protocol):
    """The interface: name (the kind to_json saves), vocab_size, encode (text
    -> int32 ids [n_tokens], as the tokenizer encodes a text by default),
    decode, to_json; bos_id and eos_id, the ids that begin and end a text
    (None where it has none)."""

    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> np.ndarray: ...
    def decode(self, ids) -> str: ...
    def to_json(self) -> dict: ...


# --- Characters ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """One id per character: `vocab[i]` is the character with id i."""

    vocab: str
    name: ClassVar[str] = "char"
    bos_id: ClassVar[None] = None  # Every character is text.
    eos_id: ClassVar[None] = None

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        """The vocabulary of `text`: its sorted distinct characters."""
        if not text:
            raise ValueError("cannot build a vocabulary from empty text.")
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @functools.cached_property
    def stoi(self) -> dict[str, int]:
        return {ch: i for i, ch in enumerate(self.vocab)}

    def encode(self, text: str) -> np.ndarray:
        """int32 ids, shape [len(text)]; ValueError names every unknown character."""
        if unknown := sorted(set(text) - self.stoi.keys()):
            shown = ", ".join(repr(ch) for ch in unknown[:20])
            more = f" (and {len(unknown) - 20} more)" if len(unknown) > 20 else ""
            raise ValueError(
                f"{len(unknown)} character(s) not in the vocabulary: {shown}{more}."
                " Use only characters that occur in the training corpus."
            )
        return np.fromiter(map(self.stoi.__getitem__, text), np.int32, len(text))

    def decode(self, ids) -> str:
        return "".join(self.vocab[i] for i in check_ids(ids, self.vocab_size))

    def to_json(self) -> dict:
        return {"name": self.name, "vocab": self.vocab}


def check_ids(ids, vocab_size: int) -> list[int]:
    """ids as a flat list, checked to lie in [0, vocab_size)."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}); got {ids.min()}..{ids.max()}."
        )
    return ids.tolist()


# --- Byte-level BPE: the tokenizer as data -----------------------------------------

# GPT-4's split (cl100k_base): case-insensitive contractions, a letter run may
# start with one symbol, numbers of at most three digits, newlines apart.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"""
    r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
ENDOFTEXT = "<|endoftext|>"
IDENTITY_BYTES = tuple(range(256))
Pair = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class BPE:
    """A byte-level BPE as plain data: merges[i] = (a, b) replaces adjacent ids
    a, b by id 256 + i (earlier merges first); byte_ids[v] is the id of byte v
    (a permutation for GPT-2, whose files number printable bytes first)."""

    merges: tuple[Pair, ...]
    pattern: str = GPT4_PATTERN
    special_tokens: Mapping[str, int] = dataclasses.field(default_factory=dict)
    byte_ids: tuple[int, ...] = IDENTITY_BYTES

    @property
    def vocab_size(self) -> int:
        """Bytes, merges and special tokens: the largest id + 1."""
        return max([255 + len(self.merges), *self.special_tokens.values()]) + 1

    @functools.cached_property
    def ranks(self) -> dict[Pair, int]:
        """pair -> the id it merges into (a smaller id is an earlier merge)."""
        return {pair: 256 + i for i, pair in enumerate(self.merges)}

    @functools.cached_property
    def vocab(self) -> dict[int, bytes]:
        """id -> the bytes it stands for (special tokens as their UTF-8)."""
        vocab = {i: bytes([v]) for v, i in enumerate(self.byte_ids)}
        for i, (a, b) in enumerate(self.merges):
            vocab[256 + i] = vocab[a] + vocab[b]
        return vocab | {i: s.encode() for s, i in self.special_tokens.items()}

    def to_json(self) -> dict:
        d = {
            "merges": [list(pair) for pair in self.merges],
            "pattern": self.pattern,
            "special_tokens": dict(self.special_tokens),
        }
        return d | (
            {"byte_ids": list(self.byte_ids)} if self.byte_ids != IDENTITY_BYTES else {}
        )


def split_special(text: str, specials: Iterable[str]) -> list[tuple[str, bool]]:
    """`text` cut around the special-token strings: [(piece, is_special), ...]."""
    specials = sorted(set(specials), key=len, reverse=True)  # Longest first.
    if not specials:
        return [(text, False)]
    parts = regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text)
    return [(part, i % 2 == 1) for i, part in enumerate(parts) if part]


# --- Encoding and decoding ---------------------------------------------------------


def merge(ids: list[int], pair: Pair, new_id: int) -> list[int]:
    """Replaces each occurrence of `pair` in `ids`, left to right, by `new_id`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def encode_chunk(data: bytes, bpe: BPE) -> list[int]:
    """One chunk: its bytes, then the earliest-learned merge present, repeatedly."""
    ids, ranks = [bpe.byte_ids[v] for v in data], bpe.ranks
    while len(ids) >= 2:
        pair = min(pairwise(ids), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break
        ids = merge(ids, pair, ranks[pair])
    return ids


def encode(text: str, bpe: BPE, allowed_special: Iterable[str] | str = ()) -> list[int]:
    """`text` as ids; special-token strings become their id only where allowed
    (a set, or "all"). Each distinct chunk is merged once per call."""
    allowed = set(bpe.special_tokens if allowed_special == "all" else allowed_special)
    if unknown := allowed - bpe.special_tokens.keys():
        raise ValueError(f"not special tokens of this tokenizer: {sorted(unknown)}")
    ids, cache, chunks = [], {}, regex.compile(bpe.pattern)
    for part, is_special in split_special(text, allowed):
        if is_special:
            ids.append(bpe.special_tokens[part])
            continue
        for chunk in chunks.findall(part):
            if chunk not in cache:  # (Text decoded with surrogateescape: any bytes.)
                cache[chunk] = encode_chunk(
                    chunk.encode("utf-8", "surrogateescape"), bpe
                )
            ids.extend(cache[chunk])
    return ids


def decode(ids: Iterable[int], bpe: BPE) -> str:
    """Text; bytes that are not valid UTF-8 (a sample cut inside a character)
    become U+FFFD rather than an error."""
    try:
        data = b"".join(bpe.vocab[i] for i in ids)
    except KeyError as err:
        raise ValueError(
            f"token id {err.args[0]} is not in this tokenizer's vocabulary"
            f" (size {bpe.vocab_size})."
        ) from None
    return data.decode("utf-8", errors="replace")

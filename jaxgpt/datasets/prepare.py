"""Datasets as token files: <data_dir>/<name>/{train.bin, val.bin, meta.json}.

  python -m jaxgpt.datasets.prepare --dataset=shakespeare_char     # tiny shakespeare, characters
  python -m jaxgpt.datasets.prepare --dataset=shakespeare          # tiny shakespeare, GPT-2 BPE
  python -m jaxgpt.datasets.prepare --dataset=openwebtext          # Hugging Face datasets, streamed
  python -m jaxgpt.datasets.prepare --dataset=fineweb_edu --max_documents=100000
  python -m jaxgpt.datasets.prepare --dataset=notes --data_path=notes/ --tokenizer=bpe:4096
  python -m jaxgpt.datasets.prepare --dataset=chat --data_path=chats.jsonl --tokenizer=gpt2 --block_size=256

nanoGPT's layout: train.bin and val.bin hold the token ids back to back,
uint16 when the vocabulary fits in 16 bits, else uint32, so nanoGPT's own
prepared files work too; meta.json names the tokenizer (its JSON, so sampling
needs nothing else), the dtype, the token and byte counts of each split, and
the source with its sha256. Training reads only the windows of each batch from
the files (token_file.TokenFile), so a corpus never has to fit in memory.

Documents end with <|endoftext|> under a BPE tokenizer. A single text (tiny
shakespeare, one file) is split 90/10 by characters; a collection of
documents sends every k-th one to validation. Tokenising runs on all cores
(a process pool).

Conversations (.jsonl files of {"messages": [...]} lines, or a Hub chat
dataset such as smol_smoltalk) are prepared as rows for supervised
fine-tuning (prepare_chat): every line is checked first, each conversation
rendered by a chat template (jaxgpt's chat tokens added to a char, bpe or
gpt2 tokenizer; a Hugging Face model folder's own template), shuffled,
every k-th sent to validation, and packed into rows of --block_size + 1
tokens: train.bin holds the rows back to back, train_mask.bin (uint8) the
loss mask of each token and train_segments.bin each token's conversation
number within its row (0: padding); the same for val.

A collection of fewer than k documents sends its last one to validation,
and a preparation that leaves a split without tokens is refused: training
needs both.

meta.json records a sha256 of each 16 MiB chunk of each token file; opening a
dataset verifies files up to 1 GiB whole, larger ones in 64 evenly spaced
chunks. A local source up to 256 MiB is hashed again each time its dataset is
opened (its path, size and modification time may stay the same while its
text changes); a larger one is known by those alone.

A dataset appears whole or not at all. Every file is written under a
temporary name (`.train.bin.tmp-<pid>`) and renamed when complete; before the
first rename, the marker `.preparing` is written (and an older meta.json
deleted), and it is removed after meta.json is written, last. A folder with
the marker is not prepared (a killed preparation: it is prepared again), nor
is one without meta.json unless it is nanoGPT's own. Temporary files of dead
processes are deleted when the folder is next used. Opening a dataset checks
meta.json and each file against it, and every token id against the
vocabulary (`check_ids`). Ctrl-C (or SIGTERM) ends a preparation with one
line and exit status 130 (143), its unfinished files deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import pickle
import re
import signal
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxgpt import data, tokenizer
from jaxgpt.config import ConfigError, ModelConfig
from jaxgpt.datasets import tokenizer_train
from jaxgpt.datasets.token_file import TokenFile
from jaxgpt.hub import tokenizer_io
from jaxgpt.run import cache, workdir
from jaxgpt.run.configs import DataConfig, check_tokenizer_spec, unknown_tokenizer


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Where a named dataset's text comes from, and how it is tokenised."""

    tokenizer: str  # "char", "gpt2", "bpe:<vocab size>" or a tokenizer .json.
    hf: tuple[str, str | None] | None = None  # (path, config) on the Hub; None: local.
    val_every: int = 10  # Every val_every-th document goes to validation.
    about: str = ""
    files: tuple[Path, ...] = ()  # The local text's files (set by recipe_of).
    chat: bool = False  # Conversations, prepared as rows (prepare_chat).


DATASETS = {
    "shakespeare_char": Recipe("char", about="tiny shakespeare, one id per character"),
    "shakespeare": Recipe("gpt2", about="tiny shakespeare, GPT-2's BPE"),
    "openwebtext": Recipe(
        "gpt2",
        hf=("Skylion007/openwebtext", None),
        val_every=2000,
        about="OpenWebText (8M web pages, 9B GPT-2 tokens)",
    ),
    "fineweb_edu": Recipe(
        "gpt2",
        hf=("HuggingFaceFW/fineweb-edu", "sample-10BT"),
        val_every=1000,
        about="FineWeb-Edu's 10B-token sample",
    ),
    "smol_smoltalk": Recipe(
        "gpt2",
        hf=("HuggingFaceTB/smol-smoltalk", None),
        about="SmolTalk's conversations for small models (460k)",
        chat=True,
    ),
}
BPE_TRAIN_CHARS = 100_000_000  # Our BPE learns its merges from this much text.
PREPARING = ".preparing"  # In a dataset's folder while its files are replaced.
TMP_NAME = re.compile(r"\..+\.tmp-(\d+)")  # Temporary files, with their pid.
DTYPES = ("uint16", "uint32")  # Of token files.
# Token files up to this size have every id checked, larger ones 64 windows.
SCAN_BYTES = 2**30
CHUNK_BYTES = 2**24  # Token files have a sha256 per chunk of this size...
VERIFY_BYTES = 2**30  # ... all checked up to this size, else VERIFY_CHUNKS of them.
VERIFY_CHUNKS = 64
SOURCE_HASH_BYTES = 2**28  # Local text up to this size is hashed at each opening.
DEFAULT_BLOCK_SIZE = ModelConfig.block_size  # Rows of a chat dataset, if not given.
ROW_FILES = {"mask": "uint8"}  # Beside a chat dataset's rows: <split>_<name>.bin.
CHAT_SHUFFLE_SEED = 0  # Conversations are shuffled once, the same for every run.


# --- Reading prepared datasets -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A prepared dataset: its tokenizer, splits (TokenFile) and meta."""

    tokenizer: Any
    splits: dict[str, TokenFile]  # "train", "val": their token files.
    meta: dict[str, Any]
    # A chat dataset's rows: {"train": {"mask": ..., "segments": ...}, "val": ...}.
    rows: dict[str, dict[str, TokenFile]] = dataclasses.field(default_factory=dict)

    @property
    def block_size(self) -> int | None:
        """The rows' block_size (rows hold block_size + 1 tokens); None: text."""
        return self.meta.get("block_size") if self.rows else None


def again(folder: Path) -> str:
    """How to prepare the dataset of `folder` again (the fix of its damage)."""
    return (
        f"prepare it again (python -m jaxgpt.datasets.prepare --dataset={folder.name}"
        f" --data_dir={folder.parent}, with the --data_path it was made from)"
    )


def read_meta(folder: Path) -> dict[str, Any]:
    """<folder>/meta.json, checked to be what `prepare` writes (DataError if not)."""
    path = folder / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        problem = f"is not JSON ({e})"
    else:
        problem = meta_problem(meta)
    if problem:
        raise data.DataError(f"{path} {problem}: it is damaged; {again(folder)}.")
    return meta


def meta_problem(meta: Any) -> str | None:
    """What is wrong with a dataset's meta, or None."""
    if not isinstance(meta, dict):
        return f"is a JSON {type(meta).__name__}, not an object"
    for key in ("train_tokens", "val_tokens"):
        n = meta.get(key)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            return f"has no token count {key} (it has {n!r})"
    if meta.get("dtype") not in DTYPES:
        return f"names dtype {meta.get('dtype')!r}, not one of {', '.join(DTYPES)}"
    tok = meta.get("tokenizer")
    if not isinstance(tok, dict) or tok.get("name") not in (
        "char",
        "bpe",
        "gpt2",
        "hf",
        "chat",
    ):
        return f"names no tokenizer jaxgpt knows ({str(tok)[:80]})"
    base = tok.get("base") if isinstance(tok.get("base"), dict) else {}
    if "gpt2" not in (tok["name"], base.get("name")):  # GPT-2's: its own files.
        try:
            tokenizer_io.from_json(tok)
        except ValueError as e:
            return f"holds a tokenizer jaxgpt cannot build ({e})"
    sums = meta.get("token_sha256")  # (Absent from datasets prepared before.)
    if sums is not None:
        chunk = sums.get("chunk_bytes") if isinstance(sums, dict) else None
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0:
            return f"has token_sha256 without a chunk size ({str(sums)[:80]})"
        for split, (n, dtype) in file_sizes(meta).items():
            n_bytes = n * np.dtype(dtype).itemsize
            digests = sums.get(split)
            if not (
                isinstance(digests, list)
                and len(digests) == -(-n_bytes // chunk)
                and all(isinstance(d, str) for d in digests)
            ):
                return f"has no sha256 of each chunk of {split}.bin"
    block = meta.get("block_size")
    if "block_size" in meta and not (isinstance(block, int) and block > 0):
        return f"has rows of no block_size ({block!r})"
    return None


def file_sizes(meta: dict[str, Any]) -> dict[str, tuple[int, str]]:
    """Each file of a dataset (by name less .bin) -> (its items, their dtype):
    the token files, and a chat dataset's mask and segment files."""
    out = {s: (meta[f"{s}_tokens"], meta["dtype"]) for s in ("train", "val")}
    if "block_size" in meta:
        for name, dtype in {**ROW_FILES, "segments": segments_dtype(meta)}.items():
            out |= {f"{s}_{name}": (out[s][0], dtype) for s in ("train", "val")}
    return out


def segments_dtype(meta: dict[str, Any]) -> str:
    """Segment ids count a row's conversations: uint16 for rows up to 65,536."""
    return "uint16" if meta["block_size"] + 1 <= 2**16 else "uint32"


def load(folder: Path) -> Dataset:
    """Opens <folder>/{train,val}.bin (read a window at a time); checks them
    against meta.json, and their ids against the vocabulary."""
    meta = read_meta(folder)
    files = {}
    for name, (n, dtype) in file_sizes(meta).items():
        path = folder / f"{name}.bin"
        expected = n * np.dtype(dtype).itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise data.DataError(
                f"{path} is missing or not {expected:,} bytes as {folder}/meta.json"
                f" says: {again(folder)}, or delete {folder}."
            )
        verify_tokens(path, meta, name, folder)
        files[name] = TokenFile(path, dtype)
    splits = {split: files.pop(split) for split in ("train", "val")}
    rows = {}
    if "block_size" in meta:  # The mask and segments beside each split's rows.
        for split in splits:
            rows[split] = {n: files[f"{split}_{n}"] for n in (*ROW_FILES, "segments")}
    try:
        tok = tokenizer_io.from_json(meta["tokenizer"])
    except ValueError as e:  # GPT-2's files not found (offline).
        raise data.DataError(f"{folder}/meta.json's tokenizer: {e}") from e
    check_ids(splits, tok.vocab_size, folder)
    return Dataset(tok, splits, meta, rows)


class ChunkSums:
    """The sha256 of each CHUNK_BYTES of a stream of bytes, fed in any pieces."""

    def __init__(self, chunk: int | None = None):
        self.chunk = chunk or CHUNK_BYTES
        self.digests, self._sha, self._n = [], hashlib.sha256(), 0

    def update(self, data_: bytes | memoryview) -> None:
        view = memoryview(data_).cast("B")
        while len(view):
            take = min(len(view), self.chunk - self._n)
            self._sha.update(view[:take])
            self._n, view = self._n + take, view[take:]
            if self._n == self.chunk:
                self.digests.append(self._sha.hexdigest())
                self._sha, self._n = hashlib.sha256(), 0

    def result(self) -> list[str]:
        """The digests, the last (partial) chunk's included."""
        return self.digests + ([self._sha.hexdigest()] if self._n else [])


def verify_tokens(path: Path, meta: dict[str, Any], split: str, folder: Path) -> None:
    """DataError unless the token file's chunks match their sha256 in meta.json:
    every chunk of a file up to VERIFY_BYTES, else VERIFY_CHUNKS evenly spaced
    ones. Datasets prepared before checksums were recorded have none to check."""
    sums = meta.get("token_sha256")
    if sums is None:
        return
    chunk, digests = sums["chunk_bytes"], sums[split]
    which = range(len(digests))
    if path.stat().st_size > VERIFY_BYTES:
        spaced = np.linspace(0, len(digests) - 1, VERIFY_CHUNKS).astype(np.int64)
        which = sorted(set(spaced.tolist()))
    with open(path, "rb") as f:
        for i in which:
            f.seek(i * chunk)
            block = f.read(chunk)
            if hashlib.sha256(block).hexdigest() != digests[i]:
                raise data.DataError(
                    f"{path} differs from the sha256 {folder}/meta.json records for"
                    f" its bytes {i * chunk:,} to {i * chunk + len(block):,}: the"
                    f" file is damaged; {again(folder)}."
                )


def check_ids(splits: dict[str, TokenFile], vocab_size: int, folder: Path) -> None:
    """Every id of the token files is below the vocabulary (files up to
    SCAN_BYTES whole, larger ones in 64 evenly spaced windows of 1M ids)."""
    for tokens in splits.values():
        n, window = len(tokens), 2**20
        if n * tokens.dtype.itemsize <= SCAN_BYTES:
            starts = range(0, n, 2**24)
            window = 2**24
        else:
            starts = np.linspace(0, n - window, 64).astype(np.int64)
        top = max((int(tokens[s : s + window].max()) for s in starts), default=-1)
        if top >= vocab_size:
            raise data.DataError(
                f"{tokens.path} holds token id {top}, beyond the vocabulary of"
                f" {vocab_size} of the tokenizer {folder}/meta.json names: the"
                f" files and meta.json disagree; {again(folder)}."
            )


def interrupted(folder: Path) -> bool:
    """Whether a preparation of `folder` was cut short (its marker is left)."""
    return (folder / PREPARING).exists()


def remove_stale(folder: Path) -> list[Path]:
    """Deletes the temporary files that processes now dead left in `folder`."""
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        m = TMP_NAME.fullmatch(path.name)
        if m and int(m.group(1)) != os.getpid() and not workdir.alive(int(m.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class _PlainData(pickle.Unpickler):
    """Unpickles plain data only (dicts, strings, numbers): never runs code."""

    def find_class(self, module, name):
        raise data.DataError(f"meta.pkl names {module}.{name}: not plain data.")


def load_nanogpt(folder: Path) -> Dataset:
    """A folder nanoGPT prepared: uint16 ids, and meta.pkl holding the character
    vocabulary (its itos), or no meta.pkl for GPT-2's BPE."""
    if (folder / "meta.pkl").is_file():
        with open(folder / "meta.pkl", "rb") as f:
            itos = _PlainData(f).load()["itos"]
        tok = tokenizer.CharTokenizer("".join(itos[i] for i in range(len(itos))))
    else:
        tok = tokenizer_io.load_gpt2()
    splits = {
        split: TokenFile(folder / f"{split}.bin", np.uint16)
        for split in ("train", "val")
    }
    check_ids(splits, tok.vocab_size, folder)
    meta = {"dataset": folder.name, "tokenizer": tok.to_json(), "dtype": "uint16"}
    return Dataset(
        tok, splits, meta | {f"{s}_tokens": len(t) for s, t in splits.items()}
    )


def ensure(
    cfg: DataConfig, block_size: int | None = None, init_from: str | None = None
) -> Dataset:
    """The dataset cfg names, prepared first if it is not (or if its source,
    tokenizer or a chat dataset's --block_size changed). A folder that nanoGPT
    prepared is read as it is. block_size and init_from: prepare_chat's."""
    folder = Path(cfg.data_dir) / cfg.dataset
    meta_path = folder / "meta.json"
    remove_stale(folder)
    if looks_like_nanogpt(folder, cfg):
        return load_nanogpt(folder)
    if meta_path.is_file() and not interrupted(folder):
        meta = read_meta(folder)
        stale = []
        files = local_files(cfg.data_path) if cfg.data_path else ()
        if files and meta.get("fingerprint") != fingerprint(files):
            stale.append(f"--data_path={cfg.data_path} differs from its source")
        elif files and (changed := source_changed(files, meta)):
            stale.append(f"--data_path={cfg.data_path} {changed}")
        if cfg.tokenizer and meta.get("tokenizer_spec") != cfg.tokenizer:
            stale.append(f"--tokenizer={cfg.tokenizer} differs from its tokenizer")
        rows = meta.get("block_size")
        if rows and block_size and rows != block_size:
            stale.append(f"--block_size={block_size} differs from its rows' {rows}")
        if not cfg.data_path and (other := other_source(cfg.dataset, meta, folder)):
            stale.append(other)
        if not stale:
            return load(folder)
        print(f"re-preparing {folder}: {'; '.join(stale)}.", file=sys.stderr)
    elif interrupted(folder):
        print(f"re-preparing {folder}: its preparation was cut short.", file=sys.stderr)
    prepare(cfg, block_size=block_size, init_from=init_from)
    return load(folder)


def source_changed(files: list[Path], meta: dict[str, Any]) -> str | None:
    """Why local text of the same paths, sizes and modification times as the
    meta's (its fingerprint) is not the text it was prepared from: its sha256
    differs, checked for text up to SOURCE_HASH_BYTES (None: the same, or
    larger)."""
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    if "sha256" not in source or sum(p.stat().st_size for p in files) > (
        SOURCE_HASH_BYTES
    ):
        return None
    if source_sha256(files) == source["sha256"]:
        return None
    return "changed since it was prepared (its sha256 differs; size and time agree)"


def looks_like_nanogpt(folder: Path, cfg: DataConfig) -> bool:
    """Whether `folder` is one nanoGPT prepared: its two token files, no
    meta.json and no marker of jaxgpt's, and meta.pkl (characters) or a
    dataset whose tokenizer is GPT-2's (nanoGPT's default, without meta.pkl)."""
    bins = all((folder / f"{split}.bin").is_file() for split in ("train", "val"))
    if not bins or cfg.data_path or (folder / "meta.json").exists():
        return False
    if interrupted(folder):
        return False
    recipe = DATASETS.get(cfg.dataset)
    spec = cfg.tokenizer or (recipe.tokenizer if recipe else "gpt2")
    return (folder / "meta.pkl").is_file() or spec == "gpt2"


def other_source(name: str, meta: dict[str, Any], folder: Path) -> str | None:
    """Why `folder`, prepared as the known dataset `name`, holds other text
    (it was prepared from a --data_path), or None: tiny shakespeare is
    prepared again; a streamed dataset is refused rather than downloaded."""
    recipe = DATASETS.get(name)
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    if recipe is None:
        return None  # Any text may have that name.
    if recipe.hf is None:
        if source.get("sha256") == TINYSHAKESPEARE_SHA256:
            return None
        paths = ", ".join(map(str, source.get("paths", [])[:3])) or "unnamed text"
        return f"it holds text from {paths}, not tiny shakespeare"
    if [source.get("hf_path"), source.get("hf_config")] == list(recipe.hf):
        return None
    paths = ", ".join(map(str, source.get("paths", [])[:3])) or "other text"
    raise data.DataError(
        f"{folder} holds text from {paths}, not {recipe.about}: pass that"
        f" --data_path to train on it, or delete {folder} to prepare {name}."
    )


# --- Sources of text -----------------------------------------------------------

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
    "tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_SHA256 = (
    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
)
RELATIVE_PATH = Path("tinyshakespeare") / "input.txt"


def sha256_of(path: Path) -> str:
    """The file's sha256, read in 1 MiB blocks (a corpus need not fit in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, sha256: str, timeout: float = 30.0) -> Path:
    """Downloads `url` to `dest` atomically and checks its sha256."""
    dest = Path(dest)
    offline_hint = (
        f"Fetch {url} by hand and pass --data_path=/path/to/input.txt, or set"
        f" JAXGPT_DATA_DIR to a folder holding {RELATIVE_PATH}."
    )
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            payload = response.read()
    except OSError as e:  # URLError, timeouts, refused connections.
        raise data.DataError(f"could not download {url} ({e}). {offline_hint}") from e
    digest = hashlib.sha256(payload).hexdigest()
    if digest != sha256:
        raise data.DataError(
            f"{url} has sha256 {digest}, expected {sha256}: the download is"
            f" corrupt or the file changed. {offline_hint}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
        tmp.write(payload)
    os.replace(tmp.name, dest)
    return dest


def find_corpus(data_path: str | None = None) -> Path:
    """Finds tiny shakespeare: --data_path, $JAXGPT_DATA_DIR, the cache, the web."""
    if data_path:
        path = Path(data_path).expanduser()
        if not path.is_file():
            raise data.DataError(f"--data_path={data_path} is not a file.")
        return path
    if os.environ.get("JAXGPT_DATA_DIR"):
        path = Path(os.environ["JAXGPT_DATA_DIR"]).expanduser() / RELATIVE_PATH
        if path.is_file():
            return path
    cached = cache.cache_dir() / RELATIVE_PATH
    if cached.is_file() and sha256_of(cached) == TINYSHAKESPEARE_SHA256:
        return cached
    return download(TINYSHAKESPEARE_URL, cached, TINYSHAKESPEARE_SHA256)


def load_text(data_path: str | None = None) -> str:
    """Returns the corpus text (see `find_corpus` for where it comes from)."""
    return find_corpus(data_path).read_text(encoding="utf-8")


def recipe_of(cfg: DataConfig) -> Recipe:
    recipe = DATASETS.get(cfg.dataset)
    if recipe is None and not cfg.data_path:
        raise ConfigError(
            f"--dataset={cfg.dataset} is not prepared in --data_dir={cfg.data_dir} and"
            f" is not one jaxgpt knows ({', '.join(DATASETS)}): pass --data_path"
            " with a text file or a folder of .txt/.jsonl files to prepare it."
        )
    recipe = recipe or Recipe("char")
    if cfg.data_path:
        recipe = dataclasses.replace(recipe, hf=None)  # The local text instead.
    if cfg.tokenizer:
        recipe = dataclasses.replace(recipe, tokenizer=cfg.tokenizer)
    check_tokenizer_spec(recipe.tokenizer)  # Before any text is found or downloaded.
    if recipe.hf is None:  # Tiny shakespeare is found, or downloaded once.
        files = local_files(cfg.data_path) if cfg.data_path else [find_corpus()]
        chat = is_conversations(files)
        recipe = dataclasses.replace(recipe, files=tuple(files), chat=chat)
    return recipe


def is_conversations(files: list[Path]) -> bool:
    """Whether .jsonl files hold conversations ({"messages": [...]} lines), not
    documents ({"text": ...}): the first line of JSON says."""
    if not files or any(p.suffix != ".jsonl" for p in files):
        return False
    with files[0].open(encoding="utf-8", errors="replace") as f:
        for line in itertools.islice(f, 1000):
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                return isinstance(record, dict) and "messages" in record
    return False


def local_files(data_path: str) -> list[Path]:
    path = Path(data_path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
        if files:
            return files
        raise data.DataError(f"--data_path={data_path} holds no .txt or .jsonl files.")
    raise data.DataError(f"--data_path={data_path} is not a file or a folder.")


def documents(cfg: DataConfig, recipe: Recipe) -> Iterator[str]:
    """The dataset's documents, in a fixed order."""
    if recipe.hf is not None:
        yield from hf_documents(*recipe.hf, cfg.max_documents)
        return
    for path in recipe.files:
        name = f"--data_path={path}" if str(path) == cfg.data_path else str(path)
        if path.suffix == ".jsonl":
            yield from jsonl_texts(path, name)
        else:
            yield read_text(path, name)


def jsonl_texts(path: Path, name: str) -> Iterator[str]:
    """The "text" of each line of a .jsonl file (DataError naming the line that
    is not a JSON object with a "text" string)."""
    fix = 'each line of a .jsonl file must be a JSON object with a "text" string'
    number = 0
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise data.DataError(
                        f"{name}, line {number}, is not JSON ({e}): {fix}."
                    ) from None
                text = row.get("text") if isinstance(row, dict) else None
                if not isinstance(text, str):
                    raise data.DataError(
                        f'{name}, line {number}, has no "text": {fix}.'
                    )
                yield text
    except UnicodeDecodeError:
        raise data.DataError(
            f"{name}, line {number + 1}, is not UTF-8 text: convert it to UTF-8."
        ) from None


def read_text(path: Path, name: str | None = None) -> str:
    """The UTF-8 text of `path` (called `name` in errors), which may not be empty."""
    name = name or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise data.DataError(
            f"{name} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset"
            f" {e.start}): convert it to UTF-8 or choose another file."
        ) from e
    if not text:
        raise data.DataError(f"{name} is empty: a corpus needs some text.")
    return text


def hf_documents(
    path: str, name: str | None, limit: int | None, key: str = "text"
) -> Iterator[Any]:
    """The "text" (or `key`) of each row of a Hugging Face dataset's train
    split, streamed."""
    try:
        import datasets
    except ImportError as e:
        raise data.DataError(
            f"{path} comes through Hugging Face datasets: pip install datasets."
        ) from e
    try:
        rows = datasets.load_dataset(path, name, split="train", streaming=True)
        for i, row in enumerate(rows):
            if limit is not None and i >= limit:
                return
            yield row[key]
    except (OSError, ConnectionError, ValueError) as e:
        raise data.DataError(
            f"could not stream {path} from the Hugging Face Hub ({type(e).__name__}:"
            f" {str(e)[:200]}). Prepare it where there is internet and copy its"
            " folder under --data_dir, or pass --data_path with local text."
        ) from e


def split_documents(docs: Iterator[str], recipe: Recipe):
    """(split, text, is a document) triples: a lone text is split 90/10 by
    characters (nanoGPT's split), documents go every val_every-th to validation."""
    first = next(docs, None)
    if first is None:
        raise data.DataError("the dataset has no documents.")
    head = [first, *itertools.islice(docs, recipe.val_every - 1)]
    if len(head) == 1:
        train_text, val_text = data.split(first)
        yield "train", train_text, False
        yield "val", val_text, False
        return
    if len(head) < recipe.val_every:  # Fewer than k: the last one validates.
        for doc in head[:-1]:
            yield "train", doc, True
        yield "val", head[-1], True
        return
    for i, doc in enumerate(itertools.chain(head, docs)):
        last_of_k = i % recipe.val_every == recipe.val_every - 1
        yield ("val" if last_of_k else "train"), doc, True


# --- Tokenizers ----------------------------------------------------------------


def make_tokenizer(spec: str, cfg: DataConfig, recipe: Recipe, docs=None):
    """The tokenizer `spec` names, trained on the dataset's text (or the
    documents docs() yields) if it learns one."""
    docs = docs or (lambda: documents(cfg, recipe))
    if spec == "gpt2":
        try:
            return tokenizer_io.load_gpt2()
        except ValueError as e:
            raise data.DataError(str(e)) from e
    if spec.endswith(".json"):
        try:
            return tokenizer_io.from_json(json.loads(Path(spec).read_text()))
        except (OSError, ValueError) as e:  # Missing, not JSON, not a tokenizer.
            reason = e.strerror if isinstance(e, OSError) else e
            raise ConfigError(
                f"--tokenizer={spec} cannot be read ({reason}): name a tokenizer"
                " .json that jaxgpt wrote (a dataset's or an export's)."
            ) from e
    if os.path.isdir(spec) or "/" in spec:  # A model folder or Hub repository.
        from jaxgpt.hub import load  # (Imports JAX, which preparing needs not.)

        try:
            return load.read_tokenizer(spec)
        except ValueError as e:
            raise ConfigError(f"--tokenizer={spec}: {e}") from e
    if spec == "char":  # The distinct characters of the whole corpus.
        chars = set()
        for doc in docs():
            chars.update(doc)
        return tokenizer.CharTokenizer.train("".join(sorted(chars)))
    if spec.startswith("bpe:") and spec[4:].isdigit():
        sample, size = [], 0
        for split, doc, _ in split_documents(docs(), recipe):
            if split == "train":
                sample.append(doc[: BPE_TRAIN_CHARS - size])
                size += len(sample[-1])
                if size >= BPE_TRAIN_CHARS:
                    break
        text = "\n".join(sample)
        specials = (tokenizer.ENDOFTEXT,)
        with signals_blocked((signal.SIGINT,)):  # Its pool's workers ignore Ctrl-C.
            counts = tokenizer_train.count_chunks(
                text, tokenizer.GPT4_PATTERN, specials
            )
        return tokenizer_io.BPETokenizer(
            tokenizer_train.train_bpe(counts, int(spec[4:]))
        )
    raise unknown_tokenizer(spec)


_worker = {}  # The tokenizer and end-of-text ids of a pool worker.


def end_of_text(tok) -> np.ndarray:
    """The ids that end a document: the tokenizer's eos (<|endoftext|>, a
    Hugging Face tokenizer's eos token), if it has one."""
    return np.array([] if tok.eos_id is None else [tok.eos_id], np.int32)


def _init_worker(tokenizer_json: dict) -> None:
    tok = tokenizer_io.from_json(tokenizer_json)
    _worker.update(tok=tok, eot=end_of_text(tok))


def _encode(
    job: tuple[str, str, bool, bool],
) -> tuple[str, np.ndarray, int, bool, bool]:
    """(split, ids, UTF-8 bytes, last piece, is a document) of one piece of a
    text; the last piece of a document (not of a lone text) ends with
    <|endoftext|>."""
    split, text, last, document = job
    ids = tokenizer_io.encode_plain(_worker["tok"], text)  # No <s> added.
    if last and document and len(_worker["eot"]):
        ids = np.concatenate([ids, _worker["eot"]])
    return split, ids, len(text.encode("utf-8")), last, document


# --- Preparing -------------------------------------------------------------------


def prepare(
    cfg: DataConfig,
    workers: int | None = None,
    block_size: int | None = None,
    init_from: str | None = None,
) -> Path:
    """Tokenises the dataset cfg names into <data_dir>/<dataset>/; returns the folder.

    Nothing is written before the text is found and the tokenizer made; the
    token files appear, with meta.json, only once all are complete (see the
    module's docstring). A failed write (a full disk) is one DataError naming
    the folder and its free space, the temporary files deleted. Conversations
    are prepared as rows of block_size + 1 tokens (prepare_chat).
    """
    recipe = recipe_of(cfg)
    if recipe.chat:
        return prepare_chat(cfg, recipe, block_size or DEFAULT_BLOCK_SIZE, init_from)
    folder = Path(cfg.data_dir) / cfg.dataset
    tok = make_tokenizer(recipe.tokenizer, cfg, recipe)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    tmp = {s: folder / f".{s}.bin.tmp-{os.getpid()}" for s in ("train", "val")}
    counts = {f"{s}_{k}": 0 for s in tmp for k in ("tokens", "bytes", "documents")}
    pieces = pieces_of(split_documents(documents(cfg, recipe), recipe))
    made = make_folders(folder)
    remove_stale(folder)
    done = False
    try:
        with contextlib.ExitStack() as stack:
            if workers is None:  # A pool pays off on large text only.
                workers = 1 if source_bytes(recipe) < 2**24 else os.cpu_count()
            if workers > 1:
                with signals_blocked((signal.SIGINT,)):  # Workers ignore Ctrl-C.
                    pool = multiprocessing.get_context("spawn").Pool(
                        workers, _init_worker, (tok.to_json(),)
                    )
                stack.enter_context(pool)
                encoded = pool.imap(_encode, pieces, chunksize=16)
            else:
                _init_worker(tok.to_json())
                encoded = map(_encode, pieces)
            bar = Progress(f"tokenising {cfg.dataset}", recipe)
            stack.callback(bar.close)
            files = {
                s: stack.enter_context(open(path, "wb")) for s, path in tmp.items()
            }
            sums = {s: ChunkSums() for s in tmp}
            for split, ids, n_bytes, last, document in encoded:
                block = ids.astype(dtype).data
                files[split].write(block)
                sums[split].update(block)
                counts[f"{split}_tokens"] += len(ids)
                counts[f"{split}_bytes"] += n_bytes
                counts[f"{split}_documents"] += last
                bar.update(n_bytes, last, document)
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())
        check_splits(counts, cfg, recipe)
        meta = {
            "dataset": cfg.dataset,
            "about": recipe.about,
            "tokenizer_spec": recipe.tokenizer,
            "tokenizer": tok.to_json(),
            "dtype": np.dtype(dtype).name,
            **counts,
            "source": source_of(recipe),
            "fingerprint": fingerprint(recipe.files) if cfg.data_path else None,
            "token_sha256": {
                "chunk_bytes": CHUNK_BYTES,
                **{s: chunk_sums.result() for s, chunk_sums in sums.items()},
            },
        }
        with signals_blocked():  # Ctrl-C waits for the files to be in place.
            install(folder, tmp, json.dumps(meta, indent=1))
            done = True
    except Stopped as e:
        e.complete = done  # A signal that waited for install: all is written.
        raise
    except OSError as e:
        written = str(e.filename or "").startswith(str(folder))
        if not (written or e.errno in workdir.FULL):
            raise  # Reading the text failed: main names the file.
        raise data.DataError(write_error(e, folder, cfg.data_dir)) from e
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        if not done:
            for path in reversed(made):  # Folders this call made, if still empty.
                with contextlib.suppress(OSError):
                    path.rmdir()
    print(
        f"{folder}: {counts['train_tokens']:,} train and {counts['val_tokens']:,} val"
        f" tokens from {bar.source()} ({tok.name}, vocabulary {tok.vocab_size:,},"
        f" {np.dtype(dtype).name})",
        file=sys.stderr,
    )
    return folder


# --- Conversations: rows for supervised fine-tuning ----------------------------


def prepare_chat(
    cfg: DataConfig, recipe: Recipe, block_size: int, init_from: str | None = None
) -> Path:
    """Conversations -> <data_dir>/<dataset>/{train,val}{,_mask,_segments}.bin
    and meta.json: every conversation checked and rendered before any file is
    written; shuffled (CHAT_SHUFFLE_SEED), every val_every-th to validation,
    each split packed into rows of block_size + 1 tokens (conversations.pack).
    The tokenizer: --tokenizer, else --init_from's (a model folder's template,
    or a run's tokenizer), else characters; jaxgpt's chat tokens are added to
    a char, bpe or gpt2 tokenizer."""
    from jaxgpt.datasets import chat_template, conversations

    folder = Path(cfg.data_dir) / cfg.dataset
    try:
        records = read_chat(cfg, recipe)
        spec = cfg.tokenizer or init_from or "char"
        template, tok = chat_tokenizer(spec, cfg, recipe, records)
        ids, masks = chat_template.render_all(template, records)
    except (conversations.ConversationError, chat_template.ChatTemplateError) as e:
        raise data.DataError(str(e)) from None
    order = np.random.default_rng(CHAT_SHUFFLE_SEED).permutation(len(ids)).tolist()
    k = recipe.val_every
    val = set(order[k - 1 :: k] if len(order) >= k else order[-1:])
    picked = {
        "train": [i for i in order if i not in val],
        "val": [i for i in order if i in val],
    }
    pad_id = tok.eos_id if tok.eos_id is not None else 0  # Masked: any id.
    packed = {
        s: conversations.pack([ids[i] for i in idx], [masks[i] for i in idx],
                              block_size, pad_id)
        for s, idx in picked.items()
    }  # fmt: skip
    counts = {f"{s}_conversations": len(idx) for s, idx in picked.items()}
    for what in ("cut", "truncated", "dropped"):
        counts[f"{what}_conversations"] = sum(
            getattr(p, f"n_{what}") for p in packed.values()
        )
    empty = [s for s, p in packed.items() if not p.mask_RL.any()]
    if empty:
        raise data.DataError(
            f"--dataset={cfg.dataset}'s {' and '.join(empty)} split would hold no"
            f" token to learn ({len(ids)} conversations, one in {k} to validation,"
            f" {counts['dropped_conversations']} with nothing to learn within"
            f" --block_size={block_size}): give more conversations or a larger"
            " --block_size; nothing was written."
        )
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    meta = {
        "dataset": cfg.dataset,
        "about": recipe.about or "conversations",
        "tokenizer_spec": spec,
        "tokenizer": tok.to_json(),
        "chat_template": getattr(template, "folder", "jaxgpt"),
        "dtype": np.dtype(dtype).name,
        "block_size": block_size,
        **{f"{s}_tokens": p.tokens_RL.size for s, p in packed.items()},
        **{f"{s}_rows": len(p.tokens_RL) for s, p in packed.items()},
        **{f"{s}_masked_tokens": int(p.mask_RL.sum()) for s, p in packed.items()},
        **counts,
        "source": source_of(recipe),
        "fingerprint": fingerprint(recipe.files) if cfg.data_path else None,
    }
    arrays = {}
    for s, p in packed.items():
        arrays[s] = p.tokens_RL.astype(dtype)
        arrays[f"{s}_mask"] = p.mask_RL.astype(ROW_FILES["mask"])
        arrays[f"{s}_segments"] = p.segments_RL.astype(segments_dtype(meta))
    write_files(folder, arrays, meta, cfg.data_dir)
    print(
        f"{folder}: {meta['train_rows']:,} train and {meta['val_rows']:,} val rows of"
        f" {block_size + 1} tokens from {len(ids):,} conversations ({tok.name},"
        f" vocabulary {tok.vocab_size:,}); {meta['train_masked_tokens']:,} train"
        f" tokens to learn; conversations cut {counts['cut_conversations']},"
        f" truncated {counts['truncated_conversations']}, dropped"
        f" {counts['dropped_conversations']}",
        file=sys.stderr,
    )
    return folder


def read_chat(cfg: DataConfig, recipe: Recipe) -> list:
    """The conversations of --data_path (each line checked first) or of a Hub
    chat dataset's train split (its "messages", up to --max_documents)."""
    from jaxgpt.datasets import conversations

    if recipe.hf is None:
        return conversations.read_conversations(cfg.data_path)
    with contextlib.suppress(ImportError):  # Its loggers set up, then quieted.
        import datasets  # noqa: F401
    hub_log = logging.getLogger("huggingface_hub")  # Offline: its retries, ...
    level, records = hub_log.level, []
    hub_log.setLevel(logging.ERROR)  # ... and one error line of ours.
    try:
        rows = hf_documents(*recipe.hf, cfg.max_documents, key="messages")
        for i, messages in enumerate(rows):
            if problem := conversations.check_conversation({"messages": messages}):
                raise conversations.ConversationError(
                    f"{recipe.hf[0]} row {i}: {problem}"
                )
            records.append(messages)
    finally:
        hub_log.setLevel(level)
    return records


def chat_tokenizer(spec: str, cfg: DataConfig, recipe: Recipe, records: list):
    """(the template that renders conversations, the dataset's tokenizer) of
    `spec`: a Hugging Face model folder or Hub name brings its template; a
    run's workdir its checkpoint's tokenizer; the others are made as for text
    (char and bpe learn the contents), with jaxgpt's chat tokens added."""
    from jaxgpt.datasets import chat_template

    workdir_ = Path(spec)
    if (workdir_ / workdir.CHECKPOINTS).is_dir():  # A run's own tokenizer.
        from jaxgpt.run import checkpoint  # (Imports JAX.)

        meta = checkpoint.read_meta(workdir_)
        if meta is None:
            raise ConfigError(f"{spec} holds no intact checkpoint to read a tokenizer.")
        base = tokenizer_io.from_json(meta["tokenizer"])
    elif os.path.isdir(spec) or (
        "/" in spec and not spec.endswith(".json")
    ):  # A Hugging Face model: its own template.
        from jaxgpt.hub import load

        try:
            _, where, _ = load.locate(spec)
            template = chat_template.HFChatTemplate.load(where)
            return template, load.read_tokenizer(where)
        except ValueError as e:
            raise ConfigError(f"--tokenizer={spec}: {e}") from e
    else:
        contents = lambda: (m["content"] for r in records for m in r)
        base = make_tokenizer(spec, cfg, recipe, docs=contents)
    tok, _ = chat_template.add_chat_tokens(base)
    return tok, tok


def write_files(folder: Path, arrays: dict, meta: dict, data_dir) -> None:
    """Writes <folder>/<name>.bin of each array under temporary names, then
    installs them with meta.json (its token_sha256 added) all at once."""
    tmp = {name: folder / f".{name}.bin.tmp-{os.getpid()}" for name in arrays}
    made = make_folders(folder)
    remove_stale(folder)
    done = False
    try:
        sums = {}
        for name, array in arrays.items():
            with open(tmp[name], "wb") as f:
                block = np.ascontiguousarray(array).data
                f.write(block)
                f.flush()
                os.fsync(f.fileno())
            sums[name] = ChunkSums()
            sums[name].update(block)
        meta["token_sha256"] = {
            "chunk_bytes": CHUNK_BYTES,
            **{name: chunk_sums.result() for name, chunk_sums in sums.items()},
        }
        with signals_blocked():
            install(folder, tmp, json.dumps(meta, indent=1))
            done = True
    except Stopped as e:
        e.complete = done
        raise
    except OSError as e:
        raise data.DataError(write_error(e, folder, data_dir)) from e
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        if not done:
            for path in reversed(made):
                with contextlib.suppress(OSError):
                    path.rmdir()


class Progress:
    """The tokenising progress, on a terminal one bar: a lone text's UTF-8
    bytes (of the file's size), or a collection's documents. Elsewhere (a log
    file) nothing: prepare's summary line says what was read."""

    def __init__(self, desc: str, recipe: Recipe):
        self.desc, self.bar = desc, None
        one_file = recipe.hf is None and len(recipe.files) == 1
        self.size = source_bytes(recipe) if one_file else None
        self.bytes = self.documents = 0
        self.lone_text = False

    def update(self, n_bytes: int, last: bool, document: bool) -> None:
        self.bytes += n_bytes
        self.documents += bool(last and document)
        self.lone_text = not document
        if self.bar is None and sys.stderr.isatty():
            self.bar = (
                tqdm(desc=self.desc, unit=" documents")
                if document
                else tqdm(
                    desc=self.desc,
                    total=self.size,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                )
            )
        if self.bar is not None:
            self.bar.update(n_bytes if not document else int(last))

    def source(self) -> str:
        """What was tokenised, in words."""
        if self.lone_text:
            return f"{self.bytes:,} bytes of text"
        return f"{self.documents:,} documents"

    def close(self) -> None:
        if self.bar is not None:
            if self.bar.total is not None and self.bar.n != self.bar.total:
                self.bar.total = self.bar.n  # Its text, read, is not its size.
            self.bar.close()


def check_splits(counts: dict[str, int], cfg: DataConfig, recipe: Recipe) -> None:
    """DataError unless both splits hold tokens (training needs both)."""
    train, val = counts["train_tokens"], counts["val_tokens"]
    if train and val:
        return
    documents_ = counts["train_documents"] + counts["val_documents"]
    how = (
        f"its {documents_} documents went one in {recipe.val_every} to validation"
        f" ({counts['train_documents']} train, {counts['val_documents']} val), and"
        " one of them has no text"
        if documents_
        else f"a single text is split 90/10 by characters, and it has"
        f" {counts['train_bytes'] + counts['val_bytes']:,} bytes"
    )
    raise data.DataError(
        f"--dataset={cfg.dataset} would hold {train:,} train and {val:,} val"
        f" tokens, and training needs both ({how}): give it more text; nothing was"
        " written."
    )


@contextlib.contextmanager
def signals_blocked(signals=None):
    """`signals` (SIGINT and SIGTERM) wait, pending, until the block ends;
    processes started meanwhile keep them blocked for good (a pool's workers
    and SIGINT, the Ctrl-C that reaches them all: the parent alone ends a
    preparation; SIGTERM still ends the workers when the pool closes)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals or STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def install(folder: Path, tmp: dict[str, Path], meta_json: str) -> None:
    """Puts the complete token files in place, meta.json last, under the
    marker: a kill at any moment leaves the old dataset whole, or a folder
    marked as not prepared."""
    with open(folder / PREPARING, "w") as f:
        f.write(str(os.getpid()))
        f.flush()
        os.fsync(f.fileno())
    (folder / "meta.json").unlink(missing_ok=True)
    for split, path in tmp.items():
        os.replace(path, folder / f"{split}.bin")
    workdir.write_atomically(folder / "meta.json", meta_json)
    (folder / PREPARING).unlink()


def make_folders(folder: Path) -> list[Path]:
    """Makes `folder` and its missing parents; returns those it made, outermost
    first (DataError naming it if it cannot be made)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise data.DataError(write_error(e, folder, folder.parent)) from e
    return missing


def write_error(e: OSError, folder: Path, data_dir) -> str:
    """One line for a failed write of a dataset: a full disk says so."""
    where = f" at {e.filename}" if e.filename else ""
    if e.errno in workdir.FULL:
        return (
            f"could not write the dataset {folder} ({workdir.WRITE_ERRORS[e.errno]}"
            f"{where}; {workdir.free_space(nearest(Path(data_dir)))} in"
            f" --data_dir={data_dir}); its unfinished files are deleted. Free space"
            " (or choose another --data_dir) and run again."
        )
    return (
        f"could not write the dataset {folder} ({e.strerror or e}{where}):"
        " choose a --data_dir you can write to."
    )


def nearest(path: Path) -> Path:
    """`path`, or its nearest existing parent."""
    return next((p for p in (path, *path.parents) if p.exists()), path)


def pieces_of(jobs, max_chars: int = 1_000_000) -> Iterator[tuple]:
    """(split, piece, is the last, is a document): long texts cut where the
    pre-tokenisers always cut (SAFE_CUT), so that workers share them and
    the ids are those of the whole text."""
    for split, text, document in jobs:
        start = 0
        while len(text) - start > max_chars:
            cut = tokenizer_train.SAFE_CUT.search(text, start + max_chars)
            if cut is None:
                break
            yield split, text[start : cut.start()], False, document
            start = cut.start()
        yield split, text[start:], True, document


def source_bytes(recipe: Recipe) -> float:
    """The size of a local source (infinite for a streamed one)."""
    if recipe.hf is not None:
        return float("inf")
    return sum(p.stat().st_size for p in recipe.files)


def source_of(recipe: Recipe) -> dict[str, Any]:
    if recipe.hf is not None:
        return {"hf_path": recipe.hf[0], "hf_config": recipe.hf[1]}
    files = recipe.files
    return {"paths": [str(p) for p in files[:20]], "sha256": source_sha256(files)}


def source_sha256(files) -> str:
    """One file's sha256, or of several the sha256 of their digests and names."""
    if len(files) == 1:
        return sha256_of(files[0])
    digest = hashlib.sha256()  # Of the files' own digests and names, in order.
    for path in files:
        digest.update(f"{sha256_of(path)}  {path}\n".encode())
    return digest.hexdigest()


def fingerprint(files) -> list:
    """Cheap identity of local text: each file's path, size and modification time."""
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def read_dataset(data_cfg: DataConfig, block_size=None, init_from=None) -> Dataset:
    """The dataset's tokenizer and splits, token files read by window (prepared
    first if need be, by process 0 while the others wait; a chat dataset in
    rows of block_size + 1 tokens, with init_from's tokenizer unless
    --tokenizer names one)."""
    from jaxgpt.run import hosts  # JAX, which preparing alone needs not.

    if hosts.is_main_process():
        dataset = ensure(data_cfg, block_size, init_from)
    hosts.sync("jaxgpt.datasets.prepare")
    if not hosts.is_main_process():
        dataset = ensure(data_cfg, block_size, init_from)  # Prepared: this reads.
    return dataset


def check_fits(dataset: Dataset, model_cfg: ModelConfig, tok) -> None:
    """The model reads the dataset's tokens, and each split holds a window."""
    if tok.to_json() != dataset.tokenizer.to_json():
        raise ConfigError(
            f"the model's {tok.name} tokenizer (vocabulary {tok.vocab_size:,}) is not"
            f" --dataset={dataset.meta['dataset']}'s {dataset.tokenizer.name}"
            f" tokenizer (vocabulary {dataset.tokenizer.vocab_size:,}): {refit(tok)}"
        )
    for split, tokens in dataset.splits.items():
        what = f"{split} split of --dataset={dataset.meta['dataset']}"
        if not dataset.rows:  # (Rows: datasets/rows.py checks their length.)
            data.check_long_enough(len(tokens), model_cfg.block_size, what)


def refit(tok) -> str:
    """How to get a dataset that the model of tokenizer `tok` reads."""
    if tok.name == tokenizer_io.HFTokenizer.name:
        return (
            "prepare a dataset with the model's own: --tokenizer=<the model's folder"
            " or Hub name> (its tokenizer.json) and another --dataset or --data_dir."
        )
    if tok.name == "gpt2":
        return (
            "prepare a dataset with GPT-2's BPE: --tokenizer=gpt2 (e.g."
            " --dataset=shakespeare)."
        )
    learned = (  # A char vocabulary is its text's characters; a BPE's, learned.
        "--tokenizer=char from the text it was trained on"
        if tok.name == "char"
        else "--tokenizer=<its export's jaxgpt_tokenizer.json> (python -m"
        " jaxgpt.hub.export writes it)"
    )
    return (
        "use a dataset of the model's own tokenizer: the --dataset its run trained"
        f" on, or one prepared with {learned} and another --dataset."
    )


def main(argv: list[str]) -> None:
    from jaxgpt.run import cli, errors  # Defines the flags.

    del argv  # cli.run refuses words that are not flags.
    previous = {sig: signal.signal(sig, _stop) for sig in STOP_SIGNALS}
    cfg = None
    try:
        cfg = cli.from_flags(DataConfig)
        cmd = cli.command()  # A chat dataset's --block_size and --init_from.
        prepare(cfg, block_size=cmd.model["block_size"], init_from=cmd.run.init_from)
    except (ConfigError, data.DataError) as e:
        errors.exit_with(e)
    except OSError as e:  # Reading the text.
        sys.exit(errors.file_error_line(e, "read", "check --data_path"))
    except Stopped as e:  # Its unfinished files are deleted by now.
        folder = Path(cfg.data_dir) / cfg.dataset if cfg else "the dataset"
        print(
            f"error: stopped by {e.name} once {folder} was prepared (it is whole)."
            if e.complete
            else f"error: stopped by {e.name} before {folder} was prepared: its"
            " unfinished files are deleted (a dataset already there is left as it"
            " was). Run the same command again to prepare it.",
            file=sys.stderr,
        )
        sys.exit(128 + e.signum)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Stopped(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM during a preparation."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum, self.name = signum, signal.Signals(signum).name
        self.complete = False  # Whether the dataset was whole when it came.


def _stop(signum: int, frame) -> None:
    raise Stopped(signum)


if __name__ == "__main__":
    from jaxgpt.run import cli  # Defines the flags.

    cli.run(main)

"""Datasets as token files: <data_dir>/<name>/{train.bin, val.bin, meta.json}.

  python -m jaxgpt.prepare --dataset=shakespeare_char     # tiny shakespeare, characters
  python -m jaxgpt.prepare --dataset=shakespeare          # tiny shakespeare, GPT-2 BPE
  python -m jaxgpt.prepare --dataset=openwebtext          # Hugging Face datasets, streamed
  python -m jaxgpt.prepare --dataset=fineweb_edu --max_documents=100000
  python -m jaxgpt.prepare --dataset=notes --data_path=notes/ --tokenizer=bpe:4096

nanoGPT's layout: train.bin and val.bin hold the token ids back to back,
uint16 when the vocabulary fits in 16 bits, else uint32, so nanoGPT's own
prepared files work too; meta.json names the tokenizer (its JSON, so sampling
needs nothing else), the dtype, the token and byte counts of each split, and
the source with its sha256. Training reads only the windows of each batch from
the files (data.TokenFile), so a corpus never has to fit in memory.

Documents end with <|endoftext|> under a BPE tokenizer. A single text (tiny
shakespeare, one file) is split 90/10 by characters; a collection of
documents sends every k-th one to validation. Tokenising runs on all cores
(a process pool), and every file is written under a temporary name and
renamed when complete, meta.json last: a killed preparation leaves nothing
that looks prepared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import pickle
import sys
import tempfile
import urllib.request
from collections import Counter
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import regex
from tqdm import tqdm

from jaxgpt import cache, data, tokenizer, tokenizer_io, workdir
from jaxgpt.config import ConfigError, DataConfig


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Where a named dataset's text comes from, and how it is tokenised."""

    tokenizer: str  # "char", "gpt2", "bpe:<vocab size>" or a tokenizer .json.
    hf: tuple[str, str | None] | None = None  # (path, config) on the Hub; None: local.
    val_every: int = 10  # Every val_every-th document goes to validation.
    about: str = ""
    files: tuple[Path, ...] = ()  # The local text's files (set by recipe_of).


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
}
BPE_TRAIN_CHARS = 100_000_000  # Our BPE learns its merges from this much text.


# --- Reading prepared datasets -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A prepared dataset: its tokenizer, splits (data.TokenFile) and meta."""

    tokenizer: Any
    splits: dict[str, data.TokenFile]  # "train", "val": their token files.
    meta: dict[str, Any]


def load(folder: Path) -> Dataset:
    """Opens <folder>/{train,val}.bin (read a window at a time); checks them
    against meta.json."""
    meta = json.loads((folder / "meta.json").read_text())
    splits = {}
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        expected = meta[f"{split}_tokens"] * np.dtype(meta["dtype"]).itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise data.DataError(
                f"{path} is missing or not {expected:,} bytes as {folder}/meta.json"
                " says: prepare the dataset again (python -m jaxgpt.prepare"
                f" --dataset={folder.name}) or delete {folder}."
            )
        splits[split] = data.TokenFile(path, meta["dtype"])
    return Dataset(tokenizer_io.from_json(meta["tokenizer"]), splits, meta)


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
        split: data.TokenFile(folder / f"{split}.bin", np.uint16)
        for split in ("train", "val")
    }
    meta = {"dataset": folder.name, "tokenizer": tok.to_json(), "dtype": "uint16"}
    return Dataset(
        tok, splits, meta | {f"{s}_tokens": len(t) for s, t in splits.items()}
    )


def ensure(cfg: DataConfig) -> Dataset:
    """The dataset cfg names, prepared first if it is not (or if its source or
    tokenizer changed). A folder that nanoGPT prepared is read as it is."""
    folder = Path(cfg.data_dir) / cfg.dataset
    meta_path = folder / "meta.json"
    nanogpt = all((folder / f"{split}.bin").is_file() for split in ("train", "val"))
    if not meta_path.is_file() and nanogpt and not cfg.data_path:
        return load_nanogpt(folder)
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        stale = []
        files = local_files(cfg.data_path) if cfg.data_path else ()
        if files and meta.get("fingerprint") != fingerprint(files):
            stale.append(f"--data_path={cfg.data_path} differs from its source")
        if cfg.tokenizer and meta.get("tokenizer_spec") != cfg.tokenizer:
            stale.append(f"--tokenizer={cfg.tokenizer} differs from its tokenizer")
        if not stale:
            return load(folder)
        print(f"re-preparing {folder}: {'; '.join(stale)}.", file=sys.stderr)
    prepare(cfg)
    return load(folder)


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
    if recipe.hf is None:  # Tiny shakespeare is found, or downloaded once.
        files = local_files(cfg.data_path) if cfg.data_path else [find_corpus()]
        recipe = dataclasses.replace(recipe, files=tuple(files))
    return recipe


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
            with path.open(encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield json.loads(line)["text"]
        else:
            yield read_text(path, name)


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


def hf_documents(path: str, name: str | None, limit: int | None) -> Iterator[str]:
    """The "text" of each row of a Hugging Face dataset's train split, streamed."""
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
            yield row["text"]
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
    second = next(docs, None)
    if second is None:
        train_text, val_text = data.split(first)
        yield "train", train_text, False
        yield "val", val_text, False
        return
    for i, doc in enumerate(itertools.chain([first, second], docs)):
        last_of_k = i % recipe.val_every == recipe.val_every - 1
        yield ("val" if last_of_k else "train"), doc, True


# --- Tokenizers ----------------------------------------------------------------


def make_tokenizer(spec: str, cfg: DataConfig, recipe: Recipe):
    """The tokenizer `spec` names, trained on the dataset's text if it learns one."""
    if spec == "gpt2":
        try:
            return tokenizer_io.load_gpt2()
        except ValueError as e:
            raise data.DataError(str(e)) from e
    if spec.endswith(".json"):
        return tokenizer_io.from_json(json.loads(Path(spec).read_text()))
    if os.path.isdir(spec) or "/" in spec:  # A model folder or Hub repository.
        from jaxgpt import llama  # (Imports JAX, which preparing needs not.)

        try:
            return llama.load_tokenizer(llama.find(spec)[1])
        except ValueError as e:
            raise ConfigError(f"--tokenizer={spec}: {e}") from e
    if spec == "char":  # The distinct characters of the whole corpus.
        chars = set()
        for doc in documents(cfg, recipe):
            chars.update(doc)
        return tokenizer.CharTokenizer.train("".join(sorted(chars)))
    if spec.startswith("bpe:") and spec[4:].isdigit():
        sample, size = [], 0
        for split, doc, _ in split_documents(documents(cfg, recipe), recipe):
            if split == "train":
                sample.append(doc[: BPE_TRAIN_CHARS - size])
                size += len(sample[-1])
                if size >= BPE_TRAIN_CHARS:
                    break
        text = "\n".join(sample)
        counts = count_chunks(text, tokenizer.GPT4_PATTERN, (tokenizer.ENDOFTEXT,))
        return tokenizer.BPETokenizer.train(counts, int(spec[4:]))
    raise ConfigError(
        f"--tokenizer={spec} is unknown: use char, gpt2, bpe:<vocab size> (e.g."
        " bpe:4096, trained on the dataset), a tokenizer .json file, or a model"
        " folder or Hub repository holding a tokenizer.json."
    )


PARALLEL_MIN_CHARS = 4_000_000
# A newline after a non-space and before a letter ends a chunk under both
# pre-tokenisers (tokenizer.GPT2_PATTERN, GPT4_PATTERN: no alternative runs
# from a newline into a letter), and the newline forms the same chunk whether
# or not the text ends after it. So text cut there has exactly the chunks of
# the whole.
SAFE_CUT = regex.compile(r"(?<=\S\n)(?=\p{L})")


def split_at_safe_points(text: str, num_pieces: int) -> list[str]:
    """Cuts `text` into about `num_pieces` pieces at chunk boundaries."""
    cuts, step = [0], max(1, len(text) // num_pieces)
    while (m := SAFE_CUT.search(text, cuts[-1] + step)) is not None:
        cuts.append(m.start())
    cuts.append(len(text))
    return [text[a:b] for a, b in pairwise(cuts) if b > a]


def count_chunks(
    text: str, pattern: str, specials=(), num_workers: int | None = None
) -> Counter:
    """tokenizer.count_chunks of `text`, by a process pool (`num_workers`,
    default all cores) for texts over a few MB, cut at safe points."""
    num_workers = num_workers or os.cpu_count() or 1
    if num_workers == 1 or len(text) < PARALLEL_MIN_CHARS:
        return tokenizer.count_chunks(text, pattern, specials)
    pieces = split_at_safe_points(text, 4 * num_workers)
    count = functools.partial(
        tokenizer.count_chunks, pattern=pattern, specials=tuple(specials)
    )
    # spawn, not fork: the caller may hold threads (JAX's), which fork breaks.
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
        counts = Counter()
        for piece_counts in pool.imap_unordered(count, pieces):
            counts.update(piece_counts)
    return counts


_worker = {}  # The tokenizer and end-of-text ids of a pool worker.


def end_of_text(tok) -> np.ndarray:
    """The ids that end a document: <|endoftext|> if the tokenizer has it (a
    Hugging Face tokenizer: its eos token)."""
    eos = getattr(tok, "eos_token", None)  # tokenizer_io.HFTokenizer's.
    if eos is not None and tok.token_id(eos) is not None:
        return np.array([tok.token_id(eos)], np.int32)
    enc = getattr(tok, "encoding", None)  # Char tokenizers have no specials.
    if enc is None or tokenizer.ENDOFTEXT not in enc.special_tokens_set:
        return np.zeros(0, np.int32)
    return np.array([enc.encode_single_token(tokenizer.ENDOFTEXT)], np.int32)


def _init_worker(tokenizer_json: dict) -> None:
    tok = tokenizer_io.from_json(tokenizer_json)
    _worker.update(tok=tok, eot=end_of_text(tok))


def _encode(job: tuple[str, str, bool, bool]) -> tuple[str, np.ndarray, int, bool]:
    """(split, ids, UTF-8 bytes, last piece) of one piece of a text; the last piece
    of a document (not of a lone text) ends with <|endoftext|>."""
    split, text, last, document = job
    ids = _worker["tok"].encode(text)
    if last and document and len(_worker["eot"]):
        ids = np.concatenate([ids, _worker["eot"]])
    return split, ids, len(text.encode("utf-8")), last


# --- Preparing -------------------------------------------------------------------


def prepare(cfg: DataConfig, workers: int | None = None) -> Path:
    """Tokenises the dataset cfg names into <data_dir>/<dataset>/; returns the folder."""
    recipe = recipe_of(cfg)
    folder = Path(cfg.data_dir) / cfg.dataset
    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(recipe.tokenizer, cfg, recipe)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    tmp = {s: folder / f".{s}.bin.tmp-{os.getpid()}" for s in ("train", "val")}
    counts = {f"{s}_{k}": 0 for s in tmp for k in ("tokens", "bytes", "documents")}
    pieces = pieces_of(split_documents(documents(cfg, recipe), recipe))
    try:
        with contextlib.ExitStack() as stack:
            if workers is None:  # A pool pays off on large text only.
                workers = 1 if source_bytes(recipe) < 2**24 else os.cpu_count()
            if workers > 1:
                pool = stack.enter_context(
                    multiprocessing.get_context("spawn").Pool(
                        workers, _init_worker, (tok.to_json(),)
                    )
                )
                encoded = pool.imap(_encode, pieces, chunksize=16)
            else:
                _init_worker(tok.to_json())
                encoded = map(_encode, pieces)
            bar = stack.enter_context(
                tqdm(desc=f"tokenising {cfg.dataset}", unit="doc")
            )
            files = {
                s: stack.enter_context(open(path, "wb")) for s, path in tmp.items()
            }
            for split, ids, n_bytes, last in encoded:
                ids.astype(dtype).tofile(files[split])
                counts[f"{split}_tokens"] += len(ids)
                counts[f"{split}_bytes"] += n_bytes
                counts[f"{split}_documents"] += last
                bar.update(last)
        for split, path in tmp.items():
            os.replace(path, folder / f"{split}.bin")
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    meta = {
        "dataset": cfg.dataset,
        "about": recipe.about,
        "tokenizer_spec": recipe.tokenizer,
        "tokenizer": tok.to_json(),
        "dtype": np.dtype(dtype).name,
        **counts,
        "source": source_of(recipe),
        "fingerprint": fingerprint(recipe.files) if cfg.data_path else None,
    }
    workdir.write_atomically(folder / "meta.json", json.dumps(meta, indent=1))
    print(
        f"{folder}: {counts['train_tokens']:,} train and {counts['val_tokens']:,} val"
        f" tokens ({tok.name}, vocabulary {tok.vocab_size:,}, {np.dtype(dtype).name})",
        file=sys.stderr,
    )
    return folder


def pieces_of(jobs, max_chars: int = 1_000_000) -> Iterator[tuple]:
    """(split, piece, is the last, is a document): long texts cut where the
    pre-tokenisers always cut (SAFE_CUT), so that workers share them and
    the ids are those of the whole text."""
    for split, text, document in jobs:
        start = 0
        while len(text) - start > max_chars:
            cut = SAFE_CUT.search(text, start + max_chars)
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
    if len(files) == 1:
        return {"paths": [str(files[0])], "sha256": sha256_of(files[0])}
    digest = hashlib.sha256()  # Of the files' own digests and names, in order.
    for path in files:
        digest.update(f"{sha256_of(path)}  {path}\n".encode())
    return {"paths": [str(p) for p in files[:20]], "sha256": digest.hexdigest()}


def fingerprint(files) -> list:
    """Cheap identity of local text: each file's path, size and modification time."""
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def main(argv: list[str]) -> None:
    from jaxgpt import cli  # Defines the flags.

    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments: {' '.join(argv[1:])}")
    try:
        prepare(cli.from_flags(DataConfig))
    except (ConfigError, data.DataError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    from absl import app

    from jaxgpt import cli  # noqa: F401  (defines the flags)

    app.run(main)

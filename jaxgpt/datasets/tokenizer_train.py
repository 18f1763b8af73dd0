"""Learning a byte-level BPE's merges from a corpus (tokenizer.py's `BPE`).

Karpathy's minbpe algorithm ("Let's build the GPT tokenizer"): the regex cuts
the text into chunks that merges never cross; the most frequent adjacent pair
of ids becomes a new id, again and again. Training needs each distinct chunk
once with its count (tiny shakespeare: 263k chunks, 15k distinct), counted by
a process pool on large corpora.
"""

from __future__ import annotations

import functools
import heapq
import multiprocessing
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise

import regex

from jaxgpt.tokenizer import BPE, ENDOFTEXT, GPT4_PATTERN, Pair, merge, split_special


def chunk_counts(text: str, pattern: str, specials: Iterable[str] = ()) -> Counter:
    """How often each distinct chunk of `text` occurs (specials left out)."""
    compiled, counts = regex.compile(pattern), Counter()
    for part, is_special in split_special(text, specials):
        if not is_special:
            counts.update(compiled.findall(part))
    return counts


PARALLEL_MIN_CHARS = 4_000_000
# A newline after a non-space and before a letter ends a chunk under both
# pre-tokenisers (GPT-2's and tokenizer.GPT4_PATTERN: no alternative runs
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
    """chunk_counts of `text`, by a process pool (`num_workers`, default all
    cores) for texts over a few MB, cut at safe points."""
    num_workers = num_workers or os.cpu_count() or 1
    if num_workers == 1 or len(text) < PARALLEL_MIN_CHARS:
        return chunk_counts(text, pattern, specials)
    pieces = split_at_safe_points(text, 4 * num_workers)
    count = functools.partial(chunk_counts, pattern=pattern, specials=tuple(specials))
    # spawn, not fork: the caller may hold threads (JAX's), which fork breaks.
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
        counts = Counter()
        for piece_counts in pool.imap_unordered(count, pieces):
            counts.update(piece_counts)
    return counts


def learn_merges(chunk_counts: Mapping[str, int], num_merges: int) -> list[Pair]:
    """Up to `num_merges` merges learned from chunk -> count (ties: smallest pair).

    minbpe rescans the text for each merge: clear, far too slow for 100 MB.
    Here pair_counts (pair -> occurrences, weighted by chunk counts), where
    (pair -> the chunks holding it) and a lazy max-heap are updated only in
    the chunks a merge touched; stale heap entries are skipped when popped.
    """
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
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
        while heap and pair_counts.get(heap[0][1]) != -heap[0][0]:
            heapq.heappop(heap)  # Out of date: its count changed since.
        if not heap:  # Every chunk is one token: nothing left to merge.
            break
        pair = heapq.heappop(heap)[1]
        new_id, changed = 256 + len(merges), set()
        merges.append(pair)
        for w in where.pop(pair):
            old_pairs = Counter(pairwise(words[w]))
            words[w] = merge(words[w], pair, new_id)
            new_pairs = Counter(pairwise(words[w]))
            for p, n in old_pairs.items():
                pair_counts[p] -= n * freqs[w]
            for p, n in new_pairs.items():
                pair_counts[p] += n * freqs[w]
                where[p].add(w)
            for p in old_pairs.keys() - new_pairs.keys() - {pair}:
                where[p].discard(w)
            changed |= old_pairs.keys() | new_pairs.keys()
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:  # Gone from every chunk (the merged pair always is).
                del pair_counts[p]
                where.pop(p, None)
    return merges


def train_bpe(
    text: str | Counter,
    vocab_size: int,
    pattern: str = GPT4_PATTERN,
    special_tokens: Sequence[str] = (ENDOFTEXT,),
) -> BPE:
    """A byte-level BPE of `vocab_size` ids (256 bytes + merges + specials),
    learned from `text` (or its `count_chunks`). Fewer merges are learned if
    the text runs out of pairs."""
    num_merges = vocab_size - 256 - len(special_tokens)
    if num_merges < 0:
        raise ValueError(
            f"vocab_size={vocab_size} is below 256 bytes + {len(special_tokens)}"
            " special tokens."
        )
    counts = (
        count_chunks(text, pattern, special_tokens) if isinstance(text, str) else text
    )
    merges = learn_merges(counts, num_merges)
    specials = {s: 256 + len(merges) + j for j, s in enumerate(special_tokens)}
    return BPE(tuple(merges), pattern, specials)

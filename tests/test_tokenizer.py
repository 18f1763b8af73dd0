import numpy as np
import pytest

from jaxgpt import tokenizer


def test_vocab_is_sorted_distinct_characters():
    assert tokenizer.build_vocab("hello world") == " dehlorw"


def test_round_trip_on_corpus(corpus_text):
    vocab = tokenizer.build_vocab(corpus_text)
    ids = tokenizer.encode(corpus_text[:5000], vocab)
    assert ids.dtype == np.int32 and ids.shape == (5000,)
    assert tokenizer.decode(ids, vocab) == corpus_text[:5000]


def test_ids_follow_sorted_order():
    vocab = tokenizer.build_vocab("cab")
    np.testing.assert_array_equal(tokenizer.encode("abcab", vocab), [0, 1, 2, 0, 1])


def test_unknown_characters_are_named():
    vocab = tokenizer.build_vocab("abc")
    with pytest.raises(ValueError) as err:
        tokenizer.encode("abxcy", vocab)
    assert "'x'" in str(err.value) and "'y'" in str(err.value)


def test_decode_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="token ids"):
        tokenizer.decode([0, 3], "abc")


def test_empty_text_has_no_vocabulary():
    with pytest.raises(ValueError):
        tokenizer.build_vocab("")

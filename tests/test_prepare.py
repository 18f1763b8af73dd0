"""Preparing datasets: token files equal the tokenizer's ids of the text, split as
documented, written atomically; prepared folders (ours and nanoGPT's) load."""

import hashlib
import io
import json
import pickle
import urllib.error
import urllib.request

import numpy as np
import pytest

from jaxgpt import data
from jaxgpt.config import ConfigError
from jaxgpt.datasets import prepare, token_file
from jaxgpt.hub import tokenizer_io
from jaxgpt.run.configs import DataConfig


def cfg(tmp_path, **kw) -> DataConfig:
    return DataConfig(data_dir=str(tmp_path / "data"), **kw)


def test_shakespeare_char_is_the_corpus_split_90_10(tmp_path, corpus_path, corpus_text):
    dataset = prepare.ensure(cfg(tmp_path, data_path=str(corpus_path)))
    tok = dataset.tokenizer
    assert tok.name == "char" and tok.vocab == "".join(sorted(set(corpus_text)))
    train_text, val_text = data.split(corpus_text)
    assert tok.decode(dataset.splits["train"]) == train_text
    assert tok.decode(dataset.splits["val"]) == val_text
    assert dataset.splits["train"].dtype == np.uint16
    assert isinstance(dataset.splits["train"], token_file.TokenFile)
    meta = dataset.meta
    assert meta["train_tokens"] == len(train_text) and meta["val_tokens"] == len(
        val_text
    )
    assert meta["train_bytes"] == len(train_text.encode())
    assert meta["source"]["sha256"] and meta["tokenizer"] == tok.to_json()


def test_shakespeare_with_gpt2_bpe(tmp_path, corpus_path, corpus_text):
    dataset = prepare.ensure(
        cfg(
            tmp_path,
            dataset="shakespeare",
            data_path=str(corpus_path),
            tokenizer="gpt2",
        )
    )
    gpt2 = tokenizer_io.load_gpt2()
    train_text, val_text = data.split(corpus_text)
    np.testing.assert_array_equal(dataset.splits["train"], gpt2.encode(train_text))
    np.testing.assert_array_equal(dataset.splits["val"], gpt2.encode(val_text))
    assert dataset.tokenizer.name == "gpt2" and dataset.meta["dtype"] == "uint16"


def test_tiny_shakespeare_is_nanogpts_shakespeare_char(tmp_path, shakespeare_path):
    """nanoGPT's data/shakespeare_char/prepare.py prints these figures."""
    dataset = prepare.ensure(cfg(tmp_path, data_path=str(shakespeare_path)))
    assert dataset.tokenizer.vocab_size == 65
    assert (dataset.meta["train_tokens"], dataset.meta["val_tokens"]) == (
        1_003_854,
        111_540,
    )


def write_folder(folder, docs):
    """Documents as two .txt files and a .jsonl file, in sorted-name order."""
    folder.mkdir()
    (folder / "a.txt").write_text(docs[0], encoding="utf-8")
    (folder / "b.jsonl").write_text(
        "\n".join(json.dumps({"text": d}) for d in docs[1:-1]) + "\n", encoding="utf-8"
    )
    (folder / "c.txt").write_text(docs[-1], encoding="utf-8")


def test_a_folder_of_documents_every_tenth_to_validation(tmp_path):
    docs = [f"document {i}: {'ab' * i} é\n" for i in range(25)]
    write_folder(tmp_path / "notes", docs)
    dataset = prepare.ensure(
        cfg(
            tmp_path,
            dataset="notes",
            data_path=str(tmp_path / "notes"),
            tokenizer="gpt2",
        )
    )
    tok, eot = dataset.tokenizer, [50256]
    val_docs = [d for i, d in enumerate(docs) if i % 10 == 9]
    train_docs = [d for i, d in enumerate(docs) if i % 10 != 9]
    for split, want in (("train", train_docs), ("val", val_docs)):
        ids = np.concatenate([np.r_[tok.encode(d), eot] for d in want])
        np.testing.assert_array_equal(dataset.splits[split], ids)  # EOT ends each.
        assert dataset.meta[f"{split}_documents"] == len(want)


def test_a_char_dataset_of_documents_has_no_end_of_text(tmp_path):
    docs = ["abc\n", "bcd\n"] * 10
    write_folder(tmp_path / "t", docs)
    dataset = prepare.ensure(cfg(tmp_path, dataset="t", data_path=str(tmp_path / "t")))
    assert dataset.tokenizer.vocab == "\nabcd"
    text = dataset.tokenizer.decode(dataset.splits["train"])
    assert text == "".join(d for i, d in enumerate(docs) if i % 10 != 9)


def test_our_bpe_is_learned_from_the_dataset(tmp_path, corpus_text):
    (tmp_path / "s.txt").write_text(corpus_text[:50_000], encoding="utf-8")
    c = cfg(
        tmp_path, dataset="s", data_path=str(tmp_path / "s.txt"), tokenizer="bpe:300"
    )
    dataset = prepare.ensure(c)
    tok = dataset.tokenizer
    assert tok.name == "bpe" and tok.vocab_size <= 300
    train_text, _ = data.split(corpus_text[:50_000])
    assert tok.decode(dataset.splits["train"]) == train_text
    assert dataset.meta["tokenizer_spec"] == "bpe:300"


def test_streamed_hugging_face_dataset(tmp_path, monkeypatch):
    """Real `datasets` code on a local dataset (a folder with train.jsonl)."""
    pytest.importorskip("datasets")
    hub = tmp_path / "hub"
    hub.mkdir()
    rows = [{"text": f"row {i} says hello.\n"} for i in range(40)]
    (hub / "train.jsonl").write_text("\n".join(map(json.dumps, rows)))
    recipe = prepare.Recipe("gpt2", hf=(str(hub), None), val_every=4)
    monkeypatch.setitem(prepare.DATASETS, "tiny_hub", recipe)
    dataset = prepare.ensure(cfg(tmp_path, dataset="tiny_hub", max_documents=20))
    tok = dataset.tokenizer
    assert dataset.meta["train_documents"] == 15 and dataset.meta["val_documents"] == 5
    want = np.concatenate([np.r_[tok.encode(r["text"]), 50256] for r in rows[3:20:4]])
    np.testing.assert_array_equal(dataset.splits["val"], want)
    assert dataset.meta["source"] == {"hf_path": str(hub), "hf_config": None}


def test_offline_hub_is_one_clear_error(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(data.DataError, match="Hugging Face Hub.*--data_path"):
        prepare.ensure(cfg(tmp_path, dataset="openwebtext"))


def test_a_failed_preparation_leaves_nothing_half_written(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.txt").write_text("good text\n" * 100)
    (folder / "b.txt").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(data.DataError, match="not UTF-8"):
        prepare.ensure(cfg(tmp_path, dataset="bad", data_path=str(folder)))
    out = tmp_path / "data" / "bad"
    assert not out.exists() or not any(out.iterdir())  # No bins, no temporaries.


def test_prepared_data_needs_no_corpus_and_changed_text_is_prepared_again(
    tmp_path, monkeypatch
):
    text = tmp_path / "t.txt"
    text.write_text("hello world\n" * 50)
    first = prepare.ensure(cfg(tmp_path, dataset="t", data_path=str(text)))
    monkeypatch.setattr(
        prepare, "find_corpus", lambda *a: pytest.fail("looked for text")
    )
    again = prepare.ensure(cfg(tmp_path, dataset="t"))  # No --data_path: as prepared.
    assert again.meta == first.meta
    text.write_text("other words\n" * 50)
    changed = prepare.ensure(cfg(tmp_path, dataset="t", data_path=str(text)))
    assert changed.tokenizer.decode(changed.splits["val"]).startswith("other")


def test_damaged_files_are_refused(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world\n" * 50)
    prepare.ensure(cfg(tmp_path, dataset="t", data_path=str(text)))
    train_bin = tmp_path / "data" / "t" / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:-2])
    with pytest.raises(data.DataError, match="train.bin is missing or not"):
        prepare.ensure(cfg(tmp_path, dataset="t"))


def test_nanogpt_prepared_folders_load(tmp_path):
    folder = tmp_path / "data" / "shakespeare_char"
    folder.mkdir(parents=True)
    itos = dict(enumerate("\n abc"))
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 5, "itos": itos, "stoi": {}}, f)
    np.array([2, 3, 4, 1, 0] * 30, np.uint16).tofile(folder / "train.bin")
    np.array([4, 3, 2, 0] * 30, np.uint16).tofile(folder / "val.bin")
    dataset = prepare.ensure(cfg(tmp_path))
    assert dataset.tokenizer.decode(dataset.splits["train"][:5]) == "abc \n"
    assert dataset.meta["train_tokens"] == 150


def no_network(monkeypatch, tmp_path) -> None:
    """No tiny shakespeare on this machine, and a download fails the test."""
    monkeypatch.delenv("JAXGPT_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty_cache"))

    def urlopen(url, timeout):
        raise AssertionError(f"downloads {url}")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def test_unknown_dataset_and_tokenizer_name_the_flag(tmp_path, monkeypatch):
    """Refused before any text is looked for (offline, nothing is downloaded)."""
    no_network(monkeypatch, tmp_path)
    with pytest.raises(ConfigError, match="--dataset=mystery.*--data_path"):
        prepare.ensure(cfg(tmp_path, dataset="mystery"))
    with pytest.raises(ConfigError, match="--tokenizer=wordpiece"):
        prepare.ensure(cfg(tmp_path, dataset="shakespeare_char", tokenizer="wordpiece"))
    with pytest.raises(ConfigError, match="--dataset="):
        DataConfig(dataset="../escape")
    assert not (tmp_path / "data").exists()


def test_other_text_is_not_taken_for_tiny_shakespeare(tmp_path, monkeypatch, capsys):
    """A shakespeare_char prepared from --data_path's other text (as a test's
    generated corpus once was, in the checkout's data/) is prepared again from
    tiny shakespeare when the next run asks for it; the same text is kept."""
    real = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50
    env_dir = tmp_path / "env"
    (env_dir / "tinyshakespeare").mkdir(parents=True)
    (env_dir / "tinyshakespeare" / "input.txt").write_text(real)
    monkeypatch.setattr(
        prepare, "TINYSHAKESPEARE_SHA256", hashlib.sha256(real.encode()).hexdigest()
    )
    monkeypatch.setenv("JAXGPT_DATA_DIR", str(env_dir))
    other = tmp_path / "other.txt"
    other.write_text("zzz yyy xxx\n" * 300)
    prepare.ensure(cfg(tmp_path, data_path=str(other)))
    dataset = prepare.ensure(cfg(tmp_path))
    assert (
        f"re-preparing {tmp_path / 'data' / 'shakespeare_char'}"
        in capsys.readouterr().err
    )
    assert dataset.tokenizer.vocab == "".join(sorted(set(real)))
    assert dataset.meta["source"]["sha256"] == prepare.TINYSHAKESPEARE_SHA256
    prepare.ensure(cfg(tmp_path))  # Tiny shakespeare now: read as it is.
    assert "re-preparing" not in capsys.readouterr().err


def test_a_streamed_dataset_of_other_text_is_refused(tmp_path, monkeypatch):
    no_network(monkeypatch, tmp_path)
    text = tmp_path / "pages.txt"
    text.write_text("a web page\n" * 100)
    prepare.ensure(cfg(tmp_path, dataset="openwebtext", data_path=str(text)))
    with pytest.raises(data.DataError, match=f"holds text from {text}.*--data_path"):
        prepare.ensure(cfg(tmp_path, dataset="openwebtext"))


def test_a_failed_preparation_leaves_no_folder(tmp_path, monkeypatch, corpus_path):
    def offline_gpt2():
        raise ValueError("GPT-2's tokenizer files were not found")

    monkeypatch.setattr(tokenizer_io, "load_gpt2", offline_gpt2)
    shakespeare = cfg(tmp_path, dataset="shakespeare", data_path=str(corpus_path))
    with pytest.raises(data.DataError, match="GPT-2's tokenizer"):
        prepare.ensure(shakespeare)
    assert not (tmp_path / "data" / "shakespeare").exists()

    def broken(job):
        raise OSError("disk gone")

    monkeypatch.setattr(prepare, "_encode", broken)
    with pytest.raises(OSError, match="disk gone"):
        prepare.ensure(cfg(tmp_path, data_path=str(corpus_path)))
    assert not (tmp_path / "data").exists()  # Nor the --data_dir it made.


# --- Finding tiny shakespeare ---------------------------------------------------


def test_data_path_comes_first(tmp_path, monkeypatch):
    path = tmp_path / "mine.txt"
    path.write_text("abc")
    monkeypatch.setenv("JAXGPT_DATA_DIR", str(tmp_path / "nowhere"))
    assert prepare.find_corpus(str(path)) == path
    with pytest.raises(data.DataError, match="--data_path"):
        prepare.find_corpus(str(tmp_path / "missing.txt"))


def test_env_dir_then_cache_then_download(tmp_path, monkeypatch):
    payload = b"to be or not to be\n"
    monkeypatch.setattr(
        prepare, "TINYSHAKESPEARE_SHA256", hashlib.sha256(payload).hexdigest()
    )
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    env_dir = tmp_path / "env"
    (env_dir / "tinyshakespeare").mkdir(parents=True)
    (env_dir / "tinyshakespeare" / "input.txt").write_bytes(payload)
    monkeypatch.setenv("JAXGPT_DATA_DIR", str(env_dir))
    assert prepare.find_corpus() == env_dir / "tinyshakespeare" / "input.txt"

    monkeypatch.delenv("JAXGPT_DATA_DIR")
    calls = []

    def fake_urlopen(url, timeout):
        calls.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    downloaded = prepare.find_corpus()
    assert downloaded == tmp_path / "cache" / "jaxgpt" / "tinyshakespeare" / "input.txt"
    assert downloaded.read_bytes() == payload and calls == [prepare.TINYSHAKESPEARE_URL]
    assert prepare.find_corpus() == downloaded and len(calls) == 1  # Cached now.


def test_corrupt_download_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXGPT_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(
        urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"x")
    )
    with pytest.raises(data.DataError, match="sha256"):
        prepare.find_corpus()
    assert not (tmp_path / "jaxgpt" / "tinyshakespeare" / "input.txt").exists()


def test_offline_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXGPT_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(data.DataError, match="--data_path.*JAXGPT_DATA_DIR"):
        prepare.find_corpus()

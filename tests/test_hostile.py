"""Hostile inputs: each ends in one clear line, loses nothing, never hangs.

An empty --workdir, --overwrite beside files jaxgpt did not write, checkpoint
folders renamed or copied to another step, a dataset's source or token files
changed behind its meta, a failed save, sizes that cannot fit in memory, a
seed beyond 64 bits, Ctrl-C while preparing, names of the workdir of the
wrong kind, and splits left empty. The runs are test_faults' tiny model (its
fixtures); those that need a trained workdir share its `pristine` one.
"""

# ruff: noqa: F811 (the fixtures imported from test_faults are arguments here)

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_faults import (  # noqa: F401 (fixtures)
    RUN,
    assert_clean,
    assert_error,
    assert_same_checkpoint,
    command,
    copy,
    corpus,
    env,
    jaxgpt,
    main_error,
    pristine,
    saved,
    steps,
    tree,
)

from jaxgpt import data, tokenizer
from jaxgpt.datasets import prepare
from jaxgpt.run import checkpoint as ckpt
from jaxgpt.run.configs import DataConfig

pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)

# --- --workdir and --overwrite: nothing of the user's is deleted ------------------------


@pytest.mark.parametrize("workdir", ["", "  "])
def test_an_empty_workdir_is_refused_not_taken_for_the_current_folder(
    workdir, tmp_path, monkeypatch, main_error
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    line = main_error(workdir, overwrite=True)
    assert f"--workdir={workdir!r} names no folder" in line, line
    assert tree(tmp_path) == before


def test_overwrite_refuses_a_workdir_holding_files_jaxgpt_did_not_write(
    copy, main_error
):
    for foreign in ("checkpoints/notes.txt", "best/20/mine", "damaged/photos"):
        path = copy / foreign
        path.parent.mkdir(exist_ok=True)
        path.write_text("the user's")
        before = tree(copy)
        line = main_error(copy, overwrite=True)
        assert f"{path} is not one of them" in line and "--overwrite" in line, line
        assert tree(copy) == before
        path.unlink()


def test_overwrite_deletes_only_what_jaxgpt_wrote(copy):
    (copy / "notes.txt").write_text("the user's")  # Beside, not in, its folders.
    (copy / "damaged" / "checkpoints-15").mkdir(parents=True)
    events = sorted(p.name for p in copy.glob("events.out.tfevents.*"))
    ckpt.clear(copy)
    left = sorted(p.name for p in copy.iterdir())
    assert left == sorted(["notes.txt", *events]), left


# --- A step folder that is not its step ---------------------------------------------------


def test_a_step_folder_copied_over_a_later_one_is_damaged_and_the_step_saved_again(
    copy, pristine, jaxgpt
):
    """checkpoints/20 replaced by a copy of 15 (best/20 gone too): the copy is
    named and moved aside, the run resumes from 15 and saves step 20 again,
    equal to the uninterrupted run's."""
    shutil.rmtree(copy / "checkpoints" / "20")
    shutil.rmtree(copy / "best" / "20")
    shutil.copytree(copy / "checkpoints" / "15", copy / "checkpoints" / "20")
    done = jaxgpt(copy, *RUN)
    assert_clean(done)
    assert "holds step 15" in done.stderr and "not step 20" in done.stderr
    assert (copy / "damaged" / "checkpoints-20").is_dir()
    assert steps(copy) == [10, 15, 20]
    assert_same_checkpoint(copy, pristine, step=20)


def test_a_step_folder_renamed_to_a_later_step_is_not_resumed(copy):
    target, _ = saved(copy, step=20)
    (copy / "checkpoints" / "15").rename(copy / "checkpoints" / "40")
    said = []
    with ckpt.Checkpointer(copy) as checkpointer:
        state, meta = checkpointer.resume(target, say=said.append)
    assert int(state.step) == 20 and meta["step"] == 20
    assert any("step 40" in s and "holds step 15" in s for s in said), said
    assert (copy / "damaged" / "checkpoints-40").is_dir()


# --- A dataset's source and token files changed behind its meta ---------------------------


def data_cfg(tmp_path: Path, text: str, name: str = "input.txt") -> DataConfig:
    source = tmp_path / name
    source.write_text(text, encoding="utf-8")
    return DataConfig(data_path=str(source), data_dir=str(tmp_path / "data"))


def test_a_source_edited_in_place_with_its_time_put_back_is_prepared_again(
    tmp_path, corpus_text
):
    cfg = data_cfg(tmp_path, corpus_text[:20_000])
    source = Path(cfg.data_path)
    first = prepare.ensure(cfg)
    stat = source.stat()
    edited = corpus_text[:20_000].swapcase()  # Same size (ASCII), other text.
    assert len(edited.encode()) == stat.st_size and edited != corpus_text[:20_000]
    source.write_text(edited, encoding="utf-8")
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert prepare.fingerprint([source]) == first.meta["fingerprint"]
    dataset = prepare.ensure(cfg)
    assert dataset.meta["source"]["sha256"] == prepare.sha256_of(source)
    train = dataset.tokenizer.decode(np.asarray(dataset.splits["train"]))
    assert train == data.split(edited)[0]


@pytest.mark.parametrize("chunk", [None, 4096], ids=["one chunk", "many chunks"])
def test_a_token_file_zeroed_in_the_middle_is_one_line(
    chunk, tmp_path, corpus_text, monkeypatch
):
    if chunk:
        monkeypatch.setattr(prepare, "CHUNK_BYTES", chunk)
    cfg = data_cfg(tmp_path, corpus_text * 4)  # train.bin: over 400 KB.
    folder = prepare.prepare(cfg)
    train = folder / "train.bin"
    size = train.stat().st_size
    with open(train, "r+b") as f:
        f.seek(size // 2 - 100_000)
        f.write(bytes(200_000))
    assert train.stat().st_size == size
    with pytest.raises(data.DataError) as e:
        prepare.ensure(cfg)
    line = str(e.value)
    assert f"{train} differs from the sha256" in line and "prepare it again" in line
    if chunk:  # Larger than VERIFY_BYTES: checked in evenly spaced chunks.
        monkeypatch.setattr(prepare, "VERIFY_BYTES", 4 * chunk)
        with pytest.raises(data.DataError, match="differs from the sha256"):
            prepare.load(folder)


def test_a_dataset_prepared_before_token_checksums_still_loads(tmp_path, corpus_text):
    cfg = data_cfg(tmp_path, corpus_text[:20_000])
    folder = prepare.prepare(cfg)
    meta = json.loads((folder / "meta.json").read_text())
    del meta["token_sha256"]
    (folder / "meta.json").write_text(json.dumps(meta))
    assert len(prepare.ensure(cfg).splits["train"]) == meta["train_tokens"]


def test_chunk_sums_do_not_depend_on_how_the_bytes_come():
    payload = np.random.default_rng(0).bytes(10_000)
    whole, pieces = prepare.ChunkSums(4096), prepare.ChunkSums(4096)
    whole.update(payload)
    for a in range(0, len(payload), 777):
        pieces.update(payload[a : a + 777])
    import hashlib

    want = [hashlib.sha256(payload[a : a + 4096]).hexdigest() for a in (0, 4096, 8192)]
    assert whole.result() == pieces.result() == want


# --- Splits that would be empty -----------------------------------------------------------


def test_a_one_character_corpus_is_refused_and_writes_nothing(tmp_path):
    cfg = data_cfg(tmp_path, "a")
    with pytest.raises(data.DataError) as e:
        prepare.prepare(cfg)
    assert "0 train and 1 val tokens" in str(e.value), e.value
    assert "give it more text" in str(e.value)
    assert not (tmp_path / "data").exists()


def test_fewer_documents_than_one_in_k_still_give_a_val_split(tmp_path, corpus_text):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text(corpus_text[:30_000])
    (notes / "b.txt").write_text(corpus_text[30_000:33_000])
    cfg = DataConfig(
        dataset="notes", data_path=str(notes), data_dir=str(tmp_path / "data")
    )
    meta = prepare.ensure(cfg).meta
    assert (meta["train_documents"], meta["val_documents"]) == (1, 1)
    assert (meta["train_tokens"], meta["val_tokens"]) == (30_000, 3_000)


# --- Ctrl-C while preparing ---------------------------------------------------------------


def test_ctrl_c_while_preparing_is_one_line_exit_130_and_leaves_nothing(tmp_path, env):
    """The source's second file is a pipe that the test holds open and never
    writes: tokenising (its temporary files open) waits on it, and is
    interrupted. A given tokenizer .json: the text is read once."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("to be or not to be\n" * 500)
    pipe = notes / "b.txt"
    os.mkfifo(pipe)
    tok = tmp_path / "tok.json"
    tok.write_text(json.dumps(tokenizer.CharTokenizer.train(" \nbenort").to_json()))
    data_dir = tmp_path / "data"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "jaxgpt.datasets.prepare", "--dataset=notes",
            f"--data_path={notes}", f"--data_dir={data_dir}", f"--tokenizer={tok}",
        ],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    with open(pipe, "w"):  # Returns once the preparation opens it to read.
        assert list((data_dir / "notes").glob(".*.tmp-*"))  # Mid-preparation.
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stopped by SIGINT" in errors[0], stderr
    assert "unfinished files are deleted" in errors[0]
    assert not data_dir.exists()  # Made by this preparation, and emptied.


# --- Hangs: a failed save, sizes that cannot fit ------------------------------------------


def test_a_failed_best_save_ends_the_run_in_one_line(tmp_path, env, corpus):
    """best/ a file, past the start-up check (disabled here): the save of step
    0's best fails in the background; the run ends at its next check."""
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "best").write_text("not a folder")
    program = (
        "import runpy, sys\n"
        "from jaxgpt.run import workdir\n"
        "workdir.check_names = lambda path: None\n"
        "runpy.run_module('jaxgpt.main', run_name='__main__', alter_sys=True)\n"
    )
    args = command(corpus, wd, *RUN)[3:]  # The flags, after `python -m jaxgpt.main`.
    done = subprocess.run(
        [sys.executable, "-c", program, *args],
        env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    line = assert_error(done, "could not save the checkpoint of step 0", "best/0")
    assert "run the same command again" in line
    assert 0 in steps(wd)  # The latest save of step 0 stays.


def test_sizes_that_cannot_fit_in_memory_are_refused_before_allocating(
    tmp_path, main_error, pristine
):
    wd = tmp_path / "wd"
    line = main_error(wd, batch_size=10**9)
    assert "--batch_size=1000000000" in line and "GB, more than" in line, line
    assert "logits" in line
    assert not wd.exists()
    before = tree(pristine)
    line = main_error(pristine, mode="sample", num_samples=10**10)
    assert "--num_samples=10000000000" in line and "GB, more than" in line, line
    assert tree(pristine) == before


def test_a_seed_beyond_64_bits_is_one_line(tmp_path, main_error):
    line = main_error(tmp_path / "wd", seed=18446744073709551617)
    assert "--seed=18446744073709551617 does not fit in 64 bits" in line


# --- Names of the workdir of the wrong kind -----------------------------------------------

WRONG_KIND = {  # name -> make it the other kind
    "best": "file",
    "damaged": "file",
    "checkpoints": "file",
    "lock": "folder",
    "metrics.jsonl": "folder",
}


@pytest.mark.parametrize("name", WRONG_KIND)
def test_a_workdir_name_of_the_wrong_kind_is_one_line_naming_it(name, copy, main_error):
    path = copy / name
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    if WRONG_KIND[name] == "file":
        path.write_text("x")
    else:
        path.mkdir()
    before = tree(copy)
    line = main_error(copy)
    assert f"{path} is not a {'folder' if WRONG_KIND[name] == 'file' else 'file'}" in (
        line
    ), line
    assert "Move it away" in line
    assert tree(copy) == before

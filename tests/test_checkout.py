"""The guard in conftest.py: what a test run writes into the checkout is seen
(the run then fails, naming the paths), and nothing else."""

import os

from conftest import changes, checkout_state


def test_a_prepared_dataset_and_a_changed_file_are_seen(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "README.md").write_text("datasets\n")
    (tmp_path / "loss.png").write_bytes(b"old")
    before = checkout_state(tmp_path)
    (tmp_path / "data" / "shakespeare_char").mkdir()
    (tmp_path / "data" / "shakespeare_char" / "meta.json").write_text("{}")
    (tmp_path / "loss.png").write_bytes(b"a new plot")
    (tmp_path / "out").mkdir()  # An empty folder is a change too.
    assert changes(before, checkout_state(tmp_path)) == [
        "new: data/shakespeare_char/",
        "new: data/shakespeare_char/meta.json",
        "new: out/",
        "changed: loss.png",
    ]


def test_a_rewrite_of_the_same_size_is_seen(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text('{"vocab": 65}')
    before = checkout_state(tmp_path)
    path.write_text('{"vocab": 47}')
    os.utime(path, ns=(0, before["meta.json"][1] + 1))
    assert changes(before, checkout_state(tmp_path)) == ["changed: meta.json"]


def test_caches_and_virtualenvs_are_not_the_tests_writing(tmp_path):
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / "pyvenv.cfg").write_text("home = /usr\n")
    before = checkout_state(tmp_path)
    for folder in ("__pycache__", ".pytest_cache", ".git", "tests/__pycache__"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "x").write_text("cache")
    (tmp_path / "venv" / "lib").mkdir()
    after = checkout_state(tmp_path)
    assert changes(before, after) == ["new: tests/"]  # The folder, not its cache.

"""Every command's refusal is one `error:` line (run/errors.py) and a non-zero
exit, never a traceback or a page of usage; and the tokenising progress."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import types

import pytest
from absl import flags

from jaxgpt import tokenizer
from jaxgpt.config import ConfigError, ModelConfig
from jaxgpt.datasets import prepare
from jaxgpt.run import cli, errors
from jaxgpt.run.configs import DataConfig

HAS_LM_EVAL = True
try:
    import lm_eval  # noqa: F401
except ImportError:
    HAS_LM_EVAL = False

# Runs a module as `python -m` does, with lm_eval made unimportable first.
WITHOUT_LM_EVAL = (
    "import runpy, sys; sys.modules['lm_eval'] = None; "
    "runpy.run_module(sys.argv[1], run_name='__main__', alter_sys=True)"
)

# (command: python's arguments, the one line it must end with, exactly)
CASES = {
    "main: a word that is no flag": (
        ["-m", "jaxgpt.main", "extra"],
        "error: unexpected arguments: extra (flags start with --; see --help).",
    ),
    "main: a misspelt flag": (
        ["-m", "jaxgpt.main", "--n_layr=3"],
        "error: unknown flag --n_layr (did you mean --n_layer?); see --help.",
    ),
    "main: a missing flagfile": (
        ["-m", "jaxgpt.main", "--flagfile=nope.cfg"],
        "error: --flagfile=nope.cfg: no such file.",
    ),
    "main: a value of the wrong type": (
        ["-m", "jaxgpt.main", "--n_layer=two"],
        (
            "error: --n_layer=two: invalid literal for int() with base 10: 'two';"
            " see --help."
        ),
    ),
    "prepare: a word that is no flag": (
        ["-m", "jaxgpt.datasets.prepare", "--dataset=x", "extra", "words"],
        "error: unexpected arguments: extra words (flags start with --; see --help).",
    ),
    "prepare: a misspelt flag": (
        ["-m", "jaxgpt.datasets.prepare", "--datset=x"],
        "error: unknown flag --datset (did you mean --dataset?); see --help.",
    ),
    "prepare: a text that is not there": (
        ["-m", "jaxgpt.datasets.prepare", "--dataset=x", "--data_path=nope.txt"],
        "error: --data_path=nope.txt is not a file or a folder.",
    ),
    "harness without lm-eval": (
        ["-c", WITHOUT_LM_EVAL, "jaxgpt.evals.harness", "--tasks=hellaswag"],
        (
            "error: python -m jaxgpt.evals.harness needs lm-evaluation-harness"
            " (import of lm_eval halted; None in sys.modules): pip install -e"
            " '.[eval]'."
        ),
    ),
    "bigram: a word that is no flag": (
        ["-m", "jaxgpt.micrograd.bigram", "extra"],
        "error: unrecognized arguments: extra; see --help.",
    ),
    "bigram: a text that is not there": (
        ["-m", "jaxgpt.micrograd.bigram", "--data_path=nope.txt"],
        "error: --data_path=nope.txt is not a file.",
    ),
    "plot: a folder that is no run": (
        ["-m", "jaxgpt.tools.plot", "nope"],
        "error: nope/metrics.jsonl not found: is nope a run's --workdir?",
    ),
    "plot: no run named": (
        ["-m", "jaxgpt.tools.plot"],
        "error: the following arguments are required: runs; see --help.",
    ),
    "chat_tasks: no --out": (
        ["-m", "jaxgpt.datasets.chat_tasks"],
        "error: the following arguments are required: --out; see --help.",
    ),
}
if HAS_LM_EVAL:
    CASES["harness: a task lm-eval does not have"] = (
        [
            *("-m", "jaxgpt.evals.harness", "--model", "jaxgpt"),
            *("--model_args", "init_from=X", "--tasks=no_such_task"),
        ],
        (
            "error: --tasks: lm-eval has no task 'no_such_task' (`lm_eval ls tasks`"
            " lists them; --include_path adds a folder of task yamls)."
        ),
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_refusal_is_one_error_line(case, tmp_path):
    args, line = CASES[case]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run(
        [sys.executable, *args],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode != 0, p.stderr
    lines = [s for s in (p.stdout + p.stderr).splitlines() if s.strip()]
    assert lines == [line], p.stdout + p.stderr


def test_micrograd_runs_without_jax():
    code = "import sys, jaxgpt.micrograd.bigram; print('jax' in sys.modules)"
    p = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.stdout.strip() == "False", p.stderr


@pytest.mark.parametrize(
    "argv, line",
    [
        (["p", "--mode=bad"], "error: --mode=bad: value should be one of"),
        (["p", "--n_layer"], "error: missing value for flag --n_layer; see --help."),
        (["p", "--nocompil"], "error: unknown flag --nocompil"),
        (["p", "--nofoo_bar_baz"], "error: unknown flag --nofoo_bar_baz; see --help."),
    ],
)
def test_flag_errors_are_one_line(argv, line):
    before = list(sys.argv)
    try:
        with pytest.raises(SystemExit) as e:
            cli.parse_flags(argv)
    finally:
        cli.FLAGS.unparse_flags()
        sys.argv = before
    assert str(e.value.code).startswith(line), e.value.code
    assert "\n" not in str(e.value.code)


def test_an_unreadable_flagfile_names_it(tmp_path):
    folder = tmp_path / "a.cfg"
    folder.mkdir()  # A folder, not a file: open() refuses it.
    try:
        flags.FLAGS(["p", f"--flagfile={folder}"])
    except flags.Error as err:
        line = errors.flag_error_line(err, cli.flag_names())
    finally:
        cli.FLAGS.unparse_flags()
    assert line.startswith(f"error: --flagfile={folder}: cannot read it ("), line


def fake_dataset(tok) -> prepare.Dataset:
    return prepare.Dataset(tok, {}, {"dataset": "owt"})


def test_check_fits_names_the_fix_of_the_models_tokenizer():
    """A char model is pointed at its own text, never at GPT-2's BPE; a GPT-2
    model at GPT-2's BPE."""
    char_model = tokenizer.CharTokenizer("abc")
    cfg = ModelConfig(vocab_size=3, block_size=8)
    with pytest.raises(ConfigError) as e:
        prepare.check_fits(
            fake_dataset(tokenizer.CharTokenizer("abcd")), cfg, char_model
        )
    message = str(e.value)
    assert "--tokenizer=char from the text it was trained on" in message
    assert "GPT-2" not in message and "gpt2" not in message
    gpt2 = types.SimpleNamespace(
        name="gpt2", vocab_size=50257, to_json=lambda: {"g": 2}
    )
    with pytest.raises(ConfigError) as e:
        prepare.check_fits(fake_dataset(char_model), cfg, gpt2)
    assert "--tokenizer=gpt2" in str(e.value)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_one_text_is_counted_in_bytes_once(tmp_path, monkeypatch, terminal):
    text = "hé, a small text\n" * 1000  # é: two bytes.
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    n_bytes = len(text.encode("utf-8"))
    err = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    data_dir = str(tmp_path / "data")
    prepare.prepare(
        DataConfig(
            dataset="t", data_path=str(path), tokenizer="char", data_dir=data_dir
        )
    )
    lines = err.getvalue().rstrip("\n").split("\n")  # Not at \r.
    summary = f"from {n_bytes:,} bytes of text (char,"
    assert sum(summary in s for s in lines) == 1, lines
    if not terminal:
        assert len(lines) == 1, lines  # The summary alone: no bar in a log.
        return
    bar = lines[0].split("\r")[-1]  # The bar's last state.
    assert len(lines) == 2, lines
    assert "100%" in bar and "B/s" in bar and "doc" not in bar, bar


def test_a_collection_is_counted_in_documents(tmp_path, monkeypatch):
    docs = [f"document number {i}" for i in range(12)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(f'{{"text": "{d}"}}\n' for d in docs), encoding="utf-8")
    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    prepare.prepare(
        DataConfig(
            dataset="d",
            data_path=str(path),
            tokenizer="char",
            data_dir=str(tmp_path / "data"),
        )
    )
    lines = err.getvalue().rstrip("\n").split("\n")  # Not at \r.
    assert len(lines) == 2, lines
    assert "12 documents" in lines[0].split("\r")[-1], lines
    assert "from 12 documents (char," in lines[1], lines

"""HellaSwag in the training loop: its data, its scores against a direct
computation (one unpadded forward pass per ending, numpy), on one device and
on a mesh of 4 fake CPU devices (this file run as a script in a subprocess),
and its errors. The equality with lm-evaluation-harness's acc_norm is in
tests/test_evals.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from absl.testing import flagsaver

from jaxgpt import lecture, main, sharding
from jaxgpt.config import ConfigError, ModelConfig
from jaxgpt.evals import hellaswag
from jaxgpt.tokenizer import CharTokenizer

REPO = Path(__file__).resolve().parent.parent
COMPILE = "/jax/core/compile/backend_compile_duration"  # jax.monitoring's event.
CFG = ModelConfig(vocab_size=60, block_size=32, n_layer=2, n_head=2, n_embd=32)
# Letters and a few signs: HellaSwag's digits and brackets are not in it.
TOK = CharTokenizer(" ,.:'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!?")


def rows(n: int = 7) -> list[dict]:
    """HellaSwag-schema rows; some longer than the window, with WikiHow's
    bracketed artifacts and digits."""
    return [
        {
            "activity_label": f"Task {i}",
            "label": str(i % 4),
            "ctx_a": "A woman opens a box [title] and looks inside." * (1 + i % 3),
            "ctx_b": "she",
            "endings": [
                "takes out a cat.",
                "closes it [step] again",
                f"counts to {i}.",
                "leaves the room and never comes back",
            ],
        }
        for i in range(n)
    ]


def direct_log_likelihoods(params, examples) -> np.ndarray:
    """Each ending's log-likelihood from its own unpadded forward pass."""
    apply = lecture.make_model(CFG).apply  # Eagerly: one shape per ending.
    encode = lambda s: [TOK.stoi.get(c, TOK.stoi[" "]) for c in s]
    out = []
    for row in examples:
        query, endings = hellaswag.query_and_endings(row)
        lls = []
        for ending in endings:
            ctx, cont = encode(query), encode(" " + ending)
            seq = (ctx + cont)[-(CFG.block_size + 1) :]
            logits = np.asarray(apply({"params": params}, np.array([seq[:-1]])))[0]
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            picked = logp[np.arange(len(seq) - 1), seq[1:]]
            lls.append(picked[-min(len(cont), len(seq) - 1) :].sum())
        out.append(lls)
    return np.array(out)


def scores(mesh, batch_rows: int = 8) -> dict:
    """The endings' log-likelihoods and the accuracies of rows() on `mesh`."""
    params = lecture.init_params(CFG, jax.random.PRNGKey(0))
    fn = hellaswag.make_log_likelihoods(CFG, TOK, rows(), mesh, batch_rows)
    evaluate = hellaswag.make_evaluate(CFG, TOK, rows(), mesh, batch_rows)
    return {"ll": fn(params).tolist(), **evaluate(params)}


@pytest.fixture(scope="module")
def one_device():
    """rows() on one device (7 examples in batches of 2, the last padded;
    contexts cut to the window), and the direct computation."""
    params = lecture.init_params(CFG, jax.random.PRNGKey(0))
    direct = direct_log_likelihoods(params, rows())
    return {**scores(sharding.make_mesh()), "direct": direct}


def test_scores_equal_a_direct_computation(one_device):
    got, ll = one_device, one_device["direct"]
    np.testing.assert_allclose(got["ll"], ll, atol=1e-4, rtol=0)
    chars, labels = hellaswag.answers(rows())
    assert got["hellaswag_acc"] == np.mean(ll.argmax(1) == labels)
    assert got["hellaswag_acc_norm"] == np.mean((ll / chars).argmax(1) == labels)


def test_one_compilation_serves_every_evaluation():
    """New parameters at each evaluation (as training makes them) compile nothing."""
    compiles = []
    listener = lambda event, secs, **kw: compiles.append(event)
    params = lecture.init_params(CFG, jax.random.PRNGKey(0))
    later = jax.tree.map(lambda x: x * 1.5, params)
    evaluate = hellaswag.make_evaluate(CFG, TOK, rows(), sharding.make_mesh(), 8)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        evaluate(params)
        n_first = compiles.count(COMPILE)
        evaluate(later)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert n_first >= 1 and compiles.count(COMPILE) == n_first


def test_cleaning_is_the_harness_hellaswag_cleaning():
    query, endings = hellaswag.query_and_endings(rows()[0])
    assert query == "Task 0: A woman opens a box. and looks inside. She"
    assert endings[1] == "closes it again"


@pytest.fixture(scope="module")
def mesh_report():
    done = subprocess.run(
        [sys.executable, __file__],
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)},
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shape", ["4x1", "2x2"])
def test_a_mesh_of_devices_scores_as_one_device(mesh_report, one_device, shape):
    """Examples split over data-parallel devices (and FSDP's parameter shards)."""
    got = mesh_report[shape]
    np.testing.assert_allclose(got["ll"], one_device["direct"], atol=1e-4, rtol=0)
    assert got["hellaswag_acc"] == one_device["hellaswag_acc"]
    assert got["hellaswag_acc_norm"] == one_device["hellaswag_acc_norm"]


# --- The data --------------------------------------------------------------------


def write(path: Path, lines: list) -> Path:
    path.write_text(
        "".join(x if isinstance(x, str) else json.dumps(x) + "\n" for x in lines)
    )
    return path


@pytest.mark.parametrize(
    "lines,words",
    [
        ([rows(1)[0], {**rows(1)[0], "label": "7"}], ["line 2", "label '7'"]),
        (
            [{k: v for k, v in rows(1)[0].items() if k != "ctx_b"}],
            ["line 1", "'ctx_b'"],
        ),
        ([{**rows(1)[0], "endings": ["a", "b"]}], ["2 endings"]),
        (["not json\n"], ["line 1"]),
        ([], ["no examples"]),
    ],
)
def test_bad_data_is_one_line_naming_the_flag(tmp_path, lines, words):
    path = write(tmp_path / "h.jsonl", lines)
    with pytest.raises(ConfigError) as e:
        hellaswag.load_examples(str(path), tmp_path)
    message = str(e.value)
    assert "\n" not in message and f"--eval_data_path={path}" in message
    assert all(w in message for w in words), message


def test_fetched_once_then_read_from_the_kept_copy(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    fetched = [{**row, "ind": i, "source_id": "x"} for i, row in enumerate(rows(3))]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: fetched)
    assert hellaswag.load_examples(None, tmp_path) == rows(3)
    kept = hellaswag.cached_path(tmp_path)
    assert kept == tmp_path / "hellaswag" / "validation.jsonl" and kept.is_file()

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert hellaswag.load_examples(None, tmp_path) == rows(3)  # No second fetch.


@pytest.fixture
def parsed_flags():
    main.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver():
        yield


def test_a_run_without_the_data_says_how_to_get_it(
    tmp_path, monkeypatch, corpus_path, parsed_flags
):
    """Offline with no copy: one line naming --eval_data_path, before training."""
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    settings = {
        "data_path": str(corpus_path), "data_dir": str(tmp_path / "data"),
        "workdir": str(tmp_path / "wd"), "max_iters": 2, "warmup_iters": 0,
        "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16,
        "eval_tasks": "hellaswag", "tensorboard": False, "peak_tflops": 1.0,
    }  # fmt: skip
    with flagsaver.flagsaver(**settings), pytest.raises(SystemExit) as exit_:
        main.main(["jaxgpt.main"])
    message = str(exit_.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert "--eval_data_path" in message and "Couldn't reach" in message
    assert not (tmp_path / "wd" / "metrics.jsonl").exists()  # Nothing trained.


@pytest.mark.parametrize(
    "settings,words",
    [
        ({"tasks": "hellaswag"}, ["--tasks", "--mode=eval", "--eval_tasks=hellaswag"]),
        ({"eval_tasks": "hellaswag,mmlu"}, ["'mmlu'", "--mode=eval --tasks"]),
        ({"eval_tasks": " , "}, ["--eval_tasks is empty"]),
        ({"eval_task_examples": 0}, ["--eval_task_examples=0"]),
    ],
)
def test_task_flags_end_in_one_clear_message(settings, words, parsed_flags):
    with flagsaver.flagsaver(**settings), pytest.raises(SystemExit) as exit_:
        main.main(["jaxgpt.main"])
    message = str(exit_.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert all(w in message for w in words), message


if __name__ == "__main__":  # 4 fake CPU devices: the meshes the tests above read.
    jax.config.update("jax_num_cpu_devices", 4)
    report = {
        f"{d}x{f}": scores(sharding.make_mesh(d, f), batch_rows=16)
        for d, f in ((4, 1), (2, 2))
    }
    print(json.dumps(report))

"""End to end: `python -m jaxgpt.main` with a tiny flagfile, and its flag errors."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import pytest
from absl import flags
from absl.testing import flagsaver
from conftest import REPO

from jaxgpt import main
from jaxgpt.config import ModelConfig, TrainConfig
from jaxgpt.modes import evaluation, training
from jaxgpt.run import cli
from jaxgpt.run.configs import DataConfig, SampleConfig

TINY = """\
--n_layer=2
--n_head=2
--n_embd=32
--block_size=32
--batch_size=8
--max_iters=40
--eval_interval=20
--eval_iters=4
--log_interval=10
--warmup_iters=5
"""


@pytest.fixture
def flagfile(tmp_path, corpus_path):
    path = tmp_path / "tiny.cfg"
    path.write_text(
        TINY
        + f"--data_path={corpus_path}\n--data_dir={tmp_path / 'data'}\n"
        + f"--workdir={tmp_path / 'wd'}\n"
    )
    return path


def run_main(*args, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "jaxgpt.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,  # The tests read the return code.
    )


def samples(stdout: str) -> list[str]:
    """The printed samples: the text before each separator line."""
    parts = stdout.split("\n" + "-" * 40 + "\n")
    return [p.lstrip("\n") if i else p for i, p in enumerate(parts[:-1])]


def assert_one_clear_message(overrides, words, tmp_path, corpus_path):
    """main() on a tiny model with `overrides` exits with one line holding `words`."""
    settings = {
        "data_path": str(corpus_path),
        "data_dir": str(tmp_path / "data"),
        "workdir": str(tmp_path / "new"),
        "max_iters": 2,
        "warmup_iters": 0,
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 16,
        "block_size": 16,
        **overrides,
    }
    with flagsaver.flagsaver(**settings), pytest.raises(SystemExit) as exit_:
        main.main(["jaxgpt.main"])
    message = str(exit_.value.code)
    assert message.startswith("error: ") and "\n" not in message
    for word in words:
        assert word in message


def test_train_checkpoint_and_sample(tmp_path, flagfile, corpus_path):
    done = run_main(f"--flagfile={flagfile}", "--max_new_tokens=77", "--prompt=ROMEO:")
    assert done.returncode == 0, done.stderr[-3000:]
    workdir = tmp_path / "wd"
    assert (workdir / "checkpoints" / "40").is_dir() and (workdir / "best").is_dir()
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [0, 20, 40]
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    assert "step 40: train loss" in done.stdout + done.stderr
    # The log line at each --log_interval: speed, FLOP/s and MFU (measured peak).
    log = re.search(
        r"step 40: loss [\d.]+, .* tok/s, ([\d.]+) GFLOP/s, MFU ([\d.]+)%", done.stderr
    )
    assert log and float(log.group(1)) > 0 and 0 < float(log.group(2)) < 100
    assert "GFLOP/s per device (measured" in done.stderr
    # The first step's time apart (compile included), steps of the total and
    # the time left; every log line as `HH:MM:SS message`, none of absl's prefix.
    assert re.search(r"step 1: loss [\d.]+, first step [\d.]+ s \(compile", done.stderr)
    assert re.search(r"MFU [\d.]+%; 20/40 steps \(50%\), [\d:]+ left", done.stderr)
    assert re.search(r"^\d\d:\d\d:\d\d step 40: train loss", done.stderr, re.MULTILINE)
    assert not re.search(r"^[IWEF]\d{4} \d\d:\d\d", done.stderr, re.MULTILINE)
    (text,) = samples(done.stdout)
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 77

    # Sampling from the checkpoint: several samples of the requested length.
    again = run_main(
        f"--flagfile={flagfile}",
        "--mode=sample",
        "--num_samples=3",
        "--max_new_tokens=25",
        "--prompt=a",
        "--checkpoint=best",
    )
    assert again.returncode == 0, again.stderr[-3000:]
    texts = samples(again.stdout)
    assert len(texts) == 3 and all(len(t) == 26 and t[0] == "a" for t in texts)

    # Evaluating it, as the run evaluated (4 batches of 8 per split, from its
    # checkpoint's meta), gives the loss the run logged at its last step; a
    # progress bar counts the batches.
    evaluated = run_main(
        f"--workdir={workdir}", "--mode=eval", f"--data_path={corpus_path}",
        f"--data_dir={tmp_path / 'data'}",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"val: loss {records[-1]['val_loss']:.4f}" in evaluated.stdout
    assert "8/8" in evaluated.stderr and "the run's settings" in evaluated.stderr
    assert "--dataset=shakespeare_char: 4 batches of 8 x 32 tokens" in evaluated.stderr
    with flagsaver.flagsaver():  # A flag given overrides the run's setting.
        flags.FLAGS(["jaxgpt.main", f"--workdir={workdir}", "--eval_iters=2"])
        try:
            train_cfg, data_cfg, source = evaluation.eval_configs(
                cli.command(), "latest"
            )
        finally:
            flags.FLAGS.unparse_flags()
    assert (train_cfg.eval_iters, train_cfg.batch_size) == (2, 8)
    assert data_cfg.dataset == "shakespeare_char"
    assert source == "the run's settings, --eval_iters from the flags"

    # Running the same command again resumes (nothing left to train) and samples.
    resumed = run_main(f"--flagfile={flagfile}", "--max_new_tokens=5")
    assert resumed.returncode == 0 and "resuming from step 40" in resumed.stderr

    # A different model in the same workdir is refused, unless --overwrite.
    other = run_main(f"--flagfile={flagfile}", "--n_layer=3")
    assert other.returncode == 1
    assert "different model" in other.stderr and "--overwrite" in other.stderr
    assert "Traceback" not in other.stderr


def test_max_iters_below_lr_decay_iters_warns(caplog):
    """The learning rate at the last step, said: cosine from 2e-3 at step 100 to
    1e-4 at 2000, stopped at 500."""
    cfg = TrainConfig(
        max_iters=500, lr_decay_iters=2000, warmup_iters=100,
        learning_rate=2e-3, min_lr=1e-4,
    )  # fmt: skip
    training.warn_unfinished_decay(cfg)
    lr = 1e-4 + 0.5 * (2e-3 - 1e-4) * (1 + math.cos(math.pi * 400 / 1900))
    (record,) = [r for r in caplog.records if "--lr_decay_iters=2000" in r.getMessage()]
    assert f"ends at {lr:.3g} ({lr / 2e-3:.0%} of its peak)" in record.getMessage()
    assert "--lr_decay_iters=500" in record.getMessage()
    caplog.clear()
    training.warn_unfinished_decay(TrainConfig(max_iters=500, warmup_iters=10))
    assert not caplog.records  # Decays over the run: nothing to say.


def test_unknown_mode_is_one_clear_message():
    done = run_main("--mode=serve")
    assert done.returncode != 0 and "--mode=serve" in done.stderr
    assert "Traceback" not in done.stderr


def test_help_lists_every_flag_by_config_and_exits_0():
    """--help: jaxgpt's flags under their configs, in configs.ALL's order (as
    docs/flags.md), none of absl's or orbax's, and where those are."""
    from jaxgpt import config
    from jaxgpt.run import configs

    for flag in ("--help", "-?"):
        done = run_main(flag, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        out = done.stdout
        assert out.startswith(main.__doc__.strip().splitlines()[0])
        headers = [out.index(f"\n{cls.__name__}: ") for cls in configs.ALL]
        assert headers == sorted(headers)
        for cls, start, end in zip(configs.ALL, headers, headers[1:] + [len(out)]):
            for field, _ in config.flag_fields(cls):
                assert f"\n  --{field.name}=" in out[start:end], (cls, field.name)
        named = set(re.findall(r"^  --(\w+)=", out, re.MULTILINE))
        assert "logtostderr" not in named and not any("orbax" in n for n in named)
        assert "--helpfull" in out and "Traceback" not in done.stderr


@pytest.fixture
def parsed_flags():
    flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver():
        yield


@pytest.mark.parametrize(
    "overrides,words",
    [
        ({"n_embd": 100, "n_head": 6}, ["--n_embd=100", "--n_head=6"]),
        ({"n_layer": 0}, ["--n_layer=0", "positive"]),
        ({"batch_size": -2}, ["--batch_size=-2"]),
        ({"block_size": 2_000_000}, ["--block_size=2000000", "split"]),
        ({"prompt": "¿qué?", "mode": "sample"}, ["--prompt", "'¿'", "'é'"]),
        ({"data_path": "/no/such/file.txt"}, ["--data_path=/no/such/file.txt"]),
    ],
)
def test_bad_flags_end_in_one_clear_message(
    overrides, words, tmp_path, parsed_flags, corpus_path, flagfile
):
    if overrides.get("mode") == "sample":  # Needs a checkpoint to sample from.
        assert (
            run_main(
                f"--flagfile={flagfile}",
                "--max_iters=2",
                "--warmup_iters=0",
                "--max_new_tokens=1",
            ).returncode
            == 0
        )
        overrides = {**overrides, "workdir": str(tmp_path / "wd")}
    assert_one_clear_message(overrides, words, tmp_path, corpus_path)


@pytest.mark.parametrize(
    "overrides,words",
    [
        (
            {"attention": "dot_product", "dropout": 0.1},
            ["--attention=dot_product", "--dropout=0.1", "--dropout=0"],
        ),
        ({"top_p": 0.0}, ["--top_p=0.0"]),
        pytest.param(
            {"attention": "cudnn", "dropout": 0.0, "dtype": "bfloat16"},
            ["--attention=cudnn needs an NVIDIA GPU", "cpu"],
            marks=pytest.mark.skipif(
                jax.default_backend() == "gpu", reason="a GPU runs cuDNN"
            ),
        ),
    ],
)
def test_speed_flags_end_in_one_clear_message(
    overrides, words, tmp_path, parsed_flags, corpus_path
):
    assert_one_clear_message(overrides, words, tmp_path, corpus_path)


def test_gpu_flagfile_is_the_baby_gpt_in_bfloat16(parsed_flags, monkeypatch):
    """shakespeare_gpu.cfg includes shakespeare.cfg (paths relative to the repo)."""
    monkeypatch.chdir(REPO)
    flags.FLAGS(["jaxgpt.main", "--flagfile=experiments/shakespeare_gpu.cfg"])
    cfg = cli.from_flags(ModelConfig, vocab_size=65)
    assert (cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.dropout) == (6, 384, 256, 0.2)
    assert cfg.dtype == "bfloat16" and flags.FLAGS.workdir == "out/shakespeare"
    flags.FLAGS.unparse_flags()  # Back to the defaults.
    flags.FLAGS(["jaxgpt.main", "--flagfile=experiments/shakespeare.cfg"])
    assert cli.from_flags(ModelConfig, vocab_size=65).dtype == "float32"


EXPERIMENTS = REPO / "experiments"


@pytest.mark.parametrize("name", sorted(p.name for p in EXPERIMENTS.glob("*.cfg")))
def test_every_flagfile_makes_valid_configs(name, parsed_flags, monkeypatch):
    """Each recipe in experiments/ parses, and its configs pass their checks
    (e.g. warmup within max_iters), so it starts rather than ending in an error."""
    monkeypatch.chdir(REPO)
    flags.FLAGS(["jaxgpt.main", f"--flagfile=experiments/{name}"])
    for cls in (ModelConfig, TrainConfig, SampleConfig, DataConfig):
        cli.from_flags(cls, **({"vocab_size": 65} if cls is ModelConfig else {}))
    flags.FLAGS.unparse_flags()


@pytest.mark.parametrize(
    "overrides,words",
    [
        ({"mesh_data": 2}, ["--mesh_data=2", "--mesh_fsdp=1", "devices, 1"]),
        (
            {"batch_size": 6, "grad_accum_steps": 4},
            ["--batch_size=6", "--grad_accum_steps=4"],
        ),
        (
            {"num_processes": 2},
            ["--coordinator_address", "--num_processes", "--process_id"],
        ),
        (
            {"coordinator_address": "127.0.0.1:1", "num_processes": 2, "process_id": 2},
            ["--process_id=2", "--num_processes=2"],
        ),
    ],
)
def test_scale_flags_end_in_one_clear_message(
    overrides, words, tmp_path, parsed_flags, corpus_path
):
    assert_one_clear_message(overrides, words, tmp_path, corpus_path)
